"""Post-processing of the network's detections: threshold, one per candidate, bad pixels, NMS."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn.errors import RtcnnInputError
from rtcnn.postprocess import Sources, best_per_candidate, drop_masked, finalize, nms


def sources(x, y, score, dmag=None, brightened=None):
    n = len(x)
    return Sources(x=np.asarray(x, float), y=np.asarray(y, float), score=np.asarray(score, float),
                   dmag=np.zeros(n) if dmag is None else np.asarray(dmag, float),
                   brightened=np.ones(n, bool) if brightened is None else np.asarray(brightened))


def test_nms_radius():
    x = np.array([10.0, 11.5, 20.0, 22.9, 40.0])
    y = np.array([10.0, 10.0, 5.0, 5.0, 40.0])
    s = np.array([0.7, 0.9, 0.5, 0.6, 0.1])
    assert_array_equal(nms(x, y, s, radius=3.0), [1, 3, 4])
    assert_array_equal(nms(x, y, s, radius=1.0), [1, 0, 3, 2, 4])
    assert_array_equal(nms(x, y, s, radius=0.0), [1, 0, 3, 2, 4])
    # a chain: 0 suppresses 1, so 2 (only near 1) survives
    assert_array_equal(nms([0.0, 2.0, 4.0], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0], 2.5), [0, 2])
    assert nms([], [], [], 3.0).shape == (0,)
    with pytest.raises(RtcnnInputError, match="lengths differ: 2, 1, 1"):
        nms([0.0, 1.0], [0.0], [1.0])
    with pytest.raises(RtcnnInputError, match="NMS radius must be >= 0 px, got -1"):
        nms([0.0], [0.0], [1.0], -1)


def test_finalize_thresholds_merges_and_makes_dmag_positive():
    """Two stamps (or tiles) see one source 1.2 px apart: one detection, the better one."""
    s = sources([58.5 - 0.6, 58.5 + 0.6, 10.0, 80.0], [30.0, 30.0, 10.0, 5.0],
                [0.8, 0.9, 0.3, 0.6], dmag=[-1.5, -1.4, 2.0, 0.7],
                brightened=[False, False, True, True])
    out = finalize(s, threshold=0.5, merge_radius=2.0)
    assert_allclose(out.x, [59.1, 80.0])  # by decreasing score; 0.3 below the threshold
    assert_allclose(out.score, [0.9, 0.6])
    assert_allclose(out.dmag, [1.4, 0.7])  # |dmag|
    assert_array_equal(out.brightened, [False, True])
    assert len(finalize(Sources.concatenate([]), 0.5)) == 0


def test_best_per_candidate_keeps_the_best_near_peak():
    cand_xy = np.array([[10, 10], [50, 50], [90, 90]])
    batch = np.array([0, 0, 0, 1, 2])
    xy = np.array([[10.5, 9.8], [11.0, 11.0], [20.0, 20.0], [60.0, 60.0], [89.0, 91.0]])
    score = np.array([0.6, 0.7, 0.99, 0.9, 0.2])
    keep = best_per_candidate(batch, xy, score, cand_xy, accept_radius=3.0)
    # candidate 0: 0.99 is 14 px away, so 0.7 at (11, 11); candidate 1: nothing near
    assert_array_equal(keep, [1, 4])
    assert best_per_candidate(np.zeros(0, int), np.zeros((0, 2)), np.zeros(0), cand_xy).shape == (0,)


def test_drop_masked_and_sources_helpers():
    s = sources([1.2, 5.6, 8.0], [2.4, 3.5, 9.4], [0.9, 0.8, 0.7])
    mask = np.zeros((10, 10), bool)
    mask[4, 6] = True  # (5.6, 3.5) rounds to pixel (6, 4)
    out = drop_masked(s, mask)
    assert_allclose(out.x, [1.2, 8.0])
    assert drop_masked(s, None) is s
    both = Sources.concatenate([s, out])
    assert len(both) == 5 and both.brightened.dtype == bool
    assert_allclose(s.replace(dmag=np.full(3, 2.0)).dmag, 2.0)
    det = {"xy": np.array([[1.0, 2.0], [3.0, 4.0]]), "score": np.array([0.5, 0.6]),
           "dmag": np.array([1.0, 2.0]), "brightened": np.array([True, False])}
    one = Sources.from_detections(det, np.array([1]))
    assert (one.x[0], one.y[0], one.score[0], bool(one.brightened[0])) == (3.0, 4.0, 0.6, False)
