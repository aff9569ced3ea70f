"""The autoencoder (paper appendix): truth rendering, peak readout, the task in rtcnn.train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from conftest import compose_train, tiny_overrides
from rtcnn.models.autoencoder import PairAutoencoder, peak_positions, render_points
from rtcnn.tasks.reconstruction import ReconstructionTask, truth_kernel


def _gauss_kernel(sigma: float, oversample: int, box: int) -> torch.Tensor:
    m = box * oversample + 1
    u = (np.arange(m) - (m - 1) / 2) / oversample
    g = np.exp(-0.5 * (u[None, :] ** 2 + u[:, None] ** 2) / sigma**2)
    return torch.as_tensor(g, dtype=torch.float64)


def test_render_points_matches_analytic_gaussian():
    sigma, os_ = 1.5, 8
    kernel = _gauss_kernel(sigma, os_, 20)
    xy = torch.tensor([[[10.3, 20.6], [30.0, 5.25]], [[7.0, 7.0], [np.nan, np.nan]]],
                      dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.5], [2.0, 9.0]], dtype=torch.float64)
    img = render_points(xy, kernel, os_, 40, weight).numpy()[:, 0]
    yy, xx = np.mgrid[0:40, 0:40]

    def g(x0, y0):
        r2 = (xx - x0) ** 2 + (yy - y0) ** 2
        return np.where(np.maximum(abs(xx - x0), abs(yy - y0)) < 10, np.exp(-0.5 * r2 / sigma**2), 0)

    assert_allclose(img[0], g(10.3, 20.6) + 0.5 * g(30.0, 5.25), atol=3e-3)
    assert_allclose(img[1], 2.0 * g(7.0, 7.0), atol=3e-3)  # the NaN slot draws nothing


def test_peak_positions_recover_roman_psf_positions():
    kernel = torch.as_tensor(truth_kernel("F158", 1))  # L2 spelling of H158
    rng = np.random.default_rng(3)
    xy = torch.as_tensor(np.stack([rng.uniform(8, 24, (16, 2)), rng.uniform(40, 56, (16, 2))],
                                  1), dtype=torch.float32)
    weight = torch.tensor([[1.0, 0.6]]).expand(16, 2)
    img = render_points(xy, kernel, 4, 64, weight)
    peak = img.amax(dim=(-2, -1)).ravel()  # 1 on a pixel centre, ~0.6 on a pixel corner
    assert ((peak <= 1.0 + 1e-5) & (peak >= 0.55)).all()
    found, value = peak_positions(img, k=2)
    assert_allclose(found.numpy(), xy.numpy(), atol=0.1)  # highest (weight 1) first
    assert (value[:, 0] > value[:, 1]).all()


def test_autoencoder_shapes_and_errors():
    for bottleneck in ("dense", "conv"):
        net = PairAutoencoder(tile_size=32, filters=(8, 16), latent=16, bottleneck=bottleneck)
        assert net(torch.zeros(2, 2, 32, 32)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="bottleneck"):
        PairAutoencoder(bottleneck="none")
    with pytest.raises(ValueError, match="expected input"):
        PairAutoencoder(tile_size=32, filters=(8, 16))(torch.zeros(1, 2, 64, 64))


def test_truth_readout_is_exact_on_real_tiles(tiny_sim):
    """The truth image of a tile, read by the peak finder, gives the attn5 target."""
    from rtcnn.data import SimDataModule

    dm = SimDataModule(str(tiny_sim), pairs=4, size=256, sim_seed=7, scene={"n_transients": 14},
                       batch_size=64, progress=False, augment=True)
    dm.setup()
    task = ReconstructionTask(PairAutoencoder(filters=(4, 8, 8), latent=8))
    batch = next(iter(dm.train_dataloader()))
    truth = task.truth(batch["xy"], 64, batch["dflux"])
    found, _ = peak_positions(truth)
    dist = (found[:, 0] / 64 - batch["target"]).norm(dim=1) * 64
    assert float((dist <= 1.0).float().mean()) >= 0.95  # blends of equal changes: rare misses
    assert float(dist.median()) < 0.1


def test_experiment_autoencoder_trains_with_attn5_metrics(tiny_sim, tmp_path):
    from rtcnn.train import train

    cfg = compose_train(["experiment=autoencoder", "trainer=debug", "logger=csv",
                         *tiny_overrides(tiny_sim, tmp_path), "trainer.max_epochs=2",
                         "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                         "trainer.limit_test_batches=1"], tmp_path / "run")
    metrics, objects = train(cfg)
    for key in ("test/within1px", "test/within2px", "test/within5px", "train/recon_loss",
                "val/within2px_best"):
        assert np.isfinite(metrics[key]), key
    model = objects["model"]
    assert isinstance(model, ReconstructionTask)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    again = ReconstructionTask.load_from_checkpoint(ckpt, weights_only=True)
    assert again.hparams.band == "H158" and again.net.config["bottleneck"] == "dense"
