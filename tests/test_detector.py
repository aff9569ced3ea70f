"""The dense detector: shapes, target encoding/decoding, loss, a tiny fit, the task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from rtcnn.models.detector import (
    DenseDetector,
    cell_centers,
    decode,
    detector_loss,
    encode_targets,
    fuse_batchnorm,
    normalize_pair,
    robust_sigma,
)

PSF_SIGMA = 0.8  # px, Gaussian stand-in for the Roman PSF in the synthetic tiles
NOISE = 1.0  # e-/s per pixel in the synthetic tiles


def synthetic_batch(n_tiles: int, k: int, size: int = 64, flux: float = 60.0, seed: int = 0):
    """Tiles with 0..k Gaussian point sources at sub-pixel positions.

    Each source brightens (appears in the new image) or fades (only in the reference);
    every tile also carries one bright constant star in both images, a negative for the
    detector. Returns a batch dict in the data contract (``image``, ``xy``, ``valid``,
    ``dmag``, ``dflux``).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    images = rng.normal(0.0, NOISE, (n_tiles, 2, size, size))
    xy = np.full((n_tiles, k, 2), np.nan)
    valid = np.zeros((n_tiles, k), bool)
    dflux = np.zeros((n_tiles, k))
    norm = 1.0 / (2 * math.pi * PSF_SIGMA**2)

    def blob(x, y, f):
        return f * norm * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * PSF_SIGMA**2))

    for b in range(n_tiles):
        sx, sy = rng.uniform(4, size - 5, 2)
        star = blob(sx, sy, 20 * flux)
        images[b, 0] += star
        images[b, 1] += star
        for j in range(rng.integers(0, k + 1)):
            for _ in range(100):  # keep sources >= 8 px apart and off the star
                x, y = rng.uniform(2, size - 3, 2)
                others = xy[b, :j][valid[b, :j]]
                if np.hypot(x - sx, y - sy) > 8 and np.all(np.hypot(*(others - (x, y)).T) > 8):
                    break
            sign = 1 if rng.uniform() < 0.7 else -1
            images[b, 1 if sign > 0 else 0] += blob(x, y, flux)
            xy[b, j], valid[b, j], dflux[b, j] = (x, y), True, sign * flux
    return {
        "image": torch.tensor(images, dtype=torch.float32),
        "xy": torch.tensor(xy, dtype=torch.float32),
        "valid": torch.tensor(valid),
        "dmag": torch.where(torch.tensor(valid), 1.5, float("nan")).float(),
        "dflux": torch.tensor(dflux, dtype=torch.float32),
    }


def test_forward_shapes_and_input_checks():
    net = DenseDetector()
    assert net.stride == 4
    out = net(torch.randn(3, 2, 64, 64))
    assert set(out) == {"heat", "offset", "dmag", "sign"}
    assert out["heat"].shape == (3, 1, 16, 16)
    assert out["offset"].shape == (3, 2, 16, 16)
    assert out["dmag"].shape == out["sign"].shape == (3, 1, 16, 16)
    assert net(torch.randn(2, 2, 32, 96))["heat"].shape == (2, 1, 8, 24)  # any multiple of 4
    assert DenseDetector(channels=(8, 8))(torch.randn(1, 2, 32, 32))["heat"].shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="must be \\(B, 2, H, W\\)"):
        net(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of the stride 4"):
        net(torch.randn(1, 2, 62, 64))
    with pytest.raises(ValueError, match="prior must lie in"):
        DenseDetector(prior=1.0)


def test_fused_batchnorm_gives_the_same_outputs():
    torch.manual_seed(2)
    net = DenseDetector()
    net.train()
    for _ in range(3):  # non-trivial running statistics
        net(torch.randn(8, 2, 32, 32) * 3)
    net.eval()
    x = torch.randn(4, 2, 64, 64)
    with torch.no_grad():
        want = net(x)
        got = fuse_batchnorm(net)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    for key in want:
        assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-4)


def test_initial_probability_is_the_prior():
    net = DenseDetector(prior=0.01).eval()
    with torch.no_grad():
        p = torch.sigmoid(net(torch.randn(2, 2, 32, 32))["heat"])
    assert_allclose(p.mean().item(), 0.01, rtol=0.5)


def test_robust_sigma_and_normalisation():
    g = torch.Generator().manual_seed(1)
    images = 2.5 * torch.randn(4, 2, 64, 64, generator=g)
    images[:, :, 30, 30] = 1e4  # a bright source barely moves the MAD
    assert_allclose(robust_sigma(images).numpy(), 2.5, rtol=0.05)
    planes = normalize_pair(images, torch.full((4,), 2.5))
    assert planes.shape == (4, 3, 64, 64)
    # difference plane = asinh-compressed (new - ref) / sigma: 0 where identical
    assert_allclose(planes[:, 0, 30, 30].numpy(), 0.0, atol=1e-6)
    bad = images.clone()
    bad[0, 1, 5, 5] = float("nan")
    assert torch.isfinite(normalize_pair(bad)).all()
    with pytest.raises(ValueError, match="must be \\(B, 2, H, W\\)"):
        robust_sigma(torch.zeros(2, 64, 64))


def test_cell_centers_follow_the_pixel_convention():
    c = cell_centers(2, 3, 4)
    assert c.shape == (2, 3, 2)
    assert_allclose(c[0, 0].numpy(), (1.5, 1.5))  # cell (0, 0) covers pixels 0..3
    assert_allclose(c[1, 2].numpy(), (9.5, 5.5))


def test_encode_decode_round_trip_several_sources():
    xy = torch.tensor(
        [
            [[10.3, 20.7], [40.49, 41.51], [0.0, 63.2], [float("nan"), float("nan")]],
            [[63.4, 0.1], [31.5, 31.5], [5.0, 50.25], [22.22, 9.87]],
        ]
    )
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    dmag = torch.tensor([[0.5, 1.0, 2.0, float("nan")], [0.3, float("nan"), 1.2, 0.8]])
    bright = torch.tensor([[True, False, True, False], [False, True, True, False]])
    t = encode_targets(xy, valid, dmag, bright, (64, 64))
    assert t["heat"].shape == (2, 1, 16, 16)
    assert int(t["pos"].sum()) == 7
    assert float(t["heat"].max()) == 1.0
    det = decode(t, threshold=0.99, logits=False)
    assert det["xy"].shape == (7, 2)
    for b in range(2):
        got = det["xy"][det["batch"] == b].numpy()
        want = xy[b][valid[b]].numpy()
        # every true source decoded once, within 0.05 px (exactly, here)
        d = np.hypot(*(got[:, None, :] - want[None, :, :]).transpose(2, 0, 1))
        assert_allclose(d.min(axis=0), 0.0, atol=0.05)
        assert_allclose(d.min(axis=1), 0.0, atol=0.05)
        order = d.argmin(axis=1)
        assert_allclose(det["dmag"][det["batch"] == b].numpy(),
                        np.nan_to_num(dmag[b][valid[b]].numpy()[order]), atol=1e-6)
        assert (det["brightened"][det["batch"] == b].numpy() == bright[b][valid[b]].numpy()[order]).all()
    # the unknown dmag is not trained on, its sign and position are
    assert t["dmag_w"].sum() < t["reg_w"].sum()


def test_offsets_are_trained_around_each_source_relative_to_each_cell():
    xy = torch.tensor([[[21.2, 30.9]]])
    t = encode_targets(xy, torch.tensor([[True]]), torch.tensor([[1.0]]),
                       torch.tensor([[True]]), (64, 64))
    w = t["reg_w"][0, 0]
    assert int((w > 0).sum()) == 9  # the 3x3 cells around the source
    centres = cell_centers(16, 16, 4)
    ii, jj = torch.nonzero(w > 0, as_tuple=True)
    target_xy = centres[ii, jj] + t["offset"][0, :, ii, jj].T
    assert_allclose(target_xy.numpy(), np.repeat([[21.2, 30.9]], 9, axis=0), atol=1e-5)


def test_empty_tiles_and_out_of_tile_positions():
    xy = torch.tensor([[[-3.0, 10.0], [70.0, 5.0]]])
    t = encode_targets(xy, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2),
                       torch.ones(1, 2, dtype=torch.bool), (64, 64))
    assert float(t["heat"].sum()) == 0.0 and not t["pos"].any()
    t0 = encode_targets(torch.zeros(3, 0, 2), torch.zeros(3, 0, dtype=torch.bool),
                        torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.bool), (32, 32))
    assert t0["heat"].shape == (3, 1, 8, 8) and float(t0["heat"].sum()) == 0.0
    assert decode(t0, logits=False)["xy"].shape == (0, 2)
    with pytest.raises(ValueError, match="not a multiple of the stride"):
        encode_targets(xy, torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2),
                       torch.ones(1, 2, dtype=torch.bool), (30, 30))
    with pytest.raises(ValueError, match="valid \\(1, 3\\) must be"):
        encode_targets(xy, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 2),
                       torch.ones(1, 2, dtype=torch.bool), (64, 64))


def test_decode_threshold_peaks_and_max_det():
    heat = torch.full((1, 1, 8, 8), -10.0)
    heat[0, 0, 2, 2], heat[0, 0, 2, 3] = 3.0, 2.0  # neighbours: only the peak survives
    heat[0, 0, 6, 6] = 0.5
    out = {"heat": heat, "offset": torch.zeros(1, 2, 8, 8), "dmag": torch.zeros(1, 1, 8, 8),
           "sign": torch.zeros(1, 1, 8, 8)}
    assert len(decode(out, threshold=0.5)["score"]) == 2
    assert len(decode(out, threshold=0.9)["score"]) == 1
    one = decode(out, threshold=0.5, max_det=1)
    assert_allclose(one["xy"].numpy(), [[9.5, 9.5]])


def test_loss_is_finite_and_parts_are_reported():
    batch = synthetic_batch(4, 3)
    net = DenseDetector(channels=(8, 8, 8))
    t = encode_targets(batch["xy"], batch["valid"], batch["dmag"], batch["dflux"] > 0, (64, 64))
    losses = detector_loss(net(batch["image"]), t)
    assert set(losses) == {"loss", "heat", "offset", "dmag", "sign"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()


@pytest.fixture
def one_thread():
    """One torch thread: tiny nets train faster so, above all on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_fit_finds_the_sources(one_thread):
    """A small net overfits 16 tiles in a few seconds: the sources are found to < 1 px."""
    torch.manual_seed(0)
    batch = synthetic_batch(16, 3, size=32, seed=3)
    net = DenseDetector(channels=(8, 16, 16), head_channels=16)
    t = encode_targets(batch["xy"], batch["valid"], batch["dmag"], batch["dflux"] > 0, (32, 32))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        opt.zero_grad()
        loss = detector_loss(net(batch["image"]), t)["loss"]
        loss.backward()
        opt.step()
        first = first or float(loss.detach())
    assert float(loss.detach()) < 0.1 * first
    net.eval()
    with torch.no_grad():
        det = decode(net(batch["image"]), threshold=0.3)
    n_true = int(batch["valid"].sum())
    hits = 0
    for b in range(16):
        want = batch["xy"][b][batch["valid"][b]]
        got = det["xy"][det["batch"] == b]
        if len(want) and len(got):
            hits += int((torch.cdist(want, got).min(dim=1).values < 1.0).sum())
    assert hits >= 0.9 * n_true
    assert len(det["score"]) <= 1.1 * n_true  # the constant stars are not detected


def test_detection_metrics_on_hand_built_tiles():
    from rtcnn.metrics import DetectionMetrics, match_detections

    true_xy = torch.tensor([[[10.0, 10.0], [30.0, 30.0], [float("nan"), float("nan")]],
                            [[5.0, 5.0], [50.0, 50.0], [52.0, 50.0]]])
    valid = torch.tensor([[True, True, False], [True, True, True]])
    dmag = torch.tensor([[1.0, 2.0, float("nan")], [0.5, float("nan"), 1.0]])
    bright = torch.tensor([[True, False, False], [True, True, False]])
    det = {  # 4 detections: 3 matches (0.5, 0.3, 1.0 px), one false positive
        "batch": torch.tensor([0, 0, 1, 1]),
        "xy": torch.tensor([[10.3, 10.4], [40.0, 40.0], [5.0, 5.3], [51.0, 50.0]]),
        "score": torch.ones(4),
        "dmag": torch.tensor([1.2, 0.0, 0.5, 3.0]),
        "brightened": torch.tensor([True, True, False, True]),
    }
    t_idx, d_idx, dist = match_detections(det["batch"], det["xy"], true_xy, valid, radius=2.0)
    assert sorted(zip(t_idx.tolist(), d_idx.tolist())) == [(0, 0), (3, 2), (4, 3)]
    m = DetectionMetrics(match_radius=2.0)
    m.update(det, true_xy, valid, dmag, bright)
    out = m.compute()
    assert_allclose(out["precision"].item(), 3 / 4)
    assert_allclose(out["recall"].item(), 3 / 5)
    assert_allclose(out["f1"].item(), 2 * 3 / (4 + 5))
    assert_allclose(out["loc_median"].item(), 0.5, atol=1e-6)
    assert_allclose(out["within0p5px"].item(), 2 / 3)
    assert_allclose(out["within2px"].item(), 3 / 5)
    # median of |1.2 - 1.0| and |0.5 - 0.5|; the third match has no true dmag
    assert_allclose(out["dmag_mae"].item(), 0.1, atol=1e-6)
    assert_allclose(out["sign_acc"].item(), 2 / 3)  # the source at (5, 5) is called faded
    assert out["n_true"].item() == 5 and out["n_pred"].item() == 4
    with pytest.raises(ValueError, match="match_radius must be positive"):
        DetectionMetrics(match_radius=0.0)


def test_detection_task_trains_and_logs_its_metrics(one_thread, tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from rtcnn.tasks.detection import DetectionTask

    torch.manual_seed(0)
    batch = synthetic_batch(8, 2, size=32, seed=5)
    batch["reversed"] = torch.zeros(8, dtype=torch.bool)
    batch["reversed"][:3] = True  # the task swaps these back before the network sees them
    batch["image"][:3] = batch["image"][:3].flip(1)
    # a threshold under the 0.01 prior: the briefly trained net reports sources (its scores
    # stay near the prior), so sign_acc is a number
    task = DetectionTask(DenseDetector(channels=(8, 8, 8), head_channels=8), threshold=0.005)
    loader = DataLoader([batch], batch_size=None)
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    trainer = L.Trainer(max_epochs=2, logger=logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, loader, loader)
    logged = trainer.callback_metrics
    for name in ("train/loss", "train/f1", "val/loss", "val/loss_heat", "val/precision",
                 "val/recall", "val/f1", "val/loc_median", "val/within2px", "val/dmag_mae",
                 "val/sign_acc", "val/f1_best", "val/within2px_best"):  # fmt: skip
        assert name in logged, name
    assert task.hparams["net"]["_target_"] == "rtcnn.models.detector.DenseDetector"
    assert logged["val/n_true"] == int(batch["valid"].sum())
    # the logged sign accuracy is that of the trained network's detections on the batch
    from rtcnn.metrics import DetectionMetrics
    from rtcnn.tasks.detection import true_brightened, unreverse

    image = unreverse(batch)
    with torch.no_grad():
        det = decode(task.eval()(image), threshold=task.hparams.threshold, stride=task.stride)
    ref = DetectionMetrics(match_radius=task.hparams.match_radius)
    ref.update(det, batch["xy"], batch["valid"], batch["dmag"], true_brightened(batch, image))
    ref = ref.compute()
    assert ref["n_pred"] > 0 and logged["val/n_pred"] == ref["n_pred"]
    assert 0.0 <= float(ref["sign_acc"]) <= 1.0
    assert_allclose(float(logged["val/sign_acc"]), float(ref["sign_acc"]), rtol=1e-6)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))  # scalars and val/panels
