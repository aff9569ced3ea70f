"""Grid geometry of overlapping square tiles (pure numpy, no I/O, no torch).

A tile of ``size`` px is placed every ``stride`` px, left to right and top to
bottom, so neighbouring tiles overlap by ``overlap = size - stride`` px (the
paper: size 64, overlap 10, stride 54). The last row and column are placed flush
with the image edge so that every pixel is covered. Positions follow the package
convention (:mod:`rtcnn`): 0-based, integer = pixel centre, ``(x, y)``.
"""

from __future__ import annotations

import numpy as np

from rtcnn.errors import RtcnnInputError

TILE_SIZE = 64  # px, the paper's snapshot size
TILE_OVERLAP = 10  # px, the paper's overlap between neighbouring snapshots
TILE_STRIDE = TILE_SIZE - TILE_OVERLAP  # px


def _check(length: int, size: int, stride: int) -> None:
    if size <= 0 or stride <= 0:
        raise RtcnnInputError(None, f"tile size ({size}) and stride ({stride}) must be positive")
    if stride > size:
        raise RtcnnInputError(
            None, f"tile stride ({stride}) larger than tile size ({size}) would leave gaps"
        )
    if size > length:
        raise RtcnnInputError(None, f"tile size {size} px is larger than the image ({length} px)")


def n_tiles_1d(length: int, size: int = TILE_SIZE, stride: int = TILE_STRIDE) -> int:
    """Number of tiles along one axis.

    ``n = ceil((length - size) / stride) + 1``: the regular grid plus, when it does
    not end on the edge, one extra tile placed flush with the edge.
    """
    _check(length, size, stride)
    return int(-(-(length - size) // stride)) + 1


def n_tiles(shape: tuple[int, int], size: int = TILE_SIZE, stride: int = TILE_STRIDE) -> int:
    """Number of tiles of a grid over an image of ``shape = (ny, nx)``.

    ``N = (ceil((ny - size) / stride) + 1) * (ceil((nx - size) / stride) + 1)``;
    e.g. 1024x1024 at size 64, stride 54 gives 19 x 19 = 361 tiles, and a full
    4088x4088 Roman SCA gives 76 x 76 = 5776 tiles.
    """
    ny, nx = shape
    return n_tiles_1d(ny, size, stride) * n_tiles_1d(nx, size, stride)


def origins_1d(length: int, size: int = TILE_SIZE, stride: int = TILE_STRIDE) -> np.ndarray:
    """Tile start offsets along one axis, ``(n,) int64``, last one flush with the edge."""
    n = n_tiles_1d(length, size, stride)
    starts = np.arange(n, dtype=np.int64) * stride
    starts[-1] = length - size
    return starts


def tile_origins(
    shape: tuple[int, int], size: int = TILE_SIZE, stride: int = TILE_STRIDE
) -> np.ndarray:
    """Origins ``(x0, y0)`` of all tiles, row-major (left to right, then top to bottom).

    Parameters
    ----------
    shape : (ny, nx)
        Image shape in px.
    size, stride : int
        Tile size and stride in px; overlap is ``size - stride``.

    Returns
    -------
    origins : (N, 2) int64
        ``origins[i] = (x0, y0)``; tile ``i`` is ``image[y0:y0+size, x0:x0+size]``.
    """
    ny, nx = shape
    ys = origins_1d(ny, size, stride)
    xs = origins_1d(nx, size, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def stamp_index(shape: tuple[int, int], ix: np.ndarray, iy: np.ndarray,
                half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the ``(2 half + 1)^2`` stamps centred on pixels ``(ix, iy)`` of an image.

    Returns
    -------
    rows, cols : (N, S, 1) and (N, 1, S) int64
        Row and column indices, clipped to the image (``image[rows, cols]`` is ``(N, S, S)``).
    inside : (N, S, S) bool
        Where the stamp pixel lies on the image (elsewhere the clipped index repeats an
        edge pixel).
    """
    ny, nx = shape
    off = np.arange(-half, half + 1)
    r = np.asarray(iy, dtype=np.int64)[:, None] + off[None, :]
    c = np.asarray(ix, dtype=np.int64)[:, None] + off[None, :]
    inside = (((r >= 0) & (r < ny))[:, :, None] & ((c >= 0) & (c < nx))[:, None, :])
    return r.clip(0, ny - 1)[:, :, None], c.clip(0, nx - 1)[:, None, :], inside


def tiles_containing(
    xy: np.ndarray, origins: np.ndarray, size: int = TILE_SIZE, margin: float = 0.0
) -> np.ndarray:
    """Which tiles contain which positions.

    Parameters
    ----------
    xy : (M, 2) float
        Image positions (x, y) in px.
    origins : (N, 2) int
        Tile origins from :func:`tile_origins`.
    size : int
        Tile size in px.
    margin : float
        A position counts only if it lies at least ``margin`` px inside the tile's
        outer pixel edges (``margin=0``: anywhere on the tile, pixel edges included).

    Returns
    -------
    inside : (N, M) bool
        ``inside[i, j]`` is True when position ``j`` falls in tile ``i``.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    rel = xy[None, :, :] - np.asarray(origins, dtype=np.float64)[:, None, :]
    lo, hi = -0.5 + margin, size - 0.5 - margin
    return np.all((rel >= lo) & (rel < hi), axis=-1)


def edge_distance(xy_tile: np.ndarray, size: int = TILE_SIZE) -> np.ndarray:
    """Distance (px) from tile positions ``(..., 2)`` to the nearest tile edge (pixel-edge based)."""
    xy_tile = np.asarray(xy_tile, dtype=np.float64)
    return np.minimum(xy_tile + 0.5, size - 0.5 - xy_tile).min(axis=-1)
