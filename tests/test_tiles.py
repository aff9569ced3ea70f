"""Tests of the tile grid geometry (rtcnn.tiles)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn import RtcnnInputError
from rtcnn.tiles import (
    TILE_OVERLAP,
    TILE_SIZE,
    TILE_STRIDE,
    edge_distance,
    n_tiles,
    n_tiles_1d,
    origins_1d,
    tile_origins,
    stamp_index,
    tiles_containing,
)


def test_paper_constants():
    assert (TILE_SIZE, TILE_OVERLAP, TILE_STRIDE) == (64, 10, 54)


@pytest.mark.parametrize(
    "shape,size,stride",
    [((777, 1000), 64, 54), ((1000, 777), 64, 54), ((64, 64), 64, 54), ((65, 200), 64, 64),
     ((101, 97), 32, 7), ((4088, 4088), 64, 54), ((1024, 1024), 64, 54), ((70, 64), 64, 1)],
)
def test_grid_covers_every_pixel(shape, size, stride):
    origins = tile_origins(shape, size, stride)
    hits = np.zeros(shape, dtype=np.int32)
    for x0, y0 in origins:
        assert 0 <= x0 <= shape[1] - size and 0 <= y0 <= shape[0] - size
        hits[y0 : y0 + size, x0 : x0 + size] += 1
    assert hits.min() >= 1
    # neighbouring tiles overlap by at least size - stride px, never leave a gap
    for axis_len in shape:
        starts = origins_1d(axis_len, size, stride)
        assert starts[0] == 0 and starts[-1] == axis_len - size
        steps = np.diff(starts)
        assert np.all(steps > 0) and np.all(steps <= stride)


@pytest.mark.parametrize(
    "shape,size,stride", [((777, 1000), 64, 54), ((4088, 4088), 64, 54), ((300, 64), 64, 10)]
)
def test_n_tiles_matches_origins(shape, size, stride):
    ny, nx = shape
    expected = (int(np.ceil((ny - size) / stride)) + 1) * (int(np.ceil((nx - size) / stride)) + 1)
    assert n_tiles(shape, size, stride) == expected == len(tile_origins(shape, size, stride))
    assert n_tiles_1d(nx, size, stride) == len(origins_1d(nx, size, stride))


def test_known_counts():
    assert n_tiles((1024, 1024)) == 19 * 19
    assert n_tiles((4088, 4088)) == 76 * 76


def test_order_is_row_major():
    origins = tile_origins((777, 1000))
    nx_t = n_tiles_1d(1000)
    assert_array_equal(origins[: nx_t, 1], 0)  # first row: y0 = 0, x0 increasing
    assert np.all(np.diff(origins[:nx_t, 0]) > 0)
    assert origins[nx_t, 0] == 0 and origins[nx_t, 1] == TILE_STRIDE


def test_every_position_lies_in_a_tile_on_odd_image():
    rng = np.random.default_rng(1)
    shape = (777, 1000)
    origins = tile_origins(shape)
    xy = np.column_stack([rng.uniform(-0.5, 999.5, 500), rng.uniform(-0.5, 776.5, 500)])
    inside = tiles_containing(xy, origins)
    assert inside.any(axis=0).all()  # every position lies in some tile
    for i, j in zip(*np.nonzero(inside)):
        t = xy[j] - origins[i]
        assert np.all(t >= -0.5) and np.all(t < TILE_SIZE - 0.5)


def test_stamp_index_clips_at_the_edges():
    img = np.arange(7 * 9, dtype=np.float64).reshape(7, 9)
    rows, cols, inside = stamp_index(img.shape, np.array([4, 0]), np.array([3, 6]), 1)
    st = img[rows, cols]
    assert st.shape == (2, 3, 3)
    assert_array_equal(st[0], img[2:5, 3:6])
    assert_array_equal(inside[0], np.ones((3, 3), bool))
    # (0, 6): the column left of x=0 and the row below y=6 are off the image
    assert_array_equal(inside[1], [[False, True, True], [False, True, True], [False, False, False]])
    assert_array_equal(np.where(inside[1], st[1], -1),
                       [[-1, img[5, 0], img[5, 1]], [-1, img[6, 0], img[6, 1]], [-1, -1, -1]])


def test_tiles_containing_margin_and_edges():
    origins = np.array([[0, 0], [54, 0]])
    xy = np.array([[-0.5, 3.0], [63.49, 3.0], [63.5, 3.0], [60.0, 3.0], [2.0, 3.0]])
    inside = tiles_containing(xy, origins, 64)
    assert_array_equal(inside[0], [True, True, False, True, True])
    assert_array_equal(inside[1], [False, True, True, True, False])
    inside_m = tiles_containing(xy, origins, 64, margin=3.0)
    assert_array_equal(inside_m[0], [False, False, False, True, False])


def test_edge_distance():
    assert_allclose(edge_distance(np.array([[0.0, 30.0], [31.5, 31.5], [63.0, 10.0]])),
                    [0.5, 32.0, 0.5])
    assert_allclose(edge_distance(np.array([-0.5, 5.0])), 0.0)


@pytest.mark.parametrize(
    "shape,size,stride,match",
    [((50, 100), 64, 54, "tile size 64 px is larger than the image"),
     ((100, 100), 64, 70, "larger than tile size"),
     ((100, 100), 0, 54, "must be positive")],
)
def test_bad_geometry(shape, size, stride, match):
    with pytest.raises(RtcnnInputError, match=match):
        tile_origins(shape, size, stride)
