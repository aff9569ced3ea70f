"""Tests of the D4 group on tiles and coordinates (rtcnn.augment)."""

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn.augment import (
    D4_NAMES,
    PAPER_VIEWS,
    apply_batch,
    apply_coords,
    apply_image,
    invert_coords,
)

N = 64  # px tile size


def _gaussian_tile(x, y, n=N, sigma=1.2):
    yy, xx = np.mgrid[0:n, 0:n]
    return np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_eight_distinct_elements():
    assert len(D4_NAMES) == 8 and set(PAPER_VIEWS) <= set(D4_NAMES)
    img = torch.arange(N * N, dtype=torch.float32).reshape(N, N)
    outs = {tuple(apply_image(img, g).flatten()[:3 * N].tolist()) for g in D4_NAMES}
    assert len(outs) == 8


@pytest.mark.parametrize("g", D4_NAMES)
def test_pixel_follows_coordinate_exactly(g):
    img = torch.zeros(N, N)
    x, y = 5, 40
    img[y, x] = 1.0
    out = apply_image(img, g)
    xt, yt = apply_coords(np.array([x, y]), g, N)
    assert out[int(yt), int(xt)] == 1.0 and out.sum() == 1.0
    assert_array_equal(invert_coords(np.array([xt, yt]), g, N), [x, y])


@pytest.mark.parametrize("g", D4_NAMES)
def test_subpixel_source_peak_within_half_pixel(g):
    rng = np.random.default_rng(D4_NAMES.index(g))
    x, y = rng.uniform(3, 60, 2)
    tile = torch.from_numpy(_gaussian_tile(x, y))
    out = apply_image(tile, g).numpy()
    yt, xt = np.unravel_index(np.argmax(out), out.shape)
    txy = apply_coords(np.array([x, y]), g, N)
    assert np.hypot(xt - txy[0], yt - txy[1]) <= np.sqrt(0.5) + 1e-9
    assert abs(xt - txy[0]) <= 0.5 and abs(yt - txy[1]) <= 0.5


def test_named_mirror_meanings():
    xy = np.array([10.0, 20.0])
    assert_allclose(apply_coords(xy, "flip_x", N), [N - 1 - 10, 20])
    assert_allclose(apply_coords(xy, "flip_y", N), [10, N - 1 - 20])
    assert_allclose(apply_coords(xy, "rot180", N), [N - 1 - 10, N - 1 - 20])


def test_group_closure_and_inverse_torch():
    xy = torch.tensor([[3.25, 7.5], [60.0, 0.0]], dtype=torch.float64)
    for g in D4_NAMES:
        back = invert_coords(apply_coords(xy, g, N), g, N)
        assert torch.equal(back, xy)
        assert isinstance(back, torch.Tensor)


def test_apply_batch_matches_per_sample_and_keeps_nan():
    rng = np.random.default_rng(3)
    b = 16
    imgs = torch.from_numpy(rng.normal(size=(b, 2, N, N)).astype(np.float32))
    xy = torch.from_numpy(rng.uniform(0, N - 1, size=(b, 3, 2)).astype(np.float32))
    xy[:, 2] = float("nan")  # padding slots stay NaN
    elements = torch.arange(b) % 8
    out, out_xy = apply_batch(imgs, xy, elements)
    for i in range(b):
        g = int(elements[i])
        assert torch.equal(out[i], apply_image(imgs[i], g))
        assert torch.equal(out_xy[i, :2], apply_coords(xy[i, :2], g, N))
    assert torch.isnan(out_xy[:, 2]).all()
    assert torch.equal(imgs[elements == 0], out[elements == 0])
    out2, none_xy = apply_batch(imgs, None, elements)
    assert none_xy is None and torch.equal(out2, out)


def test_unknown_element():
    with pytest.raises(ValueError, match="unknown D4 element 'spin'"):
        apply_image(torch.zeros(N, N), "spin")


def test_numpy_path_matches_torch():
    rng = np.random.default_rng(5)
    imgs = rng.normal(size=(24, 2, N, N)).astype(np.float32)
    xy = rng.uniform(0, N - 1, size=(24, 2, 2)).astype(np.float32)
    elements = np.arange(24) % 8
    out_t, xy_t = apply_batch(torch.from_numpy(imgs), torch.from_numpy(xy),
                              torch.from_numpy(elements))
    buf = np.empty_like(imgs)
    out_n, xy_n = apply_batch(imgs, xy, elements, out=buf)
    assert out_n is buf and isinstance(xy_n, np.ndarray)
    assert_array_equal(out_n, out_t.numpy())
    assert_array_equal(xy_n, xy_t.numpy())
    for g in D4_NAMES:
        assert_array_equal(apply_image(imgs[0], g), apply_image(torch.from_numpy(imgs[0]), g))
