"""Put the reference on the new image's pixel grid: grid test, resampling, zero point, mask.

A survey never gives two images on one pixel grid: every visit has its own dither and
roll, and a reference is a coadd on a sky-tile grid. :func:`align_pair` takes a
reference and a new :class:`rtcnn.io.Image` and returns the reference *on the new
image's grid*, scaled to the new image's AB zero point, with the pixels it does not
cover masked. Everything downstream (difference image, detector, catalogs) then works in
the new image's pixels; catalogs are in the new image's grid and RA/Dec.

Steps
-----
1. **Same grid?** (:func:`rtcnn.io.fits.grid_offset`, also used by
   :func:`rtcnn.io.read_pair` to refuse a pair on two grids) The new image's four corners and centre are
   mapped through the new WCS to the sky and back through the reference WCS
   (:func:`astropy.wcs.utils.pixel_to_pixel`, which includes SIP distortion). The grids
   are the same when the shapes agree and no point moves by more than
   :data:`GRID_TOLERANCE` = 0.01 px; such a pair is *not touched* (bit-identical data).
   A pure integer shift (a larger coadd cut on the same grid) is a crop, no
   interpolation. Without a WCS on either image a same-shape pair is taken as one grid
   (there is nothing to compare, and it is logged); a pair of different shapes is a
   one-line :class:`~rtcnn.errors.RtcnnInputError`.
2. **Pixel map** (:func:`pixel_map`): the exact WCS transform new pixel -> reference pixel
   is evaluated on a coarse grid of nodes every :data:`MAP_STEP` px (4088^2 px: 33^2
   nodes) and interpolated to every pixel with a bicubic spline
   (:class:`scipy.interpolate.RectBivariateSpline`). The transform between two Roman
   TAN-SIP WCSs is smooth on scales of hundreds of pixels; the spline reproduces the
   full per-pixel WCS transform of ``reproject`` to < 1e-3 px (``tests/test_align.py``
   checks it; on a real Roman TAN-SIP 4088^2 image against a north-up TAN coadd the
   largest difference from :func:`astropy.wcs.utils.pixel_to_pixel` over 20000 random
   pixels is 6e-9 px), at a fraction of the cost (the full transform of 16.7 M pixels
   through two SIP WCSs and the sky takes several seconds and ~2 GB).
3. **Astrometric residual** (:func:`measure_offset`): real WCSs disagree by tenths of a
   pixel. Bright, isolated peaks of the new image are centroided
   (:func:`~photutils.centroids.centroid_com` in a :data:`CENTROID_BOX` box) in the new
   image and, at their mapped positions, in the reference; matches must hold the same
   light in both images (no cosmic rays, transients or variables); the sigma-clipped mean
   difference (reference pixels) is the residual offset. It is applied to the map when at
   least :data:`MIN_STARS` peaks were matched and it exceeds both three times its own
   error and :data:`MIN_CORRECTION_PX` (smaller offsets are the PSF's light centroid
   moving with the roll, not a WCS error); it is reported either way (``align_dx``,
   ``align_dy``, ``align_nstars`` in the metadata).
4. **Resampling** (:func:`resample`): the reference is interpolated at the mapped
   positions with a cubic B-spline (``scipy.ndimage.map_coordinates``, ``order=3``,
   after one :func:`scipy.ndimage.spline_filter`) -- the same interpolation as
   :func:`reproject.reproject_interp` with ``order='bicubic'``, which it matches to
   float32 precision (tested), done in row blocks on :data:`THREADS` threads so memory
   stays bounded.

   *Why interpolation and not* ``reproject_adaptive(conserve_flux=True)`` *or
   spherical-polygon* ``reproject_exact``: both images are Roman WFI images with the
   same 0.11"/px pixels, so a pixel's value is a surface brightness that an
   interpolation preserves (a source's total flux is conserved to the pixel-area ratio,
   1 +- 1e-3 across an SCA). ``conserve_flux`` is needed only when the pixel areas
   differ, and the adaptive (anti-aliasing) kernel and exact polygon overlap both
   *smooth* the reference by ~a pixel, which widens the already undersampled Roman PSF
   (FWHM 1.1-1.7 px) and leaves dipoles at every star of the difference. A cubic spline
   keeps the PSF nearly intact; bilinear (``reproject_interp``'s default) would widen it.
   Resampling correlates the reference's noise (per-pixel variance falls by up to ~40 %
   at half-pixel phases); the noise models downstream measure the difference image's
   noise robustly, and the resampled variance plane is returned when the file has one.
5. **Coverage**: new pixels whose reference position lies outside the reference (or
   within :data:`EDGE_PX` px of its edge, where the spline has no support), or within
   the spline's reach of a bad (NaN/masked) reference pixel, are masked: no candidates
   there. The masked fraction is reported (``align_uncovered``).
6. **Zero point**: the reference is multiplied by ``10**(0.4 (zp_new - zp_ref))`` and
   takes the new image's zero point; its ``exptime`` (the Poisson gain of the noise
   models) is divided by the same factor. Without both zero points nothing is scaled
   (logged).

Variance planes: a reference file with a ``VAR``/``VARIANCE`` (or ``ERR``, squared)
image extension has that plane resampled (bilinear, conservative: interpolation lowers
the variance) and scaled with the image; it comes back as ``AlignInfo.ref_variance``
(``None`` otherwise, and the downstream robust noise model applies).

Memory (4088^2, float32): the spline coefficients (64 MB), the output (64 MB), the
coverage mask (17 MB) and one row block of coordinates (:data:`BLOCK_ROWS` rows,
~4 MB per thread); the inputs are memory maps.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import pixel_to_pixel

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import GRID_TOLERANCE, Image, grid_offset, read_pair

log = logging.getLogger(__name__)

MAP_STEP = 128  # px, spacing of the nodes where the WCS transform is evaluated exactly
SPLINE_ORDER = 3  # cubic B-spline interpolation of the reference
EDGE_PX = 1.0  # px, reference border where the cubic spline lacks support (masked)
BLOCK_ROWS = 256  # output rows per resampling block (bounds the coordinate memory)
CROP_MARGIN = 12  # px of reference kept around the mapped area before the spline filter
THREADS = 2  # threads for the spline filter and the resampling (scipy releases the GIL)
CENTROID_BOX = 7  # px, side of the centroid box (odd)
MIN_STARS = 5  # matched peaks needed to apply an astrometric correction
#: px: smaller measured offsets are not applied. On simulated survey pairs (exact WCSs)
#: the measured offsets reach 0.08 px at 3-5 sigma -- the Roman PSF's light centroid
#: moves with the roll -- and applying them made the star residuals of the difference
#: worse (sum of squares +1 % to +80 % on 4 survey pairs, /tmp measurement in the report).
MIN_CORRECTION_PX = 0.1
MAX_STARS = 100  # brightest isolated peaks used for the astrometric residual
STAR_SNR = 30.0  # peak pixel / robust sigma of a peak used for the astrometric residual
ISOLATION_PX = 8.0  # px, no brighter peak within this distance
MAX_SHIFT_PX = 1.5  # px, centroid shifts larger than this are mismatches (dropped)
FLUX_RATIO_TOL = 1.5  # a match's ref/new box-flux ratio is within this factor of the median
VARIANCE_EXTNAMES = ("VAR", "VARIANCE", "WHT_VAR")  # reference variance planes
ERROR_EXTNAMES = ("ERR", "ERROR", "SIGMA")  # reference 1-sigma planes (squared on read)

__all__ = [
    "GRID_TOLERANCE",
    "AlignInfo",
    "align_pair",
    "bright_peaks",
    "grid_offset",
    "measure_offset",
    "pix2pix",
    "pixel_map",
    "read_aligned_pair",
    "resample",
    "subsample_sigma",
    "write_aligned_reference",
    "zeropoint_scale",
]


@dataclass
class AlignInfo:
    """What :func:`align_pair` did to the reference.

    Attributes
    ----------
    method : str
        ``'same-grid'`` (untouched), ``'crop'`` (integer shift, no interpolation),
        ``'spline3'`` (resampled), or ``'no-wcs'`` (same shape, no WCS to compare).
    grid_offset_px : float
        Largest disagreement of the two WCSs at the new image's corners and centre, px
        (NaN without WCS).
    uncovered_fraction : float
        Fraction of new-image pixels with no reference coverage (masked), 0..1.
    zp_scale : float
        Factor the reference was multiplied by to reach the new image's zero point.
    dx, dy : float
        Measured residual astrometric offset (reference px, along the reference's axes,
        reference minus WCS prediction); NaN when not measured.
    dx_err, dy_err : float
        Their errors (px).
    nstars : int
        Peaks matched for the offset.
    offset_applied : bool
        Whether ``(dx, dy)`` was added to the pixel map.
    seconds : float
        Wall time of the alignment.
    ref_variance : (ny, nx) float32 ndarray or None
        The reference's variance plane on the new grid ((new image units)^2), when the
        reference file has one (a property: computed on first use from
        ``variance_source``).
    """

    method: str
    grid_offset_px: float = math.nan
    uncovered_fraction: float = 0.0
    zp_scale: float = 1.0
    dx: float = math.nan
    dy: float = math.nan
    dx_err: float = math.nan
    dy_err: float = math.nan
    nstars: int = 0
    offset_applied: bool = False
    seconds: float = 0.0
    variance_source: object = field(default=None, repr=False)

    @property
    def ref_variance(self) -> np.ndarray | None:
        """The reference's variance plane on the new grid, read and resampled on first use
        (it costs as much as the image's resampling, and only some callers want it)."""
        if callable(self.variance_source):
            self.variance_source = self.variance_source()
        return self.variance_source

    @property
    def resampled(self) -> bool:
        """True when the reference's pixels were interpolated."""
        return self.method == "spline3"

    def meta(self) -> dict:
        """Catalog metadata (``align_*`` keys, plain floats / ints / str)."""
        def f(v):
            return None if not math.isfinite(v) else round(float(v), 5)

        return {
            "align_method": self.method, "align_grid_offset_px": f(self.grid_offset_px),
            "align_uncovered": round(float(self.uncovered_fraction), 6),
            "align_zp_scale": float(self.zp_scale), "align_dx": f(self.dx),
            "align_dy": f(self.dy), "align_dx_err": f(self.dx_err),
            "align_dy_err": f(self.dy_err), "align_nstars": int(self.nstars),
            "align_offset_applied": bool(self.offset_applied),
            "align_seconds": round(float(self.seconds), 3),
        }  # fmt: skip


# --------------------------------------------------------------------------- geometry


def pixel_map(new_wcs: WCS, ref_wcs: WCS, new_shape: tuple[int, int],
              step: int = MAP_STEP):
    """Spline of the new-pixel -> reference-pixel transform, exact at a grid of nodes.

    Parameters
    ----------
    new_wcs, ref_wcs : astropy.wcs.WCS
    new_shape : (ny, nx)
    step : int
        Node spacing in px (nodes at both ends of each axis).

    Returns
    -------
    (spline_x, spline_y) : two :class:`scipy.interpolate.RectBivariateSpline`
        ``spline_x(y, x)`` / ``spline_y(y, x)``: reference pixel x / y (0-based) of the
        new-image pixel ``(x, y)``; call with ``grid=True`` on row/column vectors.
    """
    from scipy.interpolate import RectBivariateSpline

    ny, nx = new_shape
    gx = np.linspace(0.0, nx - 1.0, max(4, math.ceil((nx - 1) / step) + 1))
    gy = np.linspace(0.0, ny - 1.0, max(4, math.ceil((ny - 1) / step) + 1))
    mx, my = np.meshgrid(gx, gy)
    xr, yr = pix2pix(new_wcs, ref_wcs, mx.ravel(), my.ravel())
    xr, yr = xr.reshape(mx.shape), yr.reshape(mx.shape)
    if not (np.isfinite(xr).all() and np.isfinite(yr).all()):
        raise RtcnnInputError(None, "the reference WCS cannot map the new image's pixels "
                              "(the images do not overlap on the sky)")
    return (RectBivariateSpline(gy, gx, xr, kx=3, ky=3),
            RectBivariateSpline(gy, gx, yr, kx=3, ky=3))


def _filtered(out: np.ndarray, threads: int) -> np.ndarray:
    """Cubic B-spline coefficients of the float32 C-contiguous ``out``, computed in place in
    row/column blocks on threads; returns ``out``."""
    from scipy.ndimage import spline_filter1d

    ny, nx = out.shape

    def rows(s):  # filter along x, a block of rows, in place
        out[s] = spline_filter1d(out[s], SPLINE_ORDER, axis=1, output=np.float32,
                                 mode="mirror")

    def cols(s):  # filter along y, a block of columns, in place
        out[:, s] = spline_filter1d(out[:, s], SPLINE_ORDER, axis=0, output=np.float32,
                                    mode="mirror")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(rows, [slice(i, i + BLOCK_ROWS) for i in range(0, ny, BLOCK_ROWS)]))
        list(pool.map(cols, [slice(i, i + BLOCK_ROWS) for i in range(0, nx, BLOCK_ROWS)]))
    return out


def resample(data: np.ndarray, spline_x, spline_y, out_shape: tuple[int, int],
             offset: tuple[float, float] = (0.0, 0.0), bad: np.ndarray | None = None,
             threads: int = THREADS) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate ``data`` (reference grid) at the mapped positions of every output pixel.

    Parameters
    ----------
    data : (ny_ref, nx_ref) array
        Reference pixels; non-finite values must be flagged in ``bad`` (they are set to 0
        before the spline filter, which would otherwise spread them everywhere).
    spline_x, spline_y
        From :func:`pixel_map`.
    out_shape : (ny, nx)
        The new image's shape.
    offset : (dx, dy)
        Added to the mapped reference positions (px), the astrometric correction.
    bad : (ny_ref, nx_ref) bool array, optional
        Bad reference pixels.
    threads : int
        Worker threads (row blocks).

    Returns
    -------
    image : (ny, nx) float32
        The reference on the output grid (0 where uncovered).
    uncovered : (ny, nx) bool
        Output pixels outside the reference (or within :data:`EDGE_PX` of its edge) or
        within two pixels of a bad reference pixel.
    """
    from scipy.ndimage import map_coordinates, maximum_filter

    ny_ref, nx_ref = data.shape
    ny, nx = out_shape
    # only the part of the reference that the output maps onto is filtered (a coadd is
    # larger than the new image); CROP_MARGIN px more keep the crop's edge out of reach
    # of the spline prefilter (its influence falls as 0.268^n: 1e-7 at 12 px)
    sx = spline_x(np.linspace(0, ny - 1, 65), np.linspace(0, nx - 1, 65)) + offset[0]
    sy = spline_y(np.linspace(0, ny - 1, 65), np.linspace(0, nx - 1, 65)) + offset[1]
    x0 = int(np.clip(math.floor(sx.min()) - CROP_MARGIN, 0, nx_ref))
    x1 = int(np.clip(math.ceil(sx.max()) + CROP_MARGIN + 1, x0, nx_ref))
    y0c = int(np.clip(math.floor(sy.min()) - CROP_MARGIN, 0, ny_ref))
    y1 = int(np.clip(math.ceil(sy.max()) + CROP_MARGIN + 1, y0c, ny_ref))
    src = np.array(data[y0c:y1, x0:x1], dtype=np.float32)  # native copy, filtered in place
    if src.size == 0:
        raise RtcnnInputError(None, "the reference does not overlap the new image")
    bad_near = None
    if bad is not None and bad[y0c:y1, x0:x1].any():
        sub_bad = bad[y0c:y1, x0:x1]
        src[sub_bad] = 0.0
        # pixels within the cubic spline's reach (+-2 px) of a bad one: a 5x5 maximum
        # (separable, unlike a binary dilation)
        bad_near = maximum_filter(sub_bad.view(np.uint8), size=5, mode="constant")
    coef = _filtered(src, threads)
    out = np.empty((ny, nx), dtype=np.float32)
    uncovered = np.empty((ny, nx), dtype=bool)
    xs = np.arange(nx, dtype=np.float64)

    def block(y0: int) -> None:
        ys = np.arange(y0, min(ny, y0 + BLOCK_ROWS), dtype=np.float64)
        xr = spline_x(ys, xs, grid=True) + offset[0]
        yr = spline_y(ys, xs, grid=True) + offset[1]
        s = slice(y0, y0 + ys.size)
        outside = ((xr < EDGE_PX) | (xr > nx_ref - 1 - EDGE_PX)
                   | (yr < EDGE_PX) | (yr > ny_ref - 1 - EDGE_PX))
        coords = np.stack([yr - y0c, xr - x0]).astype(np.float32)
        map_coordinates(coef, coords, order=SPLINE_ORDER, prefilter=False, mode="constant",
                        cval=0.0, output=out[s])
        if bad_near is not None:
            near = map_coordinates(bad_near, coords, order=0, mode="constant", cval=1)
            outside |= near.astype(bool)
        uncovered[s] = outside
        out[s][outside] = 0.0

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(block, range(0, ny, BLOCK_ROWS)))
    return out, uncovered


# --------------------------------------------------------------------------- astrometry


def subsample_sigma(data: np.ndarray, step: int = 7) -> float:
    """Robust noise (:func:`astropy.stats.mad_std`) of every ``step``-th finite pixel."""
    from astropy.stats import mad_std

    sub = np.asarray(data).ravel()[::step]
    sub = sub[np.isfinite(sub)]
    return float(mad_std(sub)) if sub.size else math.nan


def bright_peaks(data: np.ndarray, snr: float = STAR_SNR, max_peaks: int = MAX_STARS,
                 isolation: float = ISOLATION_PX, border: int = CENTROID_BOX):
    """Bright, isolated local maxima of an image, brightest first.

    Only pixels above ``snr`` x the robust noise are looked at (no full-image filter):
    a pixel is a peak when it exceeds its 8 neighbours. Peaks within ``isolation`` px of
    a brighter one are dropped, and those within ``border`` px of the edge.

    Returns
    -------
    (x, y) : (n,) int arrays, 0-based px
    """
    arr = np.asarray(data)
    sigma = subsample_sigma(arr)
    if not math.isfinite(sigma) or sigma <= 0:
        return np.zeros(0, int), np.zeros(0, int)
    ny, nx = arr.shape
    with np.errstate(invalid="ignore"):
        iy, ix = np.nonzero(arr[border:ny - border, border:nx - border] > snr * sigma)
    iy, ix = iy + border, ix + border
    if iy.size == 0:
        return ix, iy
    v = arr[iy, ix]
    peak = np.ones(iy.size, dtype=bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dx or dy:
                peak &= v > arr[iy + dy, ix + dx]
    iy, ix, v = iy[peak], ix[peak], v[peak]
    order = np.argsort(-v)
    iy, ix = iy[order], ix[order]
    keep = []
    for k in range(iy.size):  # brightest first; drop a peak near a brighter kept one
        if len(keep) >= max_peaks:
            break
        if keep:
            kk = np.asarray(keep)
            if np.min(np.hypot(ix[kk] - ix[k], iy[kk] - iy[k])) < isolation:
                continue
        keep.append(k)
    keep = np.asarray(keep, dtype=int)
    return ix[keep], iy[keep]


def _centroids(data: np.ndarray, x, y) -> tuple[np.ndarray, np.ndarray]:
    """photutils centre-of-mass centroids (:func:`~photutils.centroids.centroid_com`) in a
    :data:`CENTROID_BOX` box centred on the pixel nearest each ``(x, y)`` (the boxes of
    :func:`~photutils.centroids.centroid_sources`, cut here so that only the boxes, not the
    whole image, are copied and cleaned of NaN); NaN where a box leaves the image."""
    from photutils.centroids import centroid_com

    arr = np.asarray(data)
    ny, nx = arr.shape
    h = CENTROID_BOX // 2
    cx, cy = np.full(len(x), np.nan), np.full(len(x), np.nan)
    for k, (xi, yi) in enumerate(zip(np.asarray(x, float), np.asarray(y, float))):
        if not (math.isfinite(xi) and math.isfinite(yi)):
            continue
        ix, iy = round(xi), round(yi)
        if ix - h < 0 or iy - h < 0 or ix + h >= nx or iy + h >= ny:
            continue
        box = np.array(arr[iy - h:iy + h + 1, ix - h:ix + h + 1], dtype=np.float64)
        bad = ~np.isfinite(box)
        if bad.any():
            box[bad] = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bx, by = centroid_com(box)
        cx[k], cy[k] = ix - h + bx, iy - h + by
    return cx, cy


def pix2pix(wcs_from: WCS, wcs_to: WCS, x, y) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of ``wcs_from`` -> those of ``wcs_to`` (float64 arrays).

    Through :meth:`~astropy.wcs.WCS.all_pix2world` / ``all_world2pix`` (SIP included)
    when both WCSs use the same celestial frame, else through
    :func:`astropy.wcs.utils.pixel_to_pixel` (with the frame transformation); the fast
    path skips building SkyCoord objects, which costs more than the transform itself on
    a few thousand points.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    a, b = wcs_from.wcs, wcs_to.wcs
    same = (list(a.ctype) == list(b.ctype) and str(a.radesys) == str(b.radesys)
            and (a.equinox == b.equinox or (math.isnan(a.equinox) and math.isnan(b.equinox))))
    if not same:
        xr, yr = pixel_to_pixel(wcs_from, wcs_to, x, y)
        return np.asarray(xr, float), np.asarray(yr, float)
    ra, dec = wcs_from.all_pix2world(x, y, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr, yr = wcs_to.all_world2pix(ra, dec, 0, tolerance=1e-6, maxiter=50, quiet=True)
    return np.asarray(xr, float), np.asarray(yr, float)


def measure_offset(ref_data: np.ndarray, new_data: np.ndarray, new_wcs: WCS, ref_wcs: WCS,
                   ) -> tuple[float, float, float, float, int]:
    """Residual astrometric offset of the reference WCS relative to the new one.

    Bright isolated peaks of the new image (:func:`bright_peaks`) are centroided there
    (:func:`_centroids`, twice: the second box centred on the first centroid); their
    positions are mapped through both WCSs into the reference and centroided there the same
    way. A match must hold about the same light in both images (the box sums' ratio within
    a factor :data:`FLUX_RATIO_TOL` of the median ratio: cosmic rays, transients and
    variables of one image are not matches) and move by less than :data:`MAX_SHIFT_PX`.
    The offset is the 3-sigma-clipped mean of ``centroid_ref - mapped(centroid_new)``
    (:func:`astropy.stats.sigma_clipped_stats`), its error the clipped standard deviation
    over ``sqrt(n)``.

    Returns
    -------
    (dx, dy, dx_err, dy_err, n) : floats in reference px, and the number of matches
        NaN offsets when ``n == 0``.
    """
    from astropy.stats import sigma_clipped_stats

    ix, iy = bright_peaks(new_data)
    cx, cy = _centroids(new_data, *_centroids(new_data, ix, iy))
    ok = np.isfinite(cx) & np.isfinite(cy)
    if ok.sum() == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    cx, cy = cx[ok], cy[ok]
    mx, my = pix2pix(new_wcs, ref_wcs, cx, cy)
    rx, ry = _centroids(ref_data, *_centroids(ref_data, mx, my))
    f_new, f_ref = _box_sums(new_data, cx, cy), _box_sums(ref_data, rx, ry)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = f_ref / f_new
    dx, dy = rx - mx, ry - my
    sel = np.isfinite(dx) & np.isfinite(dy) & np.isfinite(ratio) & (ratio > 0)
    sel &= np.hypot(np.where(sel, dx, 0), np.where(sel, dy, 0)) < MAX_SHIFT_PX
    if sel.sum() == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    med = np.median(ratio[sel])
    sel &= (ratio > med / FLUX_RATIO_TOL) & (ratio < med * FLUX_RATIO_TOL)
    dx, dy = dx[sel], dy[sel]
    n = int(dx.size)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean_x, _, std_x = sigma_clipped_stats(dx, sigma=3.0)
    mean_y, _, std_y = sigma_clipped_stats(dy, sigma=3.0)
    return (float(mean_x), float(mean_y), float(std_x) / math.sqrt(n),
            float(std_y) / math.sqrt(n), n)


def _box_sums(data: np.ndarray, x, y) -> np.ndarray:
    """Sum of the :data:`CENTROID_BOX` box at the pixel nearest each ``(x, y)`` (NaN off the
    image or where a box has a non-finite pixel)."""
    arr = np.asarray(data)
    ny, nx = arr.shape
    h = CENTROID_BOX // 2
    out = np.full(len(x), np.nan)
    for k, (xi, yi) in enumerate(zip(np.asarray(x, float), np.asarray(y, float))):
        if not (math.isfinite(xi) and math.isfinite(yi)):
            continue
        ix, iy = round(xi), round(yi)
        if h <= ix < nx - h and h <= iy < ny - h:
            out[k] = float(np.sum(arr[iy - h:iy + h + 1, ix - h:ix + h + 1], dtype=np.float64))
    return out


# --------------------------------------------------------------------------- pair


def zeropoint_scale(ref: Image, new: Image) -> float:
    """Factor that puts the reference on the new image's AB zero point: ``10**(0.4 (zp_new - zp_ref))``.

    1.0 (and a logged warning if they might differ) when either zero point is unknown.
    """
    if ref.zeropoint is None or new.zeropoint is None:
        if ref.zeropoint != new.zeropoint:
            log.warning("%s: zero point unknown on one image; the reference is not rescaled",
                        new.path)
        return 1.0
    return float(10.0 ** (0.4 * (new.zeropoint - ref.zeropoint)))


def _variance_plane(ref: Image) -> np.ndarray | None:
    """The reference's variance plane from its file (``VAR``... or ``ERR``... squared)."""
    if ref.path is None or not Path(ref.path).is_file():
        return None
    try:
        with fits.open(ref.path, memmap=True) as hdul:
            names = [h.name.upper() for h in hdul]
            for group, square in ((VARIANCE_EXTNAMES, False), (ERROR_EXTNAMES, True)):
                for name in group:
                    if name in names:
                        plane = np.array(hdul[names.index(name)].data, dtype=np.float32)
                        if plane.shape != ref.shape:
                            raise RtcnnInputError(ref.path, f"{name} plane has shape "
                                                  f"{plane.shape}, the image {ref.shape}")
                        return plane * plane if square else plane
    except OSError:
        return None
    return None


def _with(img: Image, **changes) -> Image:
    return replace(img, **changes)


def align_pair(ref: Image, new: Image, *, tolerance: float = GRID_TOLERANCE,
               correct_offset: bool = True, threads: int = THREADS
               ) -> tuple[Image, Image, AlignInfo]:
    """Put ``ref`` on ``new``'s pixel grid and zero point (see the module docstring).

    Parameters
    ----------
    ref, new : rtcnn.io.Image
        Reference and new image (any shapes; celestial WCSs when the grids differ).
    tolerance : float
        px; WCSs agreeing this well at the new image's corners are one grid.
    correct_offset : bool
        Measure the residual astrometric offset on bright peaks and apply it.
    threads : int
        Threads for the resampling.

    Returns
    -------
    ref_on_new : rtcnn.io.Image
        Shape and WCS of ``new``; float32 data scaled to ``new.zeropoint``; ``mask`` =
        the reference's bad pixels and the uncovered ones. *The same object* when the
        grids and zero points agree (bit-identical).
    new : rtcnn.io.Image
        ``new``, unchanged.
    info : AlignInfo

    Raises
    ------
    RtcnnInputError
        Different shapes and a WCS missing on either image (naming the file), or WCSs
        that do not overlap.
    """
    t0 = time.perf_counter()
    scale = zeropoint_scale(ref, new)
    if ref.wcs is None or new.wcs is None:
        if ref.shape != new.shape:
            missing = ref if ref.wcs is None else new
            why = missing.wcs_problem or "the header has no celestial WCS"
            raise RtcnnInputError(
                missing.path, f"{why}; the reference ({_shape(ref)}) and the new image "
                f"({_shape(new)}) are on different pixel grids and a WCS on both is "
                "needed to align them")
        log.info("%s: no WCS on %s; same shape, taken as one pixel grid", new.path,
                 "either image" if ref.wcs is None and new.wcs is None else "one image")
        info = AlignInfo(method="no-wcs")
        return _scaled(ref, new, scale, info, t0), new, info
    offset, sx, sy = grid_offset(ref.wcs, new.wcs, new.shape)
    if offset <= tolerance:
        ix, iy = round(sx), round(sy)
        if ref.shape == new.shape and ix == 0 and iy == 0:
            info = AlignInfo(method="same-grid", grid_offset_px=offset)
            return _scaled(ref, new, scale, info, t0), new, info
        ny, nx = new.shape
        if 0 <= ix and 0 <= iy and ix + nx <= ref.shape[1] and iy + ny <= ref.shape[0]:
            data = np.asarray(ref.data[iy:iy + ny, ix:ix + nx])
            mask = None if ref.mask is None else ref.mask[iy:iy + ny, ix:ix + nx]
            info = AlignInfo(method="crop", grid_offset_px=offset,
                             uncovered_fraction=0.0 if mask is None else float(mask.mean()))

            def crop_variance(ref=ref, ix=ix, iy=iy, ny=ny, nx=nx):
                var = _variance_plane(ref)
                return None if var is None else var[iy:iy + ny, ix:ix + nx] * np.float32(
                    scale**2)

            info.variance_source = crop_variance
            cropped = _with(ref, data=data, mask=mask if mask is not None and mask.any()
                            else None, wcs=new.wcs)
            return _scaled(cropped, new, scale, info, t0), new, info
    spline_x, spline_y = pixel_map(new.wcs, ref.wcs, new.shape)
    info = AlignInfo(method="spline3", grid_offset_px=offset)
    shift = (0.0, 0.0)
    if correct_offset:
        dx, dy, ex, ey, n = measure_offset(ref.data, new.data, new.wcs, ref.wcs)
        info.dx, info.dy, info.dx_err, info.dy_err, info.nstars = dx, dy, ex, ey, n
        if n >= MIN_STARS and math.hypot(dx, dy) >= MIN_CORRECTION_PX and (
                abs(dx) > 3 * ex or abs(dy) > 3 * ey):
            shift, info.offset_applied = (dx, dy), True
    data, uncovered = resample(ref.data, spline_x, spline_y, new.shape, shift, ref.mask,
                               threads)
    if not uncovered.any():
        uncovered = None

    def resampled_variance():
        var = _variance_plane(ref)
        if var is None:
            return None
        return _resample_linear(var, spline_x, spline_y, new.shape, shift, ref.mask,
                                threads) * np.float32(scale**2)

    info.variance_source = resampled_variance
    info.uncovered_fraction = 0.0 if uncovered is None else float(uncovered.mean())
    header = ref.header.copy()
    header["ALIGNED"] = ("spline3", "resampled onto the new image's grid (rtcnn.align)")
    aligned = _with(ref, data=data, mask=uncovered, wcs=new.wcs, header=header)
    if info.uncovered_fraction == 1.0:
        raise RtcnnInputError(new.path, f"the reference ({ref.path}) does not cover any "
                              "pixel of the new image")
    log.info("%s: reference resampled onto the new grid (WCS offset %.2f px, residual "
             "(%.3f, %.3f) px from %d stars%s, %.2f%% uncovered)", new.path, offset, info.dx,
             info.dy, info.nstars, ", applied" if info.offset_applied else "",
             100 * info.uncovered_fraction)
    return _scaled(aligned, new, scale, info, t0), new, info


def _resample_linear(plane, spline_x, spline_y, shape, shift, bad, threads):
    """Bilinear resampling of a variance plane onto the new grid (0 where uncovered)."""
    from scipy.ndimage import map_coordinates

    ny, nx = shape
    out = np.zeros((ny, nx), dtype=np.float32)
    xs = np.arange(nx, dtype=np.float64)
    src = np.where(bad, 0.0, plane).astype(np.float32) if bad is not None else plane

    def block(y0):
        ys = np.arange(y0, min(ny, y0 + BLOCK_ROWS), dtype=np.float64)
        coords = np.stack([spline_y(ys, xs) + shift[1], spline_x(ys, xs) + shift[0]])
        map_coordinates(src, coords.astype(np.float32), order=1, mode="constant", cval=0.0,
                        output=out[y0:y0 + ys.size])

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(block, range(0, ny, BLOCK_ROWS)))
    return out


def _scaled(ref: Image, new: Image, scale: float, info: AlignInfo, t0: float) -> Image:
    """``ref`` on the new zero point (the same object when nothing changes)."""
    info.zp_scale = scale
    if info.variance_source is None and info.method in ("same-grid", "no-wcs"):

        def same_variance():
            var = _variance_plane(ref)
            return None if var is None else var * np.float32(scale**2)

        info.variance_source = same_variance
    out = ref
    if scale != 1.0:
        data = np.asarray(ref.data, dtype=np.float32) * np.float32(scale)
        out = _with(ref, data=data, zeropoint=new.zeropoint,
                    exptime=None if ref.exptime is None else ref.exptime / scale)
    info.seconds = time.perf_counter() - t0
    return out


def _shape(img: Image) -> str:
    ny, nx = img.shape
    return f"{nx} x {ny} px"


def read_aligned_pair(ref_path, new_path, hdu=None, memmap: bool = True, **kwargs
                      ) -> tuple[Image, Image, AlignInfo]:
    """:func:`rtcnn.io.read_pair` then :func:`align_pair`: the reference on the new grid.

    The one call commands use to read a pair; ``kwargs`` go to :func:`align_pair`.
    """
    ref, new = read_pair(ref_path, new_path, hdu=hdu, memmap=memmap, other_grid=True)
    return align_pair(ref, new, **kwargs)


def write_aligned_reference(ref_path, new_path, out_path, overwrite: bool = False
                            ) -> tuple[Path, AlignInfo]:
    """Write the reference of a pair resampled onto the new image's grid, as FITS.

    For readers that take tiles from files by path (the training data layer): the file
    has the new image's shape and WCS, the new image's zero point (``MAGZP``), NaN where
    the reference does not cover the new image or is bad, the alignment in ``ALIGN*``
    cards, and is written atomically (:func:`rtcnn.io.pairdir.atomic_write`).

    Returns
    -------
    (path, info) : pathlib.Path, AlignInfo
    """
    from rtcnn.io.pairdir import atomic_write

    ref, new, info = read_aligned_pair(ref_path, new_path)
    data = ref.filled(float("nan"))
    header = new.wcs.to_header(relax=True) if new.wcs is not None else fits.Header()
    for key in ("BUNIT", "BAND", "FILTER"):
        if key in ref.header:
            header[key] = ref.header[key]
    if ref.zeropoint is not None:
        header["MAGZP"] = (float(ref.zeropoint), "[mag] AB mag of 1 unit (the new image's)")
    if ref.exptime is not None:
        header["EXPTIME"] = (float(ref.exptime), "[s] effective exposure time")
    header["ALIGNED"] = (info.method, "rtcnn.align: reference on the new image's grid")
    header["ALIGNREF"] = (Path(ref_path).name, "reference file resampled")
    header["ALIGNNEW"] = (Path(new_path).name, "new image whose grid this is")
    for key, value in info.meta().items():
        card = "AL" + key.replace("align_", "").upper().replace("_", "")[:6]
        header[card] = value if not isinstance(value, float) or math.isfinite(value) else None
    hdu = fits.PrimaryHDU(data.astype(np.float32), header=header)
    path = atomic_write(out_path, overwrite, hdu.writeto, (ref_path, new_path))
    return Path(path), info
