"""Classical difference-image detection: the peer the neural detector has to beat.

``python -m rtcnn.baseline REF NEW -o baseline.ecsv [--threshold N_SIGMA] [--fwhm PX]
[--overwrite] [--regions [out.reg]]`` (or ``python -m rtcnn.baseline DIR_OR_GLOB -o OUTDIR
[--strict]`` for every pair found under a directory / glob: ``OUTDIR/<pair name>.ecsv``
each, an unusable pair skipped and named at the end — the same inputs and outputs as
``python -m rtcnn.detect``, :mod:`rtcnn.cli`).

Method (the textbook matched-filter search on a difference image)
-----------------------------------------------------------------
The stages are those of the detector (:mod:`rtcnn.difference`, :mod:`rtcnn.measure`,
:mod:`rtcnn.postprocess`); only the network is replaced by the matched filter.

1. **Difference** ``D = new - ref`` on the common pixel grid
   (:func:`rtcnn.difference.difference_image`). If both headers carry a zero point, the
   reference is scaled to the new image's zero point. NaN/inf pixels of either image are
   masked.
2. **Noise model** per pixel of ``D`` (:func:`rtcnn.difference.noise_variance`):
   ``var = sigma_bkg^2 + max(ref, 0) / t_ref + max(new, 0) / t_new + (eta * max(|ref|, |new|))^2``
   with ``sigma_bkg`` the robust background noise of ``D``
   (:func:`rtcnn.difference.background_sigma`), the Poisson
   term of the sources in e-/s (``t`` = ``EXPTIME`` in s; dropped when absent) and a
   subtraction-residual floor ``eta`` (:data:`rtcnn.difference.RESIDUAL_FRACTION`) that absorbs the
   PSF mismatch between the epochs around bright objects.
3. **Detection**: the PSF matched filter ``S/N = (D * K) / sqrt(var * K^2)`` with ``K``
   the pixel-integrated Gaussian PSF of FWHM ``--fwhm``; local maxima of ``|S/N|``
   (positive = brightened, negative = faded) above a pre-threshold
   (:func:`rtcnn.difference.find_peaks`, then :func:`rtcnn.postprocess.nms`).
4. **Measurement** (:func:`rtcnn.measure.fit_psf`, :func:`rtcnn.measure.shape_moments`):
   a weighted least-squares fit of the pixel-integrated Gaussian PSF
   (position, flux, constant) on a 5x5 stamp of ``D`` around each peak, all candidates
   at once (vectorised Gauss-Newton: photutils' per-source fitters take milliseconds
   per source and a full SCA has thousands of candidates, mostly cosmic rays). The
   ``score`` is the fit's PSF S/N ``|F| / sigma_F``, kept when ``>= threshold``.
   **Shape tests** (:class:`ShapeCuts`) reject what is not PSF-shaped, i.e. the
   unrejected cosmic rays of two-epoch data: the Gaussian-weighted second moments of
   the stamp must have the PSF's size (``Ixx + Iyy >= SIZE_MIN``: a one- or two-pixel
   hit is smaller) and be round (ellipticity ``<= ELLIP_MAX``: a track is elongated),
   and the PSF fit's reduced chi^2 (with a model error of ``MODEL_ERROR`` x the
   peak) must be ``<= CHI2_MAX``. Close detections are merged (NMS, ``NMS_RADIUS``).
5. **dmag** = ``|m_ref - m_new|`` by aperture photometry of both images at the fitted
   position with a local annulus background and the header zero point
   (:func:`rtcnn.measure.photometric_dmag`, paper eq. 1-2; a lower limit where the object is
   below 3 sigma in one image), ``brightened`` = the sign of the fitted flux change.

Defaults and how they were tuned
--------------------------------
``--fwhm`` defaults to the Roman PSF FWHM of the header's ``BAND`` (:func:`rtcnn.roman.band_fwhm`,
H158: 1.39 px); ``--threshold`` to :data:`BASELINE_THRESHOLD` = 5 sigma, the
conventional alert threshold. The FWHM (1.39, 1.6, 1.8 px), ``RESIDUAL_FRACTION``
(0, 0.01, 0.02, 0.05) and the shape cuts (``SIZE_MIN`` 0-0.65 px^2, ``ELLIP_MAX``
0.2-inf, ``CHI2_MAX`` 2-inf) were chosen on a *tuning* set that no test uses (16
epochs-mode pairs of 1024x1024 px, ``python -m rtcnn.sim TUNE --pairs 16 --size 1024
--mode epochs --seed 1001``, one SCA of area, ~750 transients) by the m50 at 10 false
positives per SCA (``python -m rtcnn.score``), subject to keeping the completeness at
S/N >= 5 within ~2 % of the uncut value (0.91): stricter size cuts buy ~0.1 mag of m50
at the budget by losing a third of the bright transients. Without the shape tests the
baseline has ~1600 false positives per SCA at 5 sigma (m50 at the budget 22.5); with
them ~18 (m50 25.4 at 5 sigma, 25.35 at the budget).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from rtcnn.catalog import make_catalog, write_catalog, write_ds9_regions
from rtcnn.cli import add_pair_arguments, check_outputs, pair_jobs, report_skipped
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.difference import (
    RESIDUAL_FRACTION,
    background_sigma,
    difference_image,
    find_peaks,
    noise_variance,
    psf_sigma,
    snr_map,
)
from rtcnn.measure import DEFAULT_MODEL_ERROR, fit_psf, photometric_dmag, shape_moments
from rtcnn.postprocess import nms
from rtcnn.roman import band_fwhm

log = logging.getLogger(__name__)

BASELINE_THRESHOLD = 5.0  # sigma, minimum PSF S/N of a reported change (the conventional 5)
MODEL_ERROR = DEFAULT_MODEL_ERROR  # PSF-model error in the fit's chi^2, fraction of the peak
CHI2_MAX = 2.0  # maximum reduced chi^2 of the PSF fit (with MODEL_ERROR), tuned
SIZE_MIN = 0.55  # px^2, smallest moment size Ixx + Iyy (Roman H158 PSF ~0.6-0.8), tuned
ELLIP_MAX = 0.3  # largest moment ellipticity (PSF < ~0.25; cosmic-ray tracks ~0.5-1), tuned
PRE_THRESHOLD = 0.8  # peaks of the S/N map are kept down to this fraction of the threshold
PEAK_RADIUS = 2  # px, half-width of the local-maximum box on the S/N map
NMS_RADIUS = 2.5  # px, peaks closer than this are one candidate


# --------------------------------------------------------------------------- pieces
@dataclass(frozen=True)
class ShapeCuts:
    """The candidate tests of :func:`find_changes` (module constants by default).

    Attributes
    ----------
    size_min : float
        Smallest moment size (px^2), :func:`shape_moments`; 0 disables.
    ellip_max : float
        Largest moment ellipticity; ``inf`` disables.
    chi2_max : float
        Largest reduced chi^2 of the PSF fit with ``model_error``; ``inf`` disables.
    model_error : float
        PSF model error as a fraction of the model's peak pixel (in that chi^2).
    """

    size_min: float = SIZE_MIN
    ellip_max: float = ELLIP_MAX
    chi2_max: float = CHI2_MAX
    model_error: float = MODEL_ERROR

    @classmethod
    def off(cls) -> ShapeCuts:
        """No test at all (every PSF-fitted peak above the threshold passes)."""
        return cls(0.0, math.inf, math.inf, MODEL_ERROR)

    def passes(self, table: Table) -> np.ndarray:
        """``(N,) bool``: the rows of a :func:`find_changes` table that pass."""
        with np.errstate(invalid="ignore"):
            return (
                (np.asarray(table["size"]) >= self.size_min)
                & (np.asarray(table["ellipticity"]) <= self.ellip_max)
                & (np.asarray(table["chi2"]) <= self.chi2_max)
            )


def find_changes(
    diff: np.ndarray,
    var: np.ndarray,
    fwhm: float,
    threshold: float = BASELINE_THRESHOLD,
    cuts: ShapeCuts | None = None,
) -> Table:
    """Point-like changes in a difference image: matched filter, peaks, PSF fit, shape tests.

    Parameters
    ----------
    diff, var : (ny, nx) float
        Difference image (e-/s) and its variance (``inf`` = masked).
    fwhm : float
        PSF FWHM in px.
    threshold : float
        Minimum PSF S/N ``|F| / sigma_F``.
    cuts : ShapeCuts, optional
        Cosmic-ray / artefact tests (default :class:`ShapeCuts`()); ``ShapeCuts.off()``
        keeps every fitted peak (for tuning).

    Returns
    -------
    astropy.table.Table
        ``x``, ``y`` (px), ``flux``, ``flux_err`` (e-/s), ``snr`` (>= threshold),
        ``chi2``, ``size`` (px^2),
        ``ellipticity``, ``brightened``; after non-maximum suppression, sorted by
        decreasing S/N.
    """
    cuts = ShapeCuts() if cuts is None else cuts
    snr = snr_map(diff, var, fwhm)
    pre = PRE_THRESHOLD * threshold
    peaks = [find_peaks(sign * snr, pre, min_distance=PEAK_RADIUS) for sign in (1.0, -1.0)]
    ix = np.concatenate([p[0] for p in peaks])
    iy = np.concatenate([p[1] for p in peaks])
    fit = fit_psf(diff, var, ix, iy, psf_sigma(fwhm), model_error=cuts.model_error)
    s = np.abs(fit["snr"])
    g = np.flatnonzero(fit["ok"] & (s >= threshold))
    size, ellip = shape_moments(diff, fit["x"][g], fit["y"][g], np.sign(fit["flux"][g]))
    table = Table({
        "x": fit["x"][g], "y": fit["y"][g], "flux": fit["flux"][g],
        "flux_err": fit["flux_err"][g], "snr": s[g], "chi2": fit["chi2"][g],
        "size": size,
        "ellipticity": ellip, "brightened": fit["flux"][g] > 0,
    })  # fmt: skip
    table = table[cuts.passes(table)]
    keep = nms(table["x"], table["y"], table["snr"], NMS_RADIUS)
    return table[keep]


def run_baseline(
    ref_path,
    new_path,
    threshold: float = BASELINE_THRESHOLD,
    fwhm: float | None = None,
    residual_fraction: float = RESIDUAL_FRACTION,
    cuts: ShapeCuts | None = None,
) -> Table:
    """Detect changes between two FITS images and return a candidate catalog.

    Parameters
    ----------
    ref_path, new_path : path-like
        Reference and new image (same shape and pixel grid), e-/s, sky-subtracted.
    threshold : float
        Minimum PSF S/N (sigma) of a reported change.
    fwhm : float, optional
        PSF FWHM in px; default from the header ``BAND`` (:func:`rtcnn.roman.band_fwhm`).
    residual_fraction : float
        See :data:`RESIDUAL_FRACTION`.
    cuts : ShapeCuts, optional
        Candidate tests (default: the tuned module constants).

    Returns
    -------
    astropy.table.Table
        The catalog (:func:`rtcnn.catalog.make_catalog`) with ``score`` = PSF S/N, plus
        ``flux``, ``flux_err`` (e-/s, the fitted change) and ``chi2``; metadata names the
        inputs, ``model = 'baseline'``, the threshold, FWHM, noise and masked fraction.
    """
    from rtcnn.align import read_aligned_pair

    if not threshold > 0:
        raise RtcnnInputError(None, f"--threshold must be > 0 sigma, got {threshold}")
    ref, new, aligned = read_aligned_pair(ref_path, new_path)  # reference on the new grid
    fwhm = band_fwhm(new.band or ref.band) if fwhm is None else float(fwhm)
    psf_sigma(fwhm)  # validates
    wcs = new.require_wcs("give the candidates RA/Dec")
    d = difference_image(ref, new)
    try:
        sigma_bkg = background_sigma(d.diff, d.mask)
    except RtcnnInputError as err:  # name the pair's new image in the message
        raise RtcnnInputError(err.path or new_path, err.problem) from None
    var = noise_variance(d.ref, d.new, sigma_bkg, d.exptime, residual_fraction, d.mask)
    cuts = ShapeCuts() if cuts is None else cuts
    found = find_changes(d.diff, var, fwhm, threshold, cuts)
    dmag = photometric_dmag(d, found["x"], found["y"])
    meta = {
        "ref": str(ref_path), "new": str(new_path), "model": "baseline",
        "method": "difference image, PSF matched filter, PSF fit (rtcnn.baseline)",
        "threshold": float(threshold), "score": "PSF S/N of the flux change (sigma)",
        "fwhm_px": float(fwhm), "sigma_bkg": sigma_bkg, "residual_fraction": residual_fraction,
        **{f"cut_{k}": v for k, v in dataclasses.asdict(cuts).items()},
        "image_shape": [int(v) for v in new.shape],
        "masked_fraction": d.masked_fraction, "ref_scale": d.scale,
        **aligned.meta(),
        "dmag": "|m_ref - m_new| (mag), aperture photometry, rtcnn.photometry.magdiff",
    }  # fmt: skip
    cat = make_catalog(found["x"], found["y"], found["snr"], dmag, found["brightened"], wcs, meta)
    for name, unit in (("flux", "electron/s"), ("flux_err", "electron/s"), ("chi2", None),
                       ("size", "pix2"), ("ellipticity", None)):
        cat[name] = np.asarray(found[name])  # already by decreasing S/N, as make_catalog sorts
        cat[name].unit = unit
    return cat


# --------------------------------------------------------------------------- command

def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = CommandParser(prog="python -m rtcnn.baseline", description=__doc__.splitlines()[0])
    add_pair_arguments(p)
    p.add_argument("--threshold", type=float, default=BASELINE_THRESHOLD,
                   help=f"minimum PSF S/N in sigma (default {BASELINE_THRESHOLD:g})")
    p.add_argument("--fwhm", type=float, default=None,
                   help="PSF FWHM in px (default: the Roman PSF of the header BAND, H158 1.39)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0 (an unusable pair of a directory is skipped and named)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    jobs = pair_jobs(args.inputs, args.output, args.regions)
    check_outputs(jobs, args.overwrite)
    written, skipped = [], []
    for job in jobs:
        t0 = time.perf_counter()
        try:
            cat = run_baseline(job.ref, job.new, threshold=args.threshold, fwhm=args.fwhm)
        except RtcnnInputError as err:  # one unusable pair of many: skip it, name it
            if args.strict or len(jobs) == 1:
                raise
            log.warning("%s: skipped: %s", job.name, err)
            skipped.append((job.name, err))
            continue
        cat.meta["seconds"] = round(time.perf_counter() - t0, 3)
        write_catalog(cat, job.catalog, overwrite=args.overwrite)
        if job.regions is not None:
            write_ds9_regions(cat, job.regions, overwrite=args.overwrite)
        written.append(job.catalog)
        nb = int(np.sum(cat["brightened"]))
        masked = cat.meta.get("masked_fraction") or 0.0
        print(f"{job.catalog}: {len(cat)} candidates ({nb} brightened, {len(cat) - nb} faded) "
              f"at >= {args.threshold:g} sigma in {cat.meta['seconds']:.2f} s"
              + (f"; {100 * masked:.3g}% of pixels NaN/inf, masked" if masked else ""))  # fmt: skip
    report_skipped(skipped, len(jobs), len(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
