"""The difference stage: difference image on one zero point, robust noise, noise model,
peaks and the classical candidates."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage

from rtcnn.difference import (
    RESIDUAL_FRACTION,
    background_sigma,
    difference_image,
    find_candidates,
    find_peaks,
    image_sigma,
    noise_variance,
    peak_fraction,
    robust_sigma,
)
from rtcnn.errors import RtcnnInputError
from rtcnn.io import Image


# --------------------------------------------------------------------------- difference
def test_difference_puts_the_reference_on_the_new_zero_point():
    rng = np.random.default_rng(0)
    flux = rng.uniform(0, 10, (16, 16)).astype(np.float32)  # e-/s at zero point 26
    ref_data = flux * np.float32(10 ** (-0.4 * 1.5))  # the same sky at zero point 24.5
    ref_data[3, 4] = np.nan
    ref = Image.from_array(ref_data, zeropoint=24.5, exptime=100.0)
    new = Image.from_array(flux + 1.0, zeropoint=26.0, exptime=50.0)
    d = difference_image(ref, new)
    assert_allclose(d.scale, 10**0.6)
    assert d.zeropoint == 26.0 and d.exptime == (100.0, 50.0)
    good = np.ones((16, 16), bool)
    good[3, 4] = False
    assert_allclose(d.diff[good], 1.0, rtol=0, atol=1e-5)  # only the +1 e-/s change is left
    assert d.ref[3, 4] == 0 and d.mask[3, 4] and d.mask.sum() == 1
    assert d.masked_fraction == pytest.approx(1 / 256)
    assert np.isnan(ref.data[3, 4])  # the input image is not modified
    # without a zero point on either side nothing is scaled and dmag has no zero point
    d = difference_image(Image.from_array(ref_data), new)
    assert d.scale == 1.0 and d.zeropoint is None
    with pytest.raises(RtcnnInputError, match=r"shape \(16, 16\) does not match the reference"):
        difference_image(Image.from_array(np.zeros((8, 16))), new)


# --------------------------------------------------------------------------- noise
def test_robust_sigma_of_gaussian_noise_with_outliers_and_masks():
    rng = np.random.default_rng(1)
    v = rng.normal(3.0, 2.0, 200_000)
    v[:2000] = 1e6  # 1 % outliers (sources) barely move the MAD
    v[2000:2100] = np.nan
    assert_allclose(robust_sigma(v), 2.0, rtol=0.02)
    mask = np.zeros(v.shape, bool)
    mask[:2000] = True
    assert_allclose(robust_sigma(v, mask), 2.0, rtol=0.01)
    with pytest.raises(RtcnnInputError, match="fewer than 100 unmasked pixels"):
        robust_sigma(v[:99])
    with pytest.raises(RtcnnInputError, match="zero noise"):
        robust_sigma(np.zeros(1000))
    assert robust_sigma(np.full(10, np.nan), floor=1e-6) == 1e-6
    assert robust_sigma(np.zeros(1000), floor=0.5) == 0.5
    img = rng.normal(0, 1.5, (400, 400)).astype(np.float32)
    assert_allclose(background_sigma(img), 1.5, rtol=0.02)
    assert_allclose(image_sigma(img, img * 3, step=2), 3.0, rtol=0.03)  # mean of 1.5 and 4.5


def test_noise_variance_terms():
    ref = np.array([[0.0, 100.0], [-50.0, 10.0]], np.float32)
    new = np.array([[0.0, 120.0], [-50.0, 30.0]], np.float32)
    var = noise_variance(ref, new, 2.0, (100.0, 50.0))
    want = 4.0 + np.clip(ref, 0, None) / 100 + np.clip(new, 0, None) / 50 \
        + (RESIDUAL_FRACTION * np.maximum(abs(ref), abs(new))) ** 2
    assert var.dtype == np.float32
    assert_allclose(var, want, rtol=1e-6)
    var = noise_variance(ref.astype(np.float64), new.astype(np.float64), 2.0,
                         residual_fraction=0.0, mask=np.eye(2, dtype=bool))
    assert var.dtype == np.float64
    assert_allclose(var, [[np.inf, 4.0], [4.0, np.inf]])


# --------------------------------------------------------------------------- peaks
def test_find_peaks_equals_a_maximum_filter():
    rng = np.random.default_rng(7)
    image = np.abs(rng.normal(0, 1, (300, 300))).astype(np.float32)
    image[10, 10] = image[11, 11] = 9.0  # a tie: both kept
    mask = rng.uniform(size=image.shape) < 0.1
    for min_distance in (1, 2):
        work = np.where(mask, -np.inf, image)
        peak = (work == ndimage.maximum_filter(work, 2 * min_distance + 1, mode="constant",
                                               cval=-np.inf)) & (work >= 3.0)
        iy, ix = np.nonzero(peak)
        ix_got, iy_got, v = find_peaks(image, 3.0, min_distance, mask)
        assert set(zip(ix_got.tolist(), iy_got.tolist())) == set(zip(ix.tolist(), iy.tolist()))
        assert np.all(np.diff(v) <= 0)  # by decreasing value
    assert (10, 10) in set(zip(*find_peaks(image, 3.0, 2)[:2]))
    assert len(find_peaks(image, 100.0, 2)[0]) == 0


def test_find_peaks_mask_nan_edges_and_errors():
    score = np.zeros((20, 20), np.float32)
    score[0, 0] = 1.0  # a corner peak: outside the image never blocks
    score[10, 10] = 1.0  # masked: not a peak
    score[4, 15] = 0.9
    score[4, 16] = np.nan  # a NaN neighbour does not block (4, 15)
    score[15, 15] = np.nan
    mask = np.zeros(score.shape, bool)
    mask[10, 10] = True
    ix, iy, v = find_peaks(score, 0.5, mask=mask)
    assert_array_equal(ix, [0, 15]) and assert_array_equal(iy, [0, 4])
    score2 = np.zeros((20, 20), np.float32)
    score2[10, 10], score2[10, 12] = 1.0, 0.8  # 2 px apart: two peaks in 3x3 boxes, one in 5x5
    assert len(find_peaks(score2, 0.5, min_distance=1)[0]) == 2
    assert len(find_peaks(score2, 0.5, min_distance=2)[0]) == 1
    with pytest.raises(RtcnnInputError, match="min_distance must be >= 1 px, got 0"):
        find_peaks(score2, 0.5, min_distance=0)
    with pytest.raises(RtcnnInputError, match="peak map must be 2-D"):
        find_peaks(score2[None], 0.5)


# --------------------------------------------------------------------------- candidates
def test_candidates_find_a_faint_point_source_and_skip_flat_sky():
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 1, (200, 200)).astype(np.float32)
    new = rng.normal(0, 1, (200, 200)).astype(np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    new += (40 / (2 * np.pi)) * np.exp(-((xx - 120.3) ** 2 + (yy - 60.6) ** 2) / 2)  # S/N ~ 20
    cand = find_candidates(new - ref)
    assert 0 < len(cand) < 20  # a few noise peaks at most
    assert cand.ix[0] == 120 and cand.iy[0] == 61  # the brightest candidate is the source
    assert_allclose(image_sigma(ref, new, step=1), 1.0, rtol=0.05)


def test_single_pixel_hits_are_not_candidates():
    rng = np.random.default_rng(10)
    diff = rng.normal(0, 1, (120, 120)).astype(np.float32)
    yy, xx = np.mgrid[0:120, 0:120]
    diff += (60 / (2 * np.pi * 0.6**2)) * np.exp(-((xx - 30.2) ** 2 + (yy - 40.4) ** 2) / 0.72)
    diff[90, 80] += 80.0  # a cosmic-ray hit: one pixel
    diff[20, 100] -= 60.0  # one on the reference (a negative hit)
    frac = peak_fraction(diff, np.array([30, 80, 100]), np.array([40, 90, 20]))
    assert frac[0] < 0.66 and frac[1] > 0.9 and frac[2] > 0.9
    cand = find_candidates(diff)
    got = set(zip(cand.ix.tolist(), cand.iy.tolist()))
    assert (30, 40) in got and (80, 90) not in got and (100, 20) not in got
    every = find_candidates(diff, sharp_max=1.0)  # kept when asked
    assert (80, 90) in set(zip(every.ix.tolist(), every.iy.tolist()))


def test_the_numpy_stages_and_the_baseline_never_import_torch():
    """difference, postprocess and measure are numpy/scipy only, so the classical baseline
    starts without torch; the networks (rtcnn.models) import no stage, no I/O, no Lightning."""
    import subprocess
    import sys

    def imported(modules, watch):
        code = (f"import sys; import {', '.join(modules)}; "
                f"print(' '.join(m for m in {watch!r} if m in sys.modules))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout.split()

    assert imported(["rtcnn.baseline", "rtcnn.difference", "rtcnn.postprocess", "rtcnn.measure"],
                    ["torch"]) == []
    assert imported(["rtcnn.models.detector", "rtcnn.models.attn5"],
                    ["rtcnn.difference", "rtcnn.io", "rtcnn.inference", "lightning",
                     "hydra"]) == []
