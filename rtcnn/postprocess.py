"""From per-pixel network outputs to a list of sources (numpy/scipy, no torch).

A dense detector predicts, for every pixel of an image, a transient score, a
sub-pixel offset ``(dx, dy)`` from that pixel's centre to the source, a magnitude
difference and whether the source brightened. This module turns those maps into
sources:

1. :class:`TileStitcher` / :func:`stitch_tiles` — outputs computed on overlapping
   tiles (:mod:`rtcnn.tiles`) are assembled into one full-image map without seams:
   each image pixel is taken from the tile in which it lies furthest from the tile
   edge (``mode="owner"``), or the tiles are averaged with weights that fall to
   zero at the tile edge (``mode="blend"``).
2. :func:`find_peaks` — local maxima of the score map above a threshold.
3. :func:`nms` — greedy non-maximum suppression within a radius, so one source
   yields one detection even where two tiles disagree across a seam.
4. :func:`refine_positions` — sub-pixel positions from the offset map (or, with no
   offset map, from a 3x3 score-weighted centroid).
5. :func:`pixel_to_sky` — 0-based pixel positions to RA/Dec through the WCS.

:func:`extract_sources` runs steps 2-4 (and samples dmag and the sign) in one call.
Positions follow the package convention (:mod:`rtcnn`): 0-based, integer = pixel
centre, arrays ``[y, x]``, positions ``(x, y)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from rtcnn.errors import RtcnnInputError
from rtcnn.tiles import TILE_SIZE, TILE_STRIDE, edge_distance, tile_origins

PEAK_MIN_DISTANCE = 2  # px, half-width of the local-maximum window (a 5x5 box)
NMS_RADIUS = 3.0  # px, ~2 FWHM of the Roman PSF at 0.11"/px: closer peaks are one source
STITCH_MODES = ("owner", "blend")


# --------------------------------------------------------------------------- stitching
def _owned_intervals(starts: np.ndarray, length: int, size: int) -> dict[int, tuple[int, int]]:
    """Per-axis ownership: which local pixel range ``[lo, hi)`` each tile start keeps.

    A pixel ``p`` belongs to the tile whose pixel-edge distance
    ``min(p - s + 0.5, s + size - 0.5 - p)`` is largest (the first such tile on a tie).
    For tiles of equal size sorted by start the owner is monotonic in ``p``, so each
    tile owns one contiguous interval, and the intervals partition ``[0, length)``.
    """
    p = np.arange(length, dtype=np.float64)[:, None]
    s = starts[None, :].astype(np.float64)
    dist = np.minimum(p - s + 0.5, s + size - 0.5 - p)  # (length, n) <0 outside the tile
    owner = np.argmax(dist, axis=1)
    out = {}
    for i, start in enumerate(starts):
        idx = np.flatnonzero(owner == i)
        if idx.size == 0:  # a tile fully inside its neighbours' regions owns nothing
            out[int(start)] = (0, 0)
            continue
        out[int(start)] = (int(idx[0] - start), int(idx[-1] + 1 - start))
    return out


class TileStitcher:
    """Assemble per-tile maps, added batch by batch, into full-image maps.

    Parameters
    ----------
    shape : (ny, nx)
        Full image shape in px.
    channels : int
        Number of map channels per tile (e.g. 5 for score, dx, dy, dmag, sign).
    size : int
        Tile size in px.
    origins : (N, 2) int, optional
        The tile grid ``(x0, y0)``; default :func:`rtcnn.tiles.tile_origins` with
        ``size`` and ``stride``. It must be a product grid (every ``x0`` with every
        ``y0``), which is what :func:`~rtcnn.tiles.tile_origins` returns.
    stride : int
        Tile stride in px, used only when ``origins`` is None.
    mode : {"owner", "blend"}
        ``"owner"``: each pixel is copied from the tile in which it is furthest from
        the edge (the tiles' owned rectangles partition the image; exact, no
        averaging). ``"blend"``: weighted mean over all tiles covering the pixel with
        weight = pixel-edge distance to the tile edge (0.5 px at the outermost pixel).

    Notes
    -----
    Memory is one ``(channels, ny, nx)`` float32 array (plus a weight map in blend
    mode): a full 4088x4088 SCA with 5 channels takes 334 MB.
    """

    def __init__(
        self,
        shape: tuple[int, int],
        channels: int = 1,
        size: int = TILE_SIZE,
        origins: np.ndarray | None = None,
        stride: int = TILE_STRIDE,
        mode: str = "owner",
    ):
        if mode not in STITCH_MODES:
            raise RtcnnInputError(None, f"stitch mode {mode!r} is not one of {STITCH_MODES}")
        if channels < 1:
            raise RtcnnInputError(None, f"channels must be >= 1, got {channels}")
        ny, nx = (int(v) for v in shape)
        if origins is None:
            origins = tile_origins((ny, nx), size, stride)
        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        xs, ys = np.unique(origins[:, 0]), np.unique(origins[:, 1])
        if len(xs) * len(ys) != len(origins):
            raise RtcnnInputError(None, "tile origins do not form a product grid")
        if xs[0] < 0 or ys[0] < 0 or xs[-1] + size > nx or ys[-1] + size > ny:
            raise RtcnnInputError(None, f"tile origins reach outside the {ny}x{nx} image")
        if xs[0] != 0 or ys[0] != 0 or np.any(np.diff(xs) > size) or np.any(np.diff(ys) > size):
            raise RtcnnInputError(None, "tile grid leaves pixels uncovered")
        self.shape = (ny, nx)
        self.channels = int(channels)
        self.size = int(size)
        self.mode = mode
        self.origins = origins
        self._own_x = _owned_intervals(xs, nx, size)
        self._own_y = _owned_intervals(ys, ny, size)
        self._sum = np.zeros((self.channels, ny, nx), dtype=np.float32)
        self._filled = np.zeros((ny, nx), dtype=bool) if mode == "owner" else None
        if mode == "blend":
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
            self._w = edge_distance(np.stack([xx, yy], axis=-1), size).astype(np.float32)
            self._wsum = np.zeros((ny, nx), dtype=np.float32)

    def add(self, tile_maps: np.ndarray, origins: np.ndarray) -> None:
        """Add a batch of tile maps.

        Parameters
        ----------
        tile_maps : (B, C, size, size) or (B, size, size) float
            Per-tile maps (a torch tensor must be converted with ``.numpy()`` first).
        origins : (B, 2) int
            Tile origins ``(x0, y0)``, each one of the grid's origins.
        """
        maps = np.asarray(tile_maps, dtype=np.float32)
        if maps.ndim == 3:
            maps = maps[:, None]
        origins = np.asarray(origins, dtype=np.int64).reshape(-1, 2)
        s = self.size
        if maps.ndim != 4 or maps.shape[1:] != (self.channels, s, s):
            raise RtcnnInputError(
                None,
                f"tile maps have shape {tuple(np.shape(tile_maps))}, expected "
                f"(B, {self.channels}, {s}, {s})",
            )
        if len(maps) != len(origins):
            raise RtcnnInputError(None, f"{len(maps)} tile maps but {len(origins)} origins")
        for tile, (x0, y0) in zip(maps, origins):
            x0, y0 = int(x0), int(y0)
            if x0 not in self._own_x or y0 not in self._own_y:
                raise RtcnnInputError(None, f"tile origin ({x0}, {y0}) is not on the grid")
            if self.mode == "owner":
                lx0, lx1 = self._own_x[x0]
                ly0, ly1 = self._own_y[y0]
                win = (slice(y0 + ly0, y0 + ly1), slice(x0 + lx0, x0 + lx1))
                self._sum[(slice(None), *win)] = tile[:, ly0:ly1, lx0:lx1]
                self._filled[win] = True
            else:
                win = (slice(y0, y0 + s), slice(x0, x0 + s))
                self._sum[(slice(None), *win)] += tile * self._w
                self._wsum[win] += self._w

    def result(self) -> np.ndarray:
        """The stitched maps, ``(C, ny, nx) float32``; pixels no tile covered are NaN."""
        if self.mode == "owner":
            out = self._sum.copy()
            out[:, ~self._filled] = np.nan
            return out
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self._sum / self._wsum
        return out.astype(np.float32, copy=False)


def stitch_tiles(
    tile_maps: np.ndarray,
    origins: np.ndarray,
    shape: tuple[int, int],
    size: int | None = None,
    mode: str = "owner",
) -> np.ndarray:
    """Stitch per-tile maps of a whole grid into full-image maps in one call.

    Parameters
    ----------
    tile_maps : (N, C, size, size) or (N, size, size) float
        One map stack per tile, in the order of ``origins``.
    origins : (N, 2) int
        Tile origins ``(x0, y0)`` from :func:`rtcnn.tiles.tile_origins`.
    shape : (ny, nx)
        Image shape in px.
    size : int, optional
        Tile size; default the maps' last dimension.
    mode : {"owner", "blend"}
        See :class:`TileStitcher`.

    Returns
    -------
    full : (C, ny, nx) float32, or (ny, nx) when ``tile_maps`` was 3-D
    """
    maps = np.asarray(tile_maps, dtype=np.float32)
    squeeze = maps.ndim == 3
    if squeeze:
        maps = maps[:, None]
    if maps.ndim != 4:
        raise RtcnnInputError(None, f"tile maps must be 3-D or 4-D, got shape {maps.shape}")
    size = maps.shape[-1] if size is None else int(size)
    st = TileStitcher(shape, channels=maps.shape[1], size=size, origins=origins, mode=mode)
    st.add(maps, np.asarray(origins).reshape(-1, 2))
    full = st.result()
    return full[0] if squeeze else full


# --------------------------------------------------------------------------- peaks
def _check_map(arr: np.ndarray, name: str, ndim: int = 2) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != ndim:
        raise RtcnnInputError(None, f"{name} must be {ndim}-D, got shape {arr.shape}")
    return arr


def find_peaks(
    score_map: np.ndarray,
    threshold: float,
    min_distance: int = PEAK_MIN_DISTANCE,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local maxima of a score map at or above a threshold.

    A pixel is a peak when it equals the maximum of the ``(2 min_distance + 1)``
    square box around it (pixels beyond the image count as -inf) and its score is
    ``>= threshold``. Pixels of a flat plateau are all returned; :func:`nms` merges
    them. NaN scores and pixels where ``mask`` is True are never peaks.

    Parameters
    ----------
    score_map : (H, W) float
        Per-pixel score (e.g. transient probability, or S/N for the baseline).
    threshold : float
        Minimum score of a peak.
    min_distance : int
        Half-width of the local-maximum box in px (>= 1).
    mask : (H, W) bool, optional
        True = bad pixel, excluded.

    Returns
    -------
    ix, iy : (N,) int64
        Peak pixel columns and rows, sorted by decreasing score.
    score : (N,) float64
        Score at the peaks.
    """
    score_map = _check_map(score_map, "score map")
    if int(min_distance) < 1:
        raise RtcnnInputError(None, f"min_distance must be >= 1 px, got {min_distance}")
    work = np.where(np.isfinite(score_map), score_map, -np.inf).astype(np.float32, copy=False)
    if mask is not None:
        mask = _check_map(mask, "mask").astype(bool)
        if mask.shape != work.shape:
            raise RtcnnInputError(None, f"mask shape {mask.shape} != score map {work.shape}")
        work = np.where(mask, -np.inf, work)
    size = 2 * int(min_distance) + 1
    cand = work >= threshold
    if not cand.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=np.float64)
    local_max = ndimage.maximum_filter(work, size=size, mode="constant", cval=-np.inf)
    iy, ix = np.nonzero(cand & (work == local_max))
    score = work[iy, ix].astype(np.float64)
    order = np.lexsort((ix, iy, -score))  # by score, ties in raster order (deterministic)
    return ix[order].astype(np.int64), iy[order].astype(np.int64), score[order]


def nms(x: np.ndarray, y: np.ndarray, score: np.ndarray, radius: float = NMS_RADIUS) -> np.ndarray:
    """Greedy non-maximum suppression within a radius.

    Sources are visited by decreasing score; each kept source suppresses every
    lower-scored source closer than or at ``radius`` px.

    Parameters
    ----------
    x, y : (N,) float
        Positions in px.
    score : (N,) float
        Scores (higher = better).
    radius : float
        Suppression radius in px (0 keeps everything).

    Returns
    -------
    keep : (M,) int64
        Indices into the inputs of the kept sources, by decreasing score.
    """
    x, y, score = (np.asarray(a, dtype=np.float64).ravel() for a in (x, y, score))
    if not (len(x) == len(y) == len(score)):
        raise RtcnnInputError(None, f"x, y, score lengths differ: {len(x)}, {len(y)}, {len(score)}")
    if radius < 0:
        raise RtcnnInputError(None, f"NMS radius must be >= 0 px, got {radius}")
    order = np.argsort(-score, kind="stable")
    if len(x) == 0 or radius == 0:
        return order.astype(np.int64)
    pts = np.stack([x, y], axis=1)
    pairs = cKDTree(pts).query_pairs(r=radius, output_type="ndarray")
    if len(pairs) == 0:
        return order.astype(np.int64)
    rank = np.empty(len(x), dtype=np.int64)
    rank[order] = np.arange(len(x))
    # neighbours of each point that rank below it (would be suppressed by it)
    a, b = pairs[:, 0], pairs[:, 1]
    hi = np.where(rank[a] < rank[b], a, b)
    lo = np.where(rank[a] < rank[b], b, a)
    srt = np.argsort(hi, kind="stable")
    hi, lo = hi[srt], lo[srt]
    starts = np.searchsorted(hi, np.arange(len(x)))
    ends = np.searchsorted(hi, np.arange(len(x)), side="right")
    suppressed = np.zeros(len(x), dtype=bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed[lo[starts[i] : ends[i]]] = True
    return np.asarray(keep, dtype=np.int64)


def centroid_refine(
    score_map: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel positions from the score-weighted centroid of a ``(2 half + 1)`` box.

    The fallback when no offset map is available; scores below zero and NaN count
    as zero weight, and boxes are clipped at the image edge.

    Returns
    -------
    x, y : (N,) float64
        Refined positions in px.
    """
    score_map = _check_map(score_map, "score map")
    ix = np.asarray(ix, dtype=np.int64)
    iy = np.asarray(iy, dtype=np.int64)
    ny, nx = score_map.shape
    w = np.nan_to_num(score_map.astype(np.float64), nan=0.0).clip(min=0.0)
    sx = np.zeros(len(ix))
    sy = np.zeros(len(ix))
    sw = np.zeros(len(ix))
    for dy in range(-half, half + 1):
        for dx in range(-half, half + 1):
            xx, yy = ix + dx, iy + dy
            ok = (xx >= 0) & (xx < nx) & (yy >= 0) & (yy < ny)
            v = np.zeros(len(ix))
            v[ok] = w[yy[ok], xx[ok]]
            sx += v * dx
            sy += v * dy
            sw += v
    good = sw > 0
    x = ix.astype(np.float64)
    y = iy.astype(np.float64)
    x[good] += sx[good] / sw[good]
    y[good] += sy[good] / sw[good]
    return x, y


def refine_positions(
    ix: np.ndarray,
    iy: np.ndarray,
    offset_map: np.ndarray | None = None,
    score_map: np.ndarray | None = None,
    max_offset: float = 1.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel source positions.

    Parameters
    ----------
    ix, iy : (N,) int
        Peak pixels.
    offset_map : (2, H, W) float, optional
        Per-pixel offset in px from that pixel's centre to the source:
        ``offset_map[0]`` = dx, ``offset_map[1]`` = dy. Position = ``(ix + dx, iy + dy)``.
    score_map : (H, W) float, optional
        Used for a 3x3 centroid (:func:`centroid_refine`) when ``offset_map`` is None.
    max_offset : float
        Offsets are clipped to ``[-max_offset, max_offset]`` px (a peak pixel is
        never further than ~1 px from its source); NaN offsets count as 0.

    Returns
    -------
    x, y : (N,) float64
        Positions in px (0-based, integer = pixel centre).
    """
    ix = np.asarray(ix, dtype=np.int64)
    iy = np.asarray(iy, dtype=np.int64)
    if offset_map is None:
        if score_map is None:
            return ix.astype(np.float64), iy.astype(np.float64)
        return centroid_refine(score_map, ix, iy)
    offset_map = _check_map(offset_map, "offset map", ndim=3)
    if offset_map.shape[0] != 2:
        raise RtcnnInputError(None, f"offset map must be (2, H, W), got {offset_map.shape}")
    off = np.nan_to_num(offset_map[:, iy, ix].astype(np.float64), nan=0.0)
    off = off.clip(-max_offset, max_offset)
    return ix + off[0], iy + off[1]


@dataclass(frozen=True)
class Sources:
    """Detected sources, one entry per source, sorted by decreasing score.

    Attributes
    ----------
    x, y : (N,) float64
        Positions in px, 0-based, integer = pixel centre.
    score : (N,) float64
        Peak score.
    dmag : (N,) float64
        Magnitude difference (mag); NaN where no dmag map was given.
    brightened : (N,) bool
        True where the source brightened from the reference to the new image.
    """

    x: np.ndarray
    y: np.ndarray
    score: np.ndarray
    dmag: np.ndarray
    brightened: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def extract_sources(
    score_map: np.ndarray,
    threshold: float,
    offset_map: np.ndarray | None = None,
    dmag_map: np.ndarray | None = None,
    brightened_map: np.ndarray | None = None,
    *,
    min_distance: int = PEAK_MIN_DISTANCE,
    nms_radius: float = NMS_RADIUS,
    mask: np.ndarray | None = None,
    max_sources: int | None = None,
) -> Sources:
    """Score map (+ offset, dmag and sign maps) → sources: peaks, NMS, sub-pixel refinement.

    Parameters
    ----------
    score_map : (H, W) float
        Per-pixel transient score (probability).
    threshold : float
        Minimum peak score.
    offset_map : (2, H, W) float, optional
        Per-pixel ``(dx, dy)`` in px to the source (see :func:`refine_positions`);
        without it positions come from a 3x3 score centroid.
    dmag_map : (H, W) float, optional
        Per-pixel magnitude difference (mag), read at the peak pixel.
    brightened_map : (H, W) bool or float, optional
        Per-pixel "brightened" flag, or its probability (``> 0.5`` = brightened),
        read at the peak pixel; default True (a new source).
    min_distance : int
        Half-width of the local-maximum box, px.
    nms_radius : float
        Non-maximum suppression radius, px (applied to the refined positions).
    mask : (H, W) bool, optional
        True = bad pixel, never a peak.
    max_sources : int, optional
        Keep at most this many sources (highest scores).

    Returns
    -------
    Sources
    """
    score_map = _check_map(score_map, "score map")
    shape = score_map.shape
    for name, arr, want in (
        ("offset map", offset_map, (2, *shape)),
        ("dmag map", dmag_map, shape),
        ("brightened map", brightened_map, shape),
    ):
        if arr is not None and np.shape(arr) != want:
            raise RtcnnInputError(None, f"{name} has shape {np.shape(arr)}, expected {want}")
    ix, iy, score = find_peaks(score_map, threshold, min_distance, mask)
    x, y = refine_positions(ix, iy, offset_map, score_map)
    keep = nms(x, y, score, nms_radius)
    if max_sources is not None:
        keep = keep[: int(max_sources)]
    ix, iy, x, y, score = ix[keep], iy[keep], x[keep], y[keep], score[keep]
    if dmag_map is None:
        dmag = np.full(len(keep), np.nan)
    else:
        dmag = np.asarray(dmag_map)[iy, ix].astype(np.float64)
    if brightened_map is None:
        brightened = np.ones(len(keep), dtype=bool)
    else:
        vals = np.asarray(brightened_map)[iy, ix]
        brightened = vals if vals.dtype == bool else vals > 0.5
    return Sources(x=x, y=y, score=score, dmag=dmag, brightened=np.asarray(brightened, bool))


# --------------------------------------------------------------------------- sky
def _transform(wcs, path, method: str, a, b) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``wcs.<method>(a, b)`` (0-based APE 14 values) to float64 arrays."""
    if wcs is None or not getattr(wcs, "has_celestial", False):
        raise RtcnnInputError(path, "no celestial WCS in the header; RA/Dec cannot be computed")
    w = wcs if wcs.naxis == 2 else wcs.celestial
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size == 0:
        return np.zeros(0), np.zeros(0)
    p, q = getattr(w, method)(a, b)
    return np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)


def pixel_to_sky(x: np.ndarray, y: np.ndarray, wcs, path=None) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions → (RA, Dec) in deg through an astropy WCS.

    Astropy's ``pixel_to_world_values`` is 0-based, the package convention, so no
    offset is applied here (FITS CRPIX is 1-based; astropy handles that).

    Parameters
    ----------
    x, y : (N,) float
        Positions in px.
    wcs : astropy.wcs.WCS
        Celestial WCS (SIP distortion included when present).
    path : str, optional
        File named in the error if the WCS is missing.

    Returns
    -------
    ra, dec : (N,) float64
        Degrees; RA in [0, 360).
    """
    ra, dec = _transform(wcs, path, "pixel_to_world_values", x, y)
    return np.mod(ra, 360.0), dec


def sky_to_pixel(ra: np.ndarray, dec: np.ndarray, wcs, path=None) -> tuple[np.ndarray, np.ndarray]:
    """(RA, Dec) in deg → 0-based pixel positions (inverse of :func:`pixel_to_sky`)."""
    return _transform(wcs, path, "world_to_pixel_values", ra, dec)
