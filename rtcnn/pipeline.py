"""One pair from disk to its outputs: the per-pair step of :mod:`rtcnn.detect` and :mod:`rtcnn.survey`.

:func:`load_model` loads the detector once (per process, or per Dask worker);
:func:`process_pair` then runs one pair through the detection path — read
(:mod:`rtcnn.io`), detect and measure (:func:`detect_pair`), write the
catalog and, when asked, the DS9 regions (:mod:`rtcnn.catalog`, atomic writes) — and
returns a :class:`PairResult` (outputs, number of candidates, seconds, checksum of the
outputs). It is a small orchestrator: a further per-pair output (alerts, cutouts) is one
more field of :class:`PairOutputs` and one more step of :func:`write_outputs`.

No command-line parsing here; the commands (:mod:`rtcnn.detect`, :mod:`rtcnn.survey`)
build a :class:`PairOptions` and :class:`PairOutputs` from their arguments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from rtcnn import checkpoint
from rtcnn.alerts import write_products
from rtcnn.catalog import catalog_from_sources, write_catalog, write_ds9_regions
from rtcnn.difference import (
    NOISE_SUBSAMPLE,
    difference_image,
    find_candidates,
    image_sigma,
    robust_sigma,
)
from rtcnn.errors import RtcnnInputError
from rtcnn.fluxes import add_measurements
from rtcnn.inference import (
    DEFAULT_BATCH,
    MODES,
    STAMP_SIZE,
    dense_detections,
    native_bf16,
    prepare_detector,
    resolve_device,
    stamp_detections,
)
from rtcnn.measure import DMAG_SOURCES, Measurement
from rtcnn.models.detector import DEFAULT_THRESHOLD, DenseDetector
from rtcnn.postprocess import Sources, best_per_candidate, finalize
from rtcnn.roman import band_fwhm, canonical_band

__all__ = [
    "DEFAULT_THRESHOLD",
    "PRECISIONS",
    "Model",
    "PairOptions",
    "PairOutputs",
    "PairResult",
    "detect_pair",
    "files_checksum",
    "load_model",
    "load_pair",
    "observation",
    "process_pair",
    "write_outputs",
]

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class PairOptions:
    """How a pair is detected and written (the same for every pair of a run).

    Attributes
    ----------
    threshold : float or None
        Minimum network score; None = the checkpoint's, else :data:`DEFAULT_THRESHOLD`.
    mode : {"auto", "stamps", "dense"}
        See :func:`detect_pair`.
    batch_size : int or None
        Stamps or dense tiles per forward pass (None: the inference default).
    precision : {"auto", "bf16", "fp32"}
        Network arithmetic; auto = bf16 where the device has native bfloat16.
    refine : bool
        PSF-fit refinement of the positions.
    dmag : {"photometry", "network"}
        Source of the catalog's dmag.
    tta : bool
        Stamps mode: D4 test-time augmentation.
    overwrite : bool
        Replace existing outputs (otherwise an existing output is an error).
    """

    threshold: float | None = None
    mode: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    refine: bool = True
    dmag: str = "photometry"
    tta: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """Raise :class:`RtcnnInputError` (one line) for an option out of range."""
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise RtcnnInputError(None, f"--threshold must lie in [0, 1], got {self.threshold}")
        if self.batch_size is not None and self.batch_size < 1:
            raise RtcnnInputError(None, f"--batch-size must be >= 1, got {self.batch_size}")
        if self.mode not in MODES:
            raise RtcnnInputError(None, f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise RtcnnInputError(None, f"--precision must be one of {PRECISIONS}, "
                                  f"got {self.precision!r}")  # fmt: skip
        if self.dmag not in DMAG_SOURCES:
            raise RtcnnInputError(None, f"--dmag must be one of {DMAG_SOURCES}, got {self.dmag!r}")


@dataclass(frozen=True)
class PairOutputs:
    """Where one pair's outputs go: the catalog (ECSV) and, optionally, DS9 regions."""

    catalog: Path
    regions: Path | None = None
    alerts: Path | None = None  # directory of Avro packets (rtcnn.alerts)
    cutouts: Path | None = None  # directory of cutout FITS files
    cutout_size: int = 63  # px

    def paths(self) -> list[Path]:
        """The output files, catalog first (the order of :attr:`PairResult.checksum`)."""
        return [p for p in (self.catalog, self.regions) if p is not None]


@dataclass(frozen=True)
class PairResult:
    """What :func:`process_pair` did for one pair.

    Attributes
    ----------
    catalog : Path
        The catalog written.
    files : tuple of Path
        Every file written, catalog first.
    n_candidates : int
        Rows of the catalog.
    seconds : float
        Wall time of the pair: read, detect, write (s).
    checksum : str
        SHA-256 (hex) over the written files' bytes, in ``files`` order
        (:func:`files_checksum`).
    band, sca, mjd : str, int, float or None
        The new image's band (GalSim spelling where it is a Roman band), SCA number and
        MJD of the exposure (:func:`observation`).
    table : astropy.table.Table or None
        The catalog as written (not compared, not shown).
    """

    catalog: Path
    files: tuple[Path, ...]
    n_candidates: int
    seconds: float
    checksum: str
    band: str | None = None
    sca: int | None = None
    mjd: float | None = None
    table: Table | None = field(default=None, repr=False, compare=False)


@dataclass
class Model:
    """A detector ready on its device, loaded once and used for many pairs.

    Attributes
    ----------
    net : rtcnn.models.detector.DenseDetector
        In eval mode on ``device`` (:func:`rtcnn.checkpoint.load_model`,
        :func:`rtcnn.inference.prepare_detector`).
    device : torch.device
    ckpt : str
        The checkpoint it came from (catalog metadata).
    saved_threshold : float or None
        The score threshold stored in the checkpoint.
    """

    net: torch.nn.Module
    device: torch.device
    ckpt: str
    saved_threshold: float | None = None

    def threshold(self, options: PairOptions) -> float:
        """The threshold ``options`` asks for, else the checkpoint's, else the default."""
        if options.threshold is not None:
            return float(options.threshold)
        return DEFAULT_THRESHOLD if self.saved_threshold is None else self.saved_threshold

    def bf16(self, options: PairOptions) -> bool:
        """Whether ``options.precision`` means bfloat16 autocast on this device."""
        return options.precision == "bf16" or (
            options.precision == "auto" and native_bf16(self.device)
        )


def load_model(ckpt: str | os.PathLike, device: str | torch.device = "auto") -> Model:
    """Load a detector (safely, :func:`rtcnn.checkpoint.load_model`) on ``device``.

    Parameters
    ----------
    ckpt : path-like
        A :class:`rtcnn.tasks.detection.DetectionTask` checkpoint.
    device : str or torch.device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Raises
    ------
    RtcnnInputError
        Unreadable or wrong checkpoint, unknown or unavailable device.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    loaded = checkpoint.load_model(ckpt, expect=DenseDetector)
    return Model(net=prepare_detector(loaded.net, dev), device=dev, ckpt=loaded.source,
                 saved_threshold=loaded.threshold)  # fmt: skip


def detect_pair(
    net: DenseDetector,
    ref,
    new,
    threshold: float,
    *,
    mode: str = "auto",
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    refine: bool = True,
    dmag: str = "photometry",
    tta: bool = False,
    progress=None,
    meta: dict | None = None,
):
    """The detection path of one pair, each stage once: difference → inference →
    postprocess → measure → catalog.

    1. :func:`rtcnn.difference.difference_image`: ``new - ref`` after the reference is
       scaled to the new zero point; the network's noise (:func:`~rtcnn.difference.image_sigma`),
       the background noise of the difference and, in stamps mode, the classical
       candidates (:func:`~rtcnn.difference.find_candidates`).
    2. :mod:`rtcnn.inference`: the network on a stamp around each candidate
       (:func:`~rtcnn.inference.stamp_detections`, batch by batch) or on tiles of the
       whole image (:func:`~rtcnn.inference.dense_detections`).
    3. :mod:`rtcnn.postprocess`: one detection per candidate, then the threshold and NMS
       (:func:`~rtcnn.postprocess.finalize`).
    4. :class:`rtcnn.measure.Measurement`: no detection on a bad pixel, the PSF refit of
       the positions and the photometric dmag; in stamps mode each batch is measured in a
       worker thread while the network scores the next.
    5. :func:`rtcnn.catalog.catalog_from_sources`.

    Parameters
    ----------
    net : DenseDetector
        In eval mode on ``device`` (:func:`load_model`).
    ref, new : rtcnn.io.Image
        Reference and new image of the same shape; ``new`` must have a celestial WCS.
    threshold : float
        Minimum network score.
    mode : {"auto", "stamps", "dense"}
        "auto" = "dense" on a GPU, "stamps" on a CPU.
    batch_size : int, optional
        Stamps (default :data:`rtcnn.inference.DEFAULT_BATCH`) or tiles (dense mode,
        :data:`rtcnn.inference.DENSE_BATCH`) per forward pass.
    device : torch device
    bf16 : bool
        bfloat16 autocast for the network.
    refine : bool
        Refine positions by a PSF fit to the difference image.
    dmag : {"photometry", "network"}
        The catalog's dmag: aperture photometry at the final positions (the data layer's
        definition; the network's value where a zero point is missing) or the network's
        dmag head.
    tta : bool
        Stamps mode: average the network over the 8 D4 views of each stamp.
    progress : tqdm-like, optional
        ``progress.reset(total=N)`` once the work is known, then ``progress.update(n)``.
    meta : dict, optional
        Extra catalog metadata (e.g. ``model``).

    Returns
    -------
    astropy.table.Table
        The catalog (:func:`rtcnn.catalog.make_catalog`) with metadata ``ref``, ``new``,
        ``threshold``, ``mode``, ``noise_sigma`` (e-/s), ``ref_scale`` (zero-point factor
        applied to the reference), ``image_shape`` (ny, nx), ``masked_fraction``,
        ``n_candidates`` (stamps mode), ``psf_refined``, ``dmag`` (its source) and
        ``seconds``.
    """
    if mode not in MODES:
        raise RtcnnInputError(None, f"mode must be one of {MODES}, got {mode!r}")
    if dmag not in DMAG_SOURCES:
        raise RtcnnInputError(None, f"dmag must be one of {DMAG_SOURCES}, got {dmag!r}")
    device = torch.device(device)
    if mode == "auto":
        mode = "dense" if device.type == "cuda" else "stamps"
    if min(new.shape) < STAMP_SIZE:  # said before any padding to the network stride
        raise RtcnnInputError(new.path, f"image {new.shape[1]} x {new.shape[0]} px is too small: "
                              f"the detector needs at least {STAMP_SIZE} x {STAMP_SIZE} px")
    t0 = time.perf_counter()
    d = difference_image(ref, new)
    wcs = new.require_wcs("give the candidates RA/Dec")
    sigma = image_sigma(d.ref, d.new)
    sigma_bkg = robust_sigma(d.diff[::NOISE_SUBSAMPLE, ::NOISE_SUBSAMPLE], floor=0.0)
    photometry = dmag == "photometry" and d.zeropoint is not None
    measurement = Measurement(d, band_fwhm(new.band or ref.band, new.path), sigma_bkg,
                              refine=refine, photometry=photometry)  # fmt: skip
    info = {"ref": str(ref.path), "new": str(new.path), "threshold": float(threshold),
            "mode": mode, "tta": bool(tta and mode == "stamps"), "noise_sigma": sigma,
            "ref_scale": d.scale, "image_shape": [int(v) for v in new.shape],
            "masked_fraction": d.masked_fraction}  # fmt: skip
    if mode == "stamps":
        cand = find_candidates(d.diff, mask=d.mask)
        cand_xy = np.column_stack([cand.ix, cand.iy])
        threads = torch.get_num_threads()
        if device.type == "cpu" and threads > 1:  # leave a core to the measurement worker
            torch.set_num_threads(threads - 1)
        try:
            with ThreadPoolExecutor(max_workers=1) as pool:
                parts = []
                for det in stamp_detections(net, d.ref, d.new, cand.ix, cand.iy, threshold,
                                            sigma, batch_size=batch_size or DEFAULT_BATCH,
                                            device=device, bf16=bf16, tta=tta,
                                            progress=progress):  # fmt: skip
                    keep = best_per_candidate(det["batch"], det["xy"], det["score"], cand_xy)
                    parts.append(pool.submit(measurement, Sources.from_detections(det, keep)))
                sources = finalize(Sources.concatenate(p.result() for p in parts), threshold)
        finally:
            torch.set_num_threads(threads)
        info["n_candidates"] = len(cand)
    else:
        det = dense_detections(net, d.ref, d.new, threshold, sigma, batch_size=batch_size,
                               device=device, bf16=bf16, progress=progress)  # fmt: skip
        sources = measurement(finalize(Sources.from_detections(det), threshold))
    if refine:
        info["psf_refined"] = measurement.refined
    info["dmag"] = ("|m_ref - m_new| (mag), aperture photometry, rtcnn.photometry.magdiff"
                    if photometry else "network dmag head")  # fmt: skip
    info["seconds"] = round(time.perf_counter() - t0, 3)
    table = catalog_from_sources(sources, wcs, {**info, **(meta or {})})
    add_measurements(table, d.ref, d.new, wcs=wcs, zeropoint=d.zeropoint,  # issue 17 (fluxes)
                     band=new.band or ref.band, sigma_diff=sigma_bkg, exptime=d.exptime,
                     mask=d.mask, header=new.header, ref_header=ref.header)  # fmt: skip
    return table


def load_pair(ref: str | os.PathLike, new: str | os.PathLike):
    """Read a pair, put the reference on the new image's grid, pull the pixels into memory.

    Returns
    -------
    (ref, new, aligned) : rtcnn.io.Image, rtcnn.io.Image, rtcnn.align.AlignInfo
        Float32, NaN where masked (the reference also where it does not cover the new
        image; :func:`rtcnn.align.read_aligned_pair`).
    """
    from rtcnn.align import read_aligned_pair

    ref_img, new_img, aligned = read_aligned_pair(ref, new)
    for img in (ref_img, new_img):
        img.data = img.filled(float("nan"))  # native float32 in RAM; NaN stays masked
    return ref_img, new_img, aligned


def files_checksum(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 (hex) over the bytes of ``paths``, in order; each file is framed by its size."""
    h = hashlib.sha256()
    for path in paths:
        data = Path(path).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def write_outputs(table, outputs: PairOutputs, overwrite: bool = False,
                  images=None) -> tuple[Path, ...]:
    """Write a pair's catalog and its optional products, each atomically; returns the paths
    (catalog, regions; the alert and cutout directories are in the catalog's metadata).
    ``images`` = ``(ref, new)`` is needed for alerts and cutouts."""
    if outputs.alerts is not None or outputs.cutouts is not None:  # first: they add id, flags
        write_products(table, *images, alerts=outputs.alerts, cutouts=outputs.cutouts,
                       size=outputs.cutout_size, overwrite=overwrite, catalog=outputs.catalog)
    written = [write_catalog(table, outputs.catalog, overwrite=overwrite)]
    if outputs.regions is not None:
        written.append(write_ds9_regions(table, outputs.regions, overwrite=overwrite))
    return tuple(written)


def process_pair(
    ref: str | os.PathLike,
    new: str | os.PathLike,
    model: Model,
    options: PairOptions,
    outputs: PairOutputs,
    *,
    name: str | None = None,
    images=None,
    progress=None,
) -> PairResult:
    """Run one pair from its files to its written outputs.

    Parameters
    ----------
    ref, new : path-like
        Reference and new image (FITS, :func:`rtcnn.align.read_aligned_pair`).
    model : Model
        From :func:`load_model`.
    options : PairOptions
    outputs : PairOutputs
    name : str, optional
        The pair's name in log lines (default: the new image's directory name).
    images : tuple of rtcnn.io.Image, optional
        ``(ref, new, aligned)`` already read with :func:`load_pair` (a prefetching caller).
    progress : tqdm-like, optional
        Per-pair progress bar (see :func:`detect_pair`).

    Returns
    -------
    PairResult

    Raises
    ------
    RtcnnInputError
        An unusable pair (unreadable image, shape mismatch, no WCS...) or an output that
        exists without ``options.overwrite``.
    """
    t0 = time.perf_counter()
    name = name or Path(new).parent.name or Path(new).stem
    ref_img, new_img, aligned = images if images is not None else load_pair(ref, new)
    _report_masked(name, ref_img, new_img)
    bf16 = model.bf16(options)
    meta = {"model": model.ckpt, "model_name": "dense", "device": str(model.device),
            "precision": "bf16" if bf16 else "fp32", **aligned.meta()}  # fmt: skip
    table = detect_pair(model.net, ref_img, new_img, model.threshold(options),
                          mode=options.mode, batch_size=options.batch_size,
                          device=model.device, bf16=bf16, refine=options.refine,
                          dmag=options.dmag, tta=options.tta, progress=progress,
                          meta=meta)  # fmt: skip
    table.meta["ref"], table.meta["new"] = os.fspath(ref), os.fspath(new)
    files = write_outputs(table, outputs, overwrite=options.overwrite, images=(ref_img, new_img))
    seconds = time.perf_counter() - t0
    log.info("%s: %d candidates -> %s (%.2f s)", name, len(table), outputs.catalog,
             table.meta["seconds"])
    return PairResult(catalog=files[0], files=files, n_candidates=len(table), seconds=seconds,
                      checksum=files_checksum(files), table=table,
                      **observation(new_img))  # fmt: skip


#: Header keywords of the SCA number and of the exposure's MJD, first found wins.
SCA_KEYWORDS = ("SCA_NUM", "SCA", "DETECTOR")
MJD_KEYWORDS = ("MJD-OBS", "MJD_OBS", "MJD")


def observation(image) -> dict:
    """Band, SCA and MJD of an :class:`rtcnn.io.Image` from its header (None when absent).

    Returns
    -------
    dict
        ``band`` (str: GalSim spelling for a Roman band, else as written), ``sca``
        (int) and ``mjd`` (float, d).
    """
    band = image.band.strip() if image.band else None
    if band:
        try:
            band = canonical_band(band)
        except RtcnnInputError:
            pass  # not a Roman band: kept as written
    header = image.header
    sca = next((header[k] for k in SCA_KEYWORDS if k in header), None)
    mjd = next((header[k] for k in MJD_KEYWORDS if k in header), None)
    try:
        sca = None if sca is None else int(str(sca).upper().removeprefix("WFI"))
    except ValueError:
        sca = None
    try:
        mjd = None if mjd is None else float(mjd)
    except ValueError:
        mjd = None
    return {"band": band or None, "sca": sca, "mjd": mjd}


def _report_masked(name: str, ref, new) -> None:
    """Log the fraction of NaN/inf (masked) pixels of a pair, when there are any."""
    fractions = [img.masked_fraction for img in (ref, new)]
    if any(fractions):
        log.info("%s: masked NaN/inf pixels: ref %.3g%%, new %.3g%% (excluded from the "
                 "candidates and set to 0 for the network)", name, *(100 * f for f in fractions))
