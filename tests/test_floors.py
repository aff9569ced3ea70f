"""Accuracy floors that fail when a model breaks.

* the shipped detector (``rtcnn/models/weights/dense``) on a fresh simulated epochs pair
  (sim seed :data:`DET_SEED`, never used in training: the detector was trained on seed 2,
  attn5 on seed 0): completeness of the transients with S/N >= 10, false positives, the
  positions of the bright ones, and no worse than ``rtcnn.baseline`` on the same pair;
* the shipped attn5 (``rtcnn/models/weights/attn5``) on fresh inject-mode tiles (sim seed
  :data:`ATTN5_SEED`): within 2 px >= 0.95 (the issue's floor);
* a seeded ~40 s attn5 training on a tiny set reaches a within-2px floor on its test pairs.

Each floor was set from a measurement (the value is in the comment next to it) and was
shown to fail with a broken model (weights perturbed, or the pixel convention flipped):
the values are in /work/notes/README-models.md and the functions below take any model
source so the same measurement runs on a broken one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from rtcnn import baseline, detect
from rtcnn.checkpoint import load_model
from rtcnn.models.attn5 import Attn5
from rtcnn.scoring import evaluate, load_pairs

DET_SEED = 4243  # fresh epochs pair: not the detector's training seed (2) nor the default (0)
DET_SIZE = 2048  # px (default scene density: ~190 transients, ~140 with S/N >= 10)
BRIGHT_SNR = 10.0  # "bright": difference-image S/N >= 10
ATTN5_SEED = 4242  # fresh inject-mode tiles for the shipped attn5 (its card's fresh set)
ATTN5_PAIRS, ATTN5_SIZE = 6, 1024  # the attn5 training data's pair size (sim-default)

# Floors, each set a little below the value measured with the shipped models (in comments).
# shipped dense (epoch 4 of experiment=dense trainer.max_epochs=5) on the DET_SEED pair:
# completeness(S/N >= 10) 0.853 (116/136), 1 false positive of 131 detections, completeness
# 0.668, bright median offset 0.068 px (90 %: 0.12 px); rtcnn.baseline on the same pair:
# 0.868, 6 false positives, completeness 0.637, 0.067 px.
DET_COMPLETENESS_SNR10 = 0.80
DET_FALSE_POSITIVES = 3  # per 2048^2 px pair
DET_BRIGHT_OFFSET_PX = 0.2  # median offset of the matched S/N >= 10 transients (the issue's)
DET_BASELINE_SNR10_SLACK = 0.03  # at S/N >= 10 the detector finds 2 fewer of 136 (0.015)
# shipped attn5 (epoch 42 of python -m rtcnn.train trainer.max_time=null) on the 6 pairs of
# ATTN5_SEED: within 2 px 0.954 (303 tiles). On other fresh sets: 0.962 (475 tiles, seed 4242
# pairs 1-9) but 0.921 (178 tiles, seed 4244, 3 pairs): the model sits AT this floor.
ATTN5_WITHIN2PX = 0.95  # the floor


# --------------------------------------------------------------------------- detector
@pytest.fixture(scope="module")
def fresh_pair(tmp_path_factory) -> Path:
    """One fresh 2048 px epochs-mode pair (rtcnn.sim, seed :data:`DET_SEED`)."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("fresh_epochs")
    simulate_dataset(root, 1, DET_SIZE, "epochs", DET_SEED, progress=False)
    return root / "pair_0000"


def pair_metrics(catalog: Path, pair: Path) -> dict:
    """Completeness (S/N >= 10), false positives and bright offsets of one catalog."""
    (score,) = load_pairs([str(catalog), str(pair / "truth.ecsv")], None, None)[str(catalog)]
    m = evaluate([score], snr_min=BRIGHT_SNR)
    di, ti = score.matched(2.0)
    t = score.truth
    bright = t["transient"][ti] & (t["snr"][ti] >= BRIGHT_SNR)
    d = np.hypot(score.det_xy[di[bright], 0] - t["x"][ti[bright]],
                 score.det_xy[di[bright], 1] - t["y"][ti[bright]])
    return {"completeness_snr10": m["completeness_snr"], "n_snr10": m["n_snr"],
            "false_positives": m["n_false"], "n_detections": m["n_detections"],
            "completeness": m["completeness"],
            "bright_offset_median": float(np.median(d)) if d.size else np.inf,
            "bright_offset_p90": float(np.percentile(d, 90)) if d.size else np.inf}


def detector_metrics(model: str, pair: Path, out: Path) -> dict:
    """``rtcnn.detect --model MODEL`` on ``pair``, scored against its truth."""
    cat = out / "det.ecsv"
    assert detect.main([str(pair / "ref.fits"), str(pair / "new.fits"), "--model", model,
                        "-o", str(cat), "--no-progress", "--overwrite"]) == 0
    return pair_metrics(cat, pair)


def baseline_metrics(pair: Path, out: Path) -> dict:
    """``rtcnn.baseline`` (default threshold) on ``pair``, scored against its truth."""
    cat = out / "base.ecsv"
    assert baseline.main([str(pair / "ref.fits"), str(pair / "new.fits"), "-o", str(cat),
                          "--overwrite"]) == 0
    return pair_metrics(cat, pair)


def test_shipped_detector_floors_on_a_fresh_pair(fresh_pair, tmp_path):
    det = detector_metrics("dense", fresh_pair, tmp_path)
    base = baseline_metrics(fresh_pair, tmp_path)
    assert det["n_snr10"] >= 30, det  # enough bright transients to measure a fraction
    assert det["completeness_snr10"] >= DET_COMPLETENESS_SNR10, det
    assert det["false_positives"] <= DET_FALSE_POSITIVES, det
    assert det["bright_offset_median"] <= DET_BRIGHT_OFFSET_PX, det
    # no worse than the classical matched filter on the same pair: at most its false
    # positives, at least its completeness (all transients), and at S/N >= 10 within slack
    assert det["false_positives"] <= base["false_positives"], (det, base)
    assert det["completeness"] >= base["completeness"], (det, base)
    assert det["completeness_snr10"] >= base["completeness_snr10"] - DET_BASELINE_SNR10_SLACK, (
        det, base)


# --------------------------------------------------------------------------- attn5
@pytest.fixture(scope="module")
def fresh_tiles(tmp_path_factory) -> Path:
    """Fresh inject-mode pairs like the attn5 training data (sim seed :data:`ATTN5_SEED`)."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("fresh_inject")
    simulate_dataset(root, ATTN5_PAIRS, ATTN5_SIZE, "inject", ATTN5_SEED, progress=False)
    return root


def attn5_within2px(net: torch.nn.Module, root: Path, data_cfg: dict | None = None) -> dict:
    """Within-2px fraction of ``net`` on every transient tile of the pairs under ``root``.

    The tiles are those of ``data=fits`` with the attn5 data config (``conf/data/sim.yaml``
    values: minmax normalisation, reversal, S/N >= 5), all pairs in one split, no
    augmentation; the positions are read by :func:`rtcnn.report.predict_split`.
    """
    from rtcnn.data import FitsDataModule
    from rtcnn.report import predict_split, split_metrics
    from rtcnn.tasks import LocalizationTask

    cfg = {"batch_size": 64, "num_workers": 0, "persistent_workers": False, "progress": False,
           "val_fraction": 0.0, "test_fraction": 0.0, "augment": False, "drop_last": False,
           "samples": "transient", "min_snr": 5.0, "reverse": True, "normalization": "minmax",
           **(data_cfg or {})}
    dm = FitsDataModule(str(root), **cfg)
    dm.setup("fit")
    loader = dm._loader("train", shuffle=False)  # every tile once, in order
    pred = predict_split(LocalizationTask(net=net, n_panels=0), loader, views=("identity",))
    return split_metrics(pred)


def test_shipped_attn5_within_2px_on_fresh_tiles(fresh_tiles):
    net = load_model("attn5", expect=Attn5).net
    m = attn5_within2px(net, fresh_tiles)
    assert m["n_tiles"] >= 100, m
    assert m["within2px"] >= ATTN5_WITHIN2PX, m


# --------------------------------------------------------------------------- training
TRAIN_SEED = 12  # simulator seed of the tiny training set
TRAIN_PAIRS, TRAIN_SIZE, TRAIN_TRANSIENTS = 4, 512, 60  # 3 train pairs, 1 test pair
TRAIN_TILE = 32  # px: small tiles keep the run short (4x4 attention cells of 8 px)
TRAIN_STEPS_EPOCHS = 50  # epochs of 4 batches of 32 tiles: 200 steps
# measured: within 2 px 0.390 (16 of 41 test tiles), within 5 px 0.976, median 2.2 px after
# the 200 steps (48 s on the loaded 2-core machine); the same run with lr=0: 0.024
TRAIN_WITHIN2PX = 0.30


def test_a_seeded_tiny_attn5_training_reaches_a_within_2px_floor(tmp_path):
    import functools

    import lightning as L

    from rtcnn.data import FitsDataModule
    from rtcnn.report import predict_split, split_metrics
    from rtcnn.sim import simulate_dataset
    from rtcnn.tasks import LocalizationTask

    simulate_dataset(tmp_path, TRAIN_PAIRS, TRAIN_SIZE, "inject", TRAIN_SEED, progress=False,
                     n_transients=TRAIN_TRANSIENTS)
    L.seed_everything(0, verbose=False)
    dm = FitsDataModule(str(tmp_path), tile_size=TRAIN_TILE, tile_overlap=TRAIN_TILE // 6,
                        batch_size=32, num_workers=0, persistent_workers=False, progress=False,
                        val_fraction=0.0, test_fraction=0.25, seed=0)
    task = LocalizationTask(net=Attn5(filters=[8, 16, 32, 32, 64]), n_panels=0,
                            optimizer=functools.partial(torch.optim.Adam, lr=0.01))
    trainer = L.Trainer(max_epochs=TRAIN_STEPS_EPOCHS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, accelerator="cpu")
    trainer.fit(task, dm)
    m = split_metrics(predict_split(task, dm.test_dataloader(), views=("identity",)))
    assert m["n_tiles"] >= 30, m
    assert m["within2px"] >= TRAIN_WITHIN2PX, m
