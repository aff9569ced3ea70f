"""GPU paths (``pytest -m gpu`` on a machine with CUDA; deselected by default, skipped without
a CUDA device): ``trainer=gpu`` end to end with bf16 and the D4 augmentation on the device,
and the networks' CUDA outputs against the CPU's within the bf16 tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, tiny_overrides
from test_precision import BF16_MEAN_TOL_PX, BF16_TOL_PX

from rtcnn.data.synthetic import synthetic_batch
from rtcnn.tasks import build_task
from rtcnn.tiles import TILE_SIZE
from rtcnn.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_trainer_gpu_fits_and_tests_with_bf16_and_device_augmentation(tiny_sim, tmp_path):
    overrides = ["trainer=gpu", *tiny_overrides(tiny_sim, tmp_path), "trainer.max_epochs=2",
                 "logger=csv"]  # fmt: skip
    cfg = compose_train(overrides, tmp_path / "run")
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.gpu_augment == "auto"
    metrics, objects = train(cfg)
    assert objects["model"].augment_on_device  # the loader's D4 switched off, the GPU's on
    for name in ("val/within2px", "test/within2px", "train/loss"):
        assert name in metrics
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("name", ["attn5", "dense"])
def test_cuda_bf16_outputs_match_cpu_fp32(name):
    torch.manual_seed(0)
    net = build_task(name).net.eval()
    tiles = synthetic_batch(name, 32, seed=1)["image"]
    with torch.inference_mode():
        cpu = net(tiles)
        net_gpu = net.to("cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            gpu = net_gpu(tiles.to("cuda"))
    if name == "attn5":  # (x, y) in tile units
        err = (gpu.float().cpu() - cpu).abs() * TILE_SIZE
        assert err.max() <= BF16_TOL_PX and err.mean() <= BF16_MEAN_TOL_PX
    else:  # dict of per-cell maps: the probability logits agree to bf16 rounding
        for key, value in cpu.items():
            assert torch.allclose(gpu[key].float().cpu(), value, atol=0.1, rtol=0.05), key
