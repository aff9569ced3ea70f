"""The tasks' speed switches (rtcnn.tasks.base): D4 on the device, channels-last, hparams.

The device augmentation must give exactly the tiles and targets of the data layer's CPU
augmentation for the same D4 element; on a CPU the same code runs as on a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import open_dict

from conftest import compose_train, tiny_overrides
from rtcnn.data import FitsDataModule, d4_elements
from rtcnn.models import Attn5
from rtcnn.tasks import LocalizationTask, augment_batch
from rtcnn.tasks.detection import DetectionTask
from rtcnn.train import train

SEED = 3  # data seed of the augmentation hash
EPOCHS = (5, 6, 7)  # epochs of the augmentation hash


def _train_dataset(root, cache, augment: bool):
    dm = FitsDataModule(str(root), samples="all", val_fraction=0, test_fraction=0, seed=SEED,
                        augment=augment, num_workers=0, progress=False, cache_dir=str(cache))
    dm.setup()
    return dm.datasets["train"]


def test_device_augmentation_equals_the_data_layer(tiny_sim, tmp_path):
    plain = _train_dataset(tiny_sim, tmp_path, augment=False)
    augmented = _train_dataset(tiny_sim, tmp_path, augment=True)
    # a few epochs of the first tiles: every element of the group turns up
    idx = np.tile(np.arange(min(len(plain), 24)), len(EPOCHS))
    epochs = np.repeat(EPOCHS, min(len(plain), 24))
    elements = d4_elements(SEED, epochs, idx)
    assert set(elements.tolist()) == set(range(8))
    keys = [(int(i), int(e)) for i, e in zip(idx, epochs)]
    want = augmented.__getitems__(keys)
    got = augment_batch(plain.__getitems__(keys), torch.from_numpy(elements))
    assert torch.equal(got["image"], want["image"])
    for key in ("xy", "target"):  # NaN-padded slots stay NaN; the rest bit for bit
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(got["target"]).sum() > 0
    for key in ("valid", "dmag", "snr", "edge_dist", "origin", "reversed"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, equal_nan=True)


def test_augment_batch_checks_its_inputs():
    batch = {"image": torch.zeros(3, 2, 8, 8)}
    with pytest.raises(ValueError, match=r"elements must be \(3,\), got \(2,\)"):
        augment_batch(batch, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"image must be \(B, C, n, n\), got \(3, 2, 8\)"):
        augment_batch({"image": torch.zeros(3, 2, 8)}, torch.tensor([0, 1, 2]))


def test_speed_switches_are_hyperparameters():
    net = Attn5(filters=[4, 4], pool_blocks=2, head="softargmax")
    task = LocalizationTask(net, channels_last=True, compile=False)
    assert task.hparams.channels_last is True and task.hparams.gpu_augment == "auto"
    assert task.hparams.net["_target_"] == "rtcnn.models.attn5.Attn5"
    assert "optimizer" not in task.hparams
    task.setup("fit")
    assert task.net.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = task.on_after_batch_transfer({"image": torch.rand(2, 2, 8, 8)}, 0)
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="gpu_augment must be true, false or 'auto', got 'yes'"):
        LocalizationTask(net, gpu_augment="yes")
    det = DetectionTask({"_target_": "rtcnn.models.detector.DenseDetector",
                         "channels": [4, 4]}, gpu_augment=False)
    assert det.hparams.gpu_augment is False and det.hparams.threshold == 0.5


class ProbeForTest(Callback):
    """Records, per training batch, whether the image reached the task channels-last."""

    seen: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["image"].is_contiguous(memory_format=torch.channels_last))


def test_fit_with_device_augmentation_and_channels_last(tiny_sim, tmp_path):
    cfg = compose_train(["trainer=debug", "trainer.max_epochs=1", "model.gpu_augment=true",
                         "model.channels_last=true", "logger=csv", "test=false",
                         *tiny_overrides(tiny_sim, tmp_path)], tmp_path / "run")
    with open_dict(cfg):
        cfg.callbacks.probe = {"_target_": f"{__name__}.ProbeForTest"}
    ProbeForTest.seen = []
    metrics, objects = train(cfg)
    model, dm = objects["model"], objects["datamodule"]
    assert model.augment_on_device is True
    assert dm.datasets["train"].augment is False  # the loader's own D4 was switched off
    assert ProbeForTest.seen and all(ProbeForTest.seen)
    assert np.isfinite(float(metrics["train/loss"]))
