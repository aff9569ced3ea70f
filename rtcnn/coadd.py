"""Reference coadds: every exposure resampled onto one grid and combined with outlier rejection.

``python -m rtcnn.coadd EPOCH.fits... -o ref.fits [--grid north-up|FIRST] [--size N]
[--sigma K] [--overwrite] [--no-progress]``

Method
------
1. **Grid.** ``north-up`` (default, the sky-tile convention of survey coadds): a TAN grid
   centred on the first exposure's centre, north up / east left, with the first
   exposure's pixel scale, ``N x N`` px (``--size``; default the side that holds the
   first exposure at any roll). ``FIRST``: the first exposure's own WCS and shape.
2. **Resampling.** Each exposure is put on the grid by :func:`rtcnn.align.resample` (the
   WCS transform evaluated on coarse nodes, cubic B-spline interpolation of the surface
   brightness; see :mod:`rtcnn.align` for why) and scaled to the first exposure's AB zero
   point (:func:`rtcnn.align.zeropoint_scale`). Pixels an exposure does not cover, or
   that its bad pixels reach, do not enter the combination.
3. **Outlier rejection and combination** (:func:`combine`), per coadd pixel over the
   exposures that cover it: :func:`astropy.stats.sigma_clip` around the median with the
   *expected* scatter as ``stdfunc`` rather than a sample estimate (with 3-10 exposures a
   MAD of the sample is itself too noisy to clip on)::

       sigma_pix^2 = <sigma_e^2> + max(median, 0) / <t_e> + (PSF_TOLERANCE * median)^2

   with ``sigma_e`` the robust background noise per pixel of each (scaled) exposure,
   ``t_e`` its exposure time (the Poisson term of the sources), and a fractional term
   :data:`PSF_TOLERANCE` because star cores differ between exposures taken at other rolls
   (the PSF rotates with the detector) and must not be clipped. Cosmic rays (tens to
   thousands of sigma) are rejected at :data:`CLIP_SIGMA`. The kept values are averaged
   with inverse-variance weights ``1 / sigma_e^2``.
4. **Outputs** (one FITS file, written atomically): the primary HDU is the coadd (float32,
   image units of the first exposure, NaN where nothing covers), with the grid's WCS,
   ``MAGZP``, ``EXPTIME`` (sum over the exposures: the effective exposure time of the
   Poisson noise of a mean), ``NCOMBINE``, ``BAND``; ``VAR`` is the variance plane
   (``1 / sum(kept weights)``, background noise, (unit)^2, per pixel; the weights come
   from each exposure's noise measured *after* resampling, so the plane is the coadd's
   per-pixel variance: 16 exposures of 0.3 e-/s noise gave a measured 0.0656 e-/s against
   ``sqrt(VAR)`` 0.0651; the noise is correlated between neighbouring pixels); ``NEXP``
   the number of exposures kept per pixel (int16); ``WHT`` the sum of the kept weights.

Memory
------
Streamed: one exposure is read and resampled at a time and written into a temporary
stack file (``K x ny x nx`` float32 plus a coverage byte per value, in a temporary folder
next to the output, deleted at the end; plain file I/O, not a memory map, so the pages
do not stay resident); the combination then reads the stack in row blocks sized to
:data:`BLOCK_BYTES`. Peak memory is one exposure's resampling plus one block and the
four output planes, whatever the number of exposures.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from rtcnn.align import pixel_map, resample, subsample_sigma, zeropoint_scale
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.io.fits import Image, read_image
from rtcnn.io.pairdir import atomic_write, check_output

log = logging.getLogger(__name__)

CLIP_SIGMA = 5.0  # rejection threshold, in expected sigma (cosmic rays are >> 5 sigma)
CLIP_ITERS = 2  # sigma_clip iterations
PSF_TOLERANCE = 0.25  # fraction of the median allowed as exposure-to-exposure PSF scatter
BLOCK_BYTES = 64 * 2**20  # bytes of stack read per combination block
GRIDS = ("north-up", "FIRST")

__all__ = [
    "CLIP_SIGMA",
    "GRIDS",
    "PSF_TOLERANCE",
    "Coadd",
    "coadd_images",
    "combine",
    "first_grid",
    "north_up_grid",
    "write_coadd",
]


@dataclass
class Coadd:
    """A combined reference on one grid.

    Attributes
    ----------
    data : (ny, nx) float32
        Coadd, image units of the first exposure (NaN where no exposure covers).
    variance : (ny, nx) float32
        Background variance per pixel, (unit)^2 (inf where no exposure covers).
    nexp : (ny, nx) int16
        Exposures kept per pixel after rejection.
    weight : (ny, nx) float32
        Sum of the kept inverse-variance weights, 1/(unit)^2.
    wcs : astropy.wcs.WCS
    zeropoint : float or None
        AB mag of 1 unit (the first exposure's).
    exptime : float or None
        Sum of the exposure times, s.
    n_input : int
        Exposures combined.
    n_rejected : int
        Pixel values rejected as outliers (all exposures together).
    band : str or None
    """

    data: np.ndarray
    variance: np.ndarray
    nexp: np.ndarray
    weight: np.ndarray
    wcs: WCS
    zeropoint: float | None
    exptime: float | None
    n_input: int
    n_rejected: int
    band: str | None = None


def pixel_scale_deg(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS, deg / px."""
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)))


def north_up_grid(image: Image, size: int | None = None) -> tuple[WCS, tuple[int, int]]:
    """North-up TAN grid centred on ``image``'s centre, with its pixel scale.

    ``size`` (px, square) defaults to the diagonal of ``image`` (holds it at any roll).
    """
    wcs = image.require_wcs("build a north-up coadd grid")
    ny, nx = image.shape
    centre = wcs.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0).icrs
    if size is None:
        size = math.ceil(math.hypot(nx, ny)) + 2
    scale = pixel_scale_deg(wcs)
    out = WCS(naxis=2)
    out.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    out.wcs.crval = [centre.ra.deg, centre.dec.deg]
    out.wcs.crpix = [(size + 1) / 2.0, (size + 1) / 2.0]
    out.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]])
    out.wcs.radesys = "ICRS"
    out.wcs.set()
    return out, (int(size), int(size))


def first_grid(image: Image) -> tuple[WCS, tuple[int, int]]:
    """The grid of ``image`` itself."""
    return image.require_wcs("use its grid for the coadd"), image.shape


def _expected_std_factory(sig2: float, exptime: float | None):
    """``stdfunc`` for :func:`astropy.stats.sigma_clip`: the expected scatter at the median."""

    def stdfunc(data, axis=None):
        med = np.nan_to_num(np.nanmedian(data, axis=axis))
        var = sig2 + (PSF_TOLERANCE * med) ** 2
        if exptime:
            var = var + np.clip(med, 0.0, None) / exptime
        return np.sqrt(var)

    return stdfunc


def combine(stack: np.ndarray, valid: np.ndarray, weights: np.ndarray, sig2: float,
            exptime: float | None, sigma: float = CLIP_SIGMA):
    """Outlier-rejected, inverse-variance weighted mean over axis 0 of a block.

    Parameters
    ----------
    stack : (K, ny, nx) float32
        Resampled exposures (values where ``valid``).
    valid : (K, ny, nx) bool
        Coverage of each exposure.
    weights : (K,) float
        ``1 / sigma_e^2`` of each exposure.
    sig2 : float
        Mean background variance per pixel of one exposure, (unit)^2.
    exptime : float or None
        Mean exposure time (s), for the Poisson term of the expected scatter.
    sigma : float
        Clipping threshold in expected sigma.

    Returns
    -------
    mean, variance, nexp, weight, n_rejected
        ``(ny, nx)`` arrays (NaN / inf / 0 / 0 where nothing is kept) and an int.
    """
    from astropy.stats import sigma_clip

    data = np.where(valid, stack, np.float32(np.nan))  # uncovered = NaN, ignored by the clip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clipped = sigma_clip(data, sigma=sigma, maxiters=CLIP_ITERS, cenfunc="median",
                             stdfunc=_expected_std_factory(sig2, exptime), axis=0,
                             masked=True, copy=False)
    kept = ~np.ma.getmaskarray(clipped) & valid
    w = kept * weights[:, None, None].astype(np.float32)
    wsum = w.sum(axis=0)
    num = (np.where(kept, stack, 0.0) * w).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(wsum > 0, num / wsum, np.nan).astype(np.float32)
        var = np.where(wsum > 0, 1.0 / wsum, np.inf).astype(np.float32)
    n_rej = int((valid & ~kept).sum())
    return mean, var, kept.sum(axis=0).astype(np.int16), wsum.astype(np.float32), n_rej


class _Stack:
    """A ``(K, ny, nx)`` array in a file, written one plane at a time and read in row
    blocks with plain file I/O (a memory map would keep every touched page resident)."""

    def __init__(self, path: Path, dtype, shape: tuple[int, int]):
        self.dtype, self.shape = np.dtype(dtype), shape
        self.plane = shape[0] * shape[1] * self.dtype.itemsize  # bytes
        self.fh = open(path, "w+b")  # noqa: SIM115 - closed by close()

    def write(self, k: int, plane: np.ndarray) -> None:
        self.fh.seek(k * self.plane)
        np.ascontiguousarray(plane, dtype=self.dtype).tofile(self.fh)

    def rows(self, s: slice, count: int) -> np.ndarray:
        nx = self.shape[1]
        n = s.stop - s.start
        out = np.empty((count, n, nx), self.dtype)
        for k in range(count):
            self.fh.seek(k * self.plane + s.start * nx * self.dtype.itemsize)
            out[k] = np.fromfile(self.fh, dtype=self.dtype, count=n * nx).reshape(n, nx)
        return out

    def close(self) -> None:
        self.fh.close()


def coadd_images(exposures: Iterable[Image], wcs: WCS, shape: tuple[int, int], *,
                 count: int | None = None, sigma: float = CLIP_SIGMA,
                 workdir: str | os.PathLike | None = None, progress: bool = False) -> Coadd:
    """Resample every exposure onto ``(wcs, shape)`` and combine them (module docstring).

    Parameters
    ----------
    exposures : iterable of rtcnn.io.Image
        Read lazily, one at a time (a generator keeps memory bounded); each needs a WCS.
    wcs, shape
        The output grid (:func:`north_up_grid`, :func:`first_grid`).
    count : int, optional
        Number of exposures when ``exposures`` has no ``len`` (sizes the stack).
    sigma : float
        Rejection threshold (expected sigma).
    workdir : path-like, optional
        Where the temporary stack goes (default: the system temporary folder).
    progress : bool
        tqdm progress bars.

    Returns
    -------
    Coadd
    """
    from tqdm.auto import tqdm

    if count is None:
        try:
            count = len(exposures)  # type: ignore[arg-type]
        except TypeError:
            exposures = list(exposures)
            count = len(exposures)
    if count < 1:
        raise RtcnnInputError(None, "no exposures to coadd")
    ny, nx = shape
    with tempfile.TemporaryDirectory(prefix=".rtcnn-coadd-", dir=workdir) as tmp:
        stack = _Stack(Path(tmp) / "stack.f32", np.float32, (ny, nx))
        cover = _Stack(Path(tmp) / "cover.u8", np.uint8, (ny, nx))
        weights, sig2s, exptimes = [], [], []
        first = None
        k = -1
        for k, img in enumerate(tqdm(exposures, total=count, desc="resample", unit="exp",
                                     disable=not progress)):
            if k >= count:
                raise ValueError("more exposures than count")
            first = img if first is None else first
            scale = zeropoint_scale(img, first)
            src_wcs = img.require_wcs("resample it onto the coadd grid")
            sx, sy = pixel_map(wcs, src_wcs, shape)
            data, uncovered = resample(img.data, sx, sy, shape, bad=img.mask)
            if scale != 1.0:
                data *= np.float32(scale)
            sig = subsample_sigma(np.where(uncovered, np.nan, data))
            if not (math.isfinite(sig) and sig > 0):
                raise RtcnnInputError(img.path, "has no measurable background noise")
            stack.write(k, data)
            cover.write(k, ~uncovered)
            weights.append(1.0 / sig**2)
            sig2s.append(sig**2)
            exptimes.append(None if img.exptime is None else img.exptime / scale)
            del data, uncovered
        n = k + 1
        if n < count:
            raise RtcnnInputError(None, f"expected {count} exposures, got {n}")
        w = np.asarray(weights)
        sig2 = float(np.mean(sig2s))
        t_mean = (float(np.mean(exptimes)) if all(t is not None for t in exptimes) else None)
        out = np.empty((ny, nx), np.float32)
        var = np.empty((ny, nx), np.float32)
        nexp = np.empty((ny, nx), np.int16)
        wht = np.empty((ny, nx), np.float32)
        rows = max(1, int(BLOCK_BYTES // (count * nx * 4 * 3)))
        n_rej = 0
        for y0 in tqdm(range(0, ny, rows), desc="combine", unit="block", disable=not progress):
            s = slice(y0, min(ny, y0 + rows))
            m, v, c, ws, r = combine(stack.rows(s, count), cover.rows(s, count).astype(bool),
                                     w, sig2, t_mean, sigma)
            out[s], var[s], nexp[s], wht[s] = m, v, c, ws
            n_rej += r
        stack.close()
        cover.close()
    total_t = sum(exptimes) if all(t is not None for t in exptimes) else None
    log.info("coadd of %d exposures: %d pixel values rejected (%.3g%%)", count, n_rej,
             100.0 * n_rej / max(1, count * ny * nx))
    return Coadd(data=out, variance=var, nexp=nexp, weight=wht, wcs=wcs,
                 zeropoint=first.zeropoint, exptime=total_t, n_input=count, n_rejected=n_rej,
                 band=first.band)


def coadd_header(c: Coadd) -> fits.Header:
    """Primary header of a coadd: WCS, zero point, exposure time, band, counts."""
    hdr = c.wcs.to_header()
    hdr["BUNIT"] = ("electron/s", "pixel unit (of the first exposure)")
    if c.zeropoint is not None:
        hdr["MAGZP"] = (c.zeropoint, "[mag] AB magnitude of 1 unit (first exposure)")
    if c.exptime is not None:
        hdr["EXPTIME"] = (c.exptime, "[s] sum of the exposure times")
    if c.band:
        hdr["BAND"] = (c.band, "Roman WFI filter")
    hdr["NCOMBINE"] = (c.n_input, "exposures combined")
    hdr["NREJECT"] = (c.n_rejected, "pixel values rejected as outliers")
    hdr["COADD"] = ("rtcnn.coadd", "spline resampling, sigma_clip, weighted mean")
    hdr["CLIPSIG"] = (CLIP_SIGMA, "rejection threshold, expected sigma")
    return hdr


def write_coadd(c: Coadd, path: str | os.PathLike, overwrite: bool = False,
                inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write a coadd (primary image + ``VAR``, ``NEXP``, ``WHT`` planes) atomically
    (:func:`rtcnn.io.pairdir.atomic_write`: never over an input, nor over an existing file
    without ``overwrite``)."""
    wcs_hdr = c.wcs.to_header()
    hdul = fits.HDUList([
        fits.PrimaryHDU(c.data, header=coadd_header(c)),
        fits.ImageHDU(c.variance, header=wcs_hdr, name="VAR"),
        fits.ImageHDU(c.nexp, header=wcs_hdr, name="NEXP"),
        fits.ImageHDU(c.weight, header=wcs_hdr, name="WHT"),
    ])
    return atomic_write(path, overwrite, hdul.writeto, inputs)


# --------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m rtcnn.coadd", description=__doc__.splitlines()[0])
    p.add_argument("exposures", nargs="+", metavar="EPOCH.fits", help="exposures to combine")
    p.add_argument("-o", "--output", required=True, help="coadd FITS file to write")
    p.add_argument("--grid", default="north-up", choices=GRIDS,
                   help="north-up TAN grid on the first exposure's centre (default) or the "
                   "first exposure's own grid")
    p.add_argument("--size", type=int, default=None,
                   help="side of the north-up grid in px (default: the first exposure's "
                   "diagonal)")
    p.add_argument("--sigma", type=float, default=CLIP_SIGMA,
                   help=f"outlier rejection threshold in expected sigma (default {CLIP_SIGMA:g})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _lazy_images(paths: Sequence[Path]):
    for path in paths:
        yield read_image(path)


def run(args: argparse.Namespace) -> Path:
    """Build and write the coadd of ``args``; returns the output path."""
    out = Path(args.output)
    paths = [Path(p) for p in args.exposures]
    check_output(out, args.overwrite, paths)  # before any work
    if args.size is not None and args.size < 1:
        raise RtcnnInputError(None, f"--size must be >= 1, got {args.size}")
    if not args.sigma > 0:
        raise RtcnnInputError(None, f"--sigma must be > 0, got {args.sigma}")
    if args.size is not None and args.grid != "north-up":
        raise RtcnnInputError(None, "--size applies to --grid north-up only")
    first = read_image(paths[0])
    for p in paths[1:]:  # fail before any work on a missing/unreadable file
        read_image(p).require_wcs("resample it onto the coadd grid")
    wcs, shape = (north_up_grid(first, args.size) if args.grid == "north-up"
                  else first_grid(first))
    c = coadd_images(_lazy_images(paths), wcs, shape, count=len(paths), sigma=args.sigma,
                     workdir=out.parent, progress=not args.no_progress)
    return write_coadd(c, out, overwrite=args.overwrite, inputs=paths)


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.coadd``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
