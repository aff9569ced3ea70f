"""PixelDistance / localization_metrics: known offsets give known fractions and statistics."""

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from rtcnn.metrics import PixelDistance, localization_metrics

TILE = 64.0  # px


def offsets_px(d):
    """Targets at random places and predictions displaced by d px at random angles."""
    rng = np.random.default_rng(0)
    target = rng.uniform(5, 59, size=(len(d), 2))
    angle = rng.uniform(0, 2 * np.pi, size=len(d))
    pred = target + np.c_[np.cos(angle), np.sin(angle)] * np.asarray(d)[:, None]
    return torch.tensor(pred / TILE, dtype=torch.float32), torch.tensor(target / TILE,
                                                                       dtype=torch.float32)


def test_values_for_known_distances():
    d = np.array([0.0, 0.5, 0.99, 1.5, 1.99, 3.0, 4.9, 7.0, 12.0, 50.0])
    pred, target = offsets_px(d)
    metric = PixelDistance()
    metric.update(pred[:4], target[:4])  # two batches accumulate
    metric.update(pred[4:], target[4:])
    out = metric.compute()
    assert_allclose(float(out["within1px"]), 3 / 10)
    assert_allclose(float(out["within2px"]), 5 / 10)
    assert_allclose(float(out["within5px"]), 7 / 10)
    assert_allclose(float(out["dist_mean"]), d.mean(), atol=1e-4)
    assert_allclose(float(out["dist_std"]), d.std(), atol=1e-3)
    assert_allclose(float(out["dist_max"]), 50.0, atol=1e-4)
    assert float(out["n_tiles"]) == 10


def test_collection_names_and_clones():
    base = localization_metrics()
    val, test_snr = base.clone(prefix="val/"), base.clone(prefix="test/", postfix="_snr10")
    pred, target = offsets_px([0.2, 3.0])
    val.update(pred, target)
    test_snr.update(pred, target)
    names = {"within1px", "within2px", "within5px", "dist_mean", "dist_std", "dist_max",
             "n_tiles"}
    assert set(val.compute()) == {f"val/{n}" for n in names}
    assert set(test_snr.compute()) == {f"test/{n}_snr10" for n in names}
    assert_allclose(float(val.compute()["val/within2px"]), 0.5)


def test_reset_empty_and_nan_targets():
    metric = PixelDistance(radii=[2.5])
    with pytest.warns(UserWarning, match="called before the ``update``"):
        out = metric.compute()
    assert math.isnan(float(out["within2p5px"])) and float(out["n_tiles"]) == 0
    pred, target = offsets_px([1.0, 4.0])
    target[1] = float("nan")  # rows without a position are skipped
    metric.update(pred, target)
    assert float(metric.compute()["n_tiles"]) == 1
    assert_allclose(float(metric.compute()["within2p5px"]), 1.0)
    metric.reset()
    metric.update(pred[:0], target[:0])  # an empty batch (e.g. no S/N >= 10 tile)
    assert float(metric.compute()["n_tiles"]) == 0


def test_scale_one_means_pixels():
    metric = PixelDistance(scale=1.0)
    metric.update(torch.tensor([[10.0, 10.0]]), torch.tensor([[13.0, 14.0]]))
    assert_allclose(float(metric.compute()["dist_mean"]), 5.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"must both be \(B, 2\)"):
        PixelDistance().update(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="radii must be positive"):
        PixelDistance(radii=[0.0])
    with pytest.raises(ValueError, match="scale must be positive"):
        PixelDistance(scale=0)
