"""The star/galaxy classifier: stamps (data=stamps), StarGalaxyNet, ClassificationTask, report.

One small simulated set (2 pairs of 384 px, dense bright stars and galaxies, made once per
module) is trained on for a few epochs through ``rtcnn.train`` with ``experiment=stargal``;
the test pair's accuracy on sources brighter than AB 23 must reach a measured floor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.table import Table
from numpy.testing import assert_allclose
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import compose_train
from rtcnn.data.stamps import StampDataModule, build_stamp_index, catalog_labels
from rtcnn.errors import RtcnnInputError
from rtcnn.io import find_pairs
from rtcnn.models.stargal import StarGalaxyNet

SCENE = dict(sca=1, star_density=1200.0, galaxy_density=1200.0, star_mag=(18.0, 24.0),
             galaxy_mag=(19.0, 24.0), n_transients=0, variable_fraction=0.0)
SIZE = 384  # px
# Measured with this seed and set (CPU, 1 thread): test accuracy of sources brighter than
# AB 23 0.98-0.99 and AUROC 0.99-1.0 after 5 epochs; a broken model (labels shuffled, or
# the network's output ignored) gives ~0.5. Floors leave room for thread-count jitter.
FLOOR_ACCURACY_BRIGHT = 0.93
FLOOR_AUROC = 0.95


@pytest.fixture(scope="module")
def stamp_sim(tmp_path_factory) -> Path:
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("stamp_sim")
    simulate_dataset(root, pairs=2, size=SIZE, mode="inject", seed=11, progress=False, **SCENE)
    return root


def _overrides(root: Path, out: Path) -> list[str]:
    return ["experiment=stargal", "callbacks=none", "logger=tensorboard",
            f"data.root={root}", "data.source=fits", "data.val_fraction=0.0",
            "data.test_fraction=0.5", "data.batch_size=32", "data.progress=false",
            "model.net.filters=[8,16,32]", "model.net.hidden=32", "trainer.max_epochs=5",
            "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "+trainer.enable_progress_bar=false", f"paths.root_dir={out}",
            "extras.print_config=false"]


@pytest.fixture(scope="module")
def trained(stamp_sim, tmp_path_factory):
    """``experiment=stargal`` trained 5 epochs on pair 0, tested on pair 1 (rtcnn.train)."""
    from rtcnn.train import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("stargal_run")
    cfg = compose_train(_overrides(stamp_sim, out), out / "run")
    metrics, objects = train(cfg)
    return metrics, objects, out / "run"


def test_catalog_labels_class_kind_and_errors(tmp_path):
    t = Table({"class": ["star", " Galaxy", "transient", "STAR"]})
    assert catalog_labels(t, "c.ecsv").tolist() == [0, 1, -1, 0]
    t = Table({"kind": ["variable", "galaxy", "star"]})
    assert catalog_labels(t, "c.ecsv").tolist() == [0, 1, 0]
    assert catalog_labels(Table({"CLASS": [1, 0]}), "c").tolist() == [1, 0]
    with pytest.raises(RtcnnInputError, match="must be 0 .star. or 1"):
        catalog_labels(Table({"class": [0, 2]}), "c.ecsv")
    with pytest.raises(RtcnnInputError, match="needs a 'class'"):
        catalog_labels(Table({"x": [1.0]}), "c.ecsv")


def test_stamps_centred_labelled_and_split_by_pair(stamp_sim):
    dm = StampDataModule(str(stamp_sim), source="fits", val_fraction=0.0, test_fraction=0.5,
                         batch_size=16, progress=False, channels="pair")
    dm.setup()
    assert set(dm.pairs("train")).isdisjoint(dm.pairs("test"))
    batch = next(iter(dm.test_dataloader()))  # no augmentation outside training
    assert batch["image"].shape == (16, 2, 32, 32) and batch["image"].dtype == torch.float32
    # the source sits on the stamp's centre pixel 16 (0-based), within half a pixel
    assert ((batch["xy"] - 16.0).abs() <= 0.5 + 1e-6).all()
    # labels = the simulator's kinds of the sources fully inside the images
    pair = dm.pairs("test")[0]
    src = Table.read(stamp_sim / pair / "sources.ecsv")
    ix, iy = np.floor(src["x"] + 0.5), np.floor(src["y"] + 0.5)
    inside = (ix >= 16) & (iy >= 16) & (ix + 16 <= SIZE) & (iy + 16 <= SIZE)
    want = np.bincount((src["kind"][inside] == "galaxy").astype(int), minlength=2)
    assert_allclose(np.bincount(dm.datasets["test"].labels, minlength=2), want)
    # the stamp's centre pixel is the source's pixel in the reference image
    from rtcnn.io import read_image

    ref = read_image(stamp_sim / pair / "ref.fits").data
    dm0 = StampDataModule(str(stamp_sim), source="fits", val_fraction=0.0, test_fraction=0.5,
                          batch_size=4, progress=False, normalization="none")
    dm0.setup()
    b = next(iter(dm0.test_dataloader()))
    x0, y0 = b["origin"][0].tolist()
    assert_allclose(b["image"][0, 0].numpy(), ref[y0:y0 + 32, x0:x0 + 32])


def test_training_stamps_are_d4_augmented(stamp_sim):
    dm = StampDataModule(str(stamp_sim), source="fits", val_fraction=0.0, test_fraction=0.5,
                         batch_size=64, progress=False, normalization="none", augment=True)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    x0, y0 = b["origin"][:, 0], b["origin"][:, 1]
    # augmented positions stay on the centre 2x2 pixels; at least one moved off the
    # unaugmented frame (x - x0 in [15.5, 16.5])
    assert ((b["xy"] - 15.5).abs() <= 1.0 + 1e-6).all()
    assert (b["xy"] < 15.5 - 1e-6).any()
    assert len(x0) == len(y0) == 64


def test_user_catalog_with_class_column(stamp_sim, tmp_path):
    pairs = find_pairs(stamp_sim)
    src = Table.read(Path(pairs[0].ref).parent / "sources.ecsv")
    mine = Table({"ra": src["ra"], "dec": src["dec"],
                  "class": np.where(src["kind"] == "galaxy", "galaxy", "star")})
    path = tmp_path / "mine.csv"
    mine.write(path, format="ascii.csv")
    index = build_stamp_index(pairs[:1], catalog=str(path), progress=False)
    ref = build_stamp_index(pairs[:1], progress=False)
    assert len(index) == len(ref)  # RA/Dec through the WCS land on the same pixels
    assert_allclose(index.stamps["x"], ref.stamps["x"], atol=0.01)
    assert_allclose(index.stamps["y"], ref.stamps["y"], atol=0.01)
    with pytest.raises(RtcnnInputError, match="file not found"):
        build_stamp_index(pairs[:1], catalog="nope.ecsv", progress=False, strict=True)


def test_stargal_net_shapes_and_errors():
    net = StarGalaxyNet(in_channels=2, stamp_size=32)
    assert net(torch.zeros(3, 2, 32, 32)).shape == (3,)
    with pytest.raises(ValueError, match="expected input"):
        net(torch.zeros(3, 1, 32, 32))
    with pytest.raises(ValueError, match="multiple of"):
        StarGalaxyNet(stamp_size=30)


def test_experiment_stargal_reaches_floor(trained):
    metrics, _, run = trained
    assert metrics["test/accuracy_bright"] >= FLOOR_ACCURACY_BRIGHT
    assert metrics["test/auroc"] >= FLOOR_AUROC
    # accuracy and loss curves in TensorBoard
    acc = EventAccumulator(str(run / "tensorboard")).Reload()
    for tag in ("train/accuracy", "train/loss", "train/auroc"):
        assert len(acc.Scalars(tag)) == 5


def test_report_files_and_shap(trained, tmp_path, monkeypatch):
    from rtcnn.report_stargal import write_classification_report

    _, objects, run = trained
    model, dm = objects["model"], objects["datamodule"]
    result = write_classification_report(model, dm, tmp_path / "r", splits=["val", "test"],
                                         n_worst=3, meta={"run_dir": str(run)})
    assert "val" not in result["splits"]  # no validation pairs: left out
    test = result["splits"]["test"]
    assert test["all"]["n_stamps"] == len(dm.datasets["test"])
    assert test["mag_lt_23"]["accuracy"] >= FLOOR_ACCURACY_BRIGHT
    for name in ("confusion_matrix.png", "roc.png", "accuracy_vs_mag.png",
                 "accuracy_vs_mag.ecsv", "predictions.ecsv", "worst_stamps.png",
                 "learning_curves.png"):
        assert (tmp_path / "r" / name).stat().st_size > 0
    table = Table.read(tmp_path / "r" / "accuracy_vs_mag.ecsv")
    assert table["n"].sum() == test["all"]["n_stamps"]
    assert len(list((tmp_path / "r" / "worst").glob("rank*_*.png"))) == 3
    saved = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert saved["shap"].startswith("3 SHAP panels")
    with pytest.raises(RtcnnInputError, match="already holds"):
        write_classification_report(model, dm, tmp_path / "r")
    # without shap: everything else, and one line saying so
    monkeypatch.setitem(sys.modules, "shap", None)
    result = write_classification_report(model, dm, tmp_path / "s", n_worst=2)
    assert "shap package is not installed" in result["shap"]
    assert (tmp_path / "s" / "roc.png").is_file() and not (tmp_path / "s" / "worst").exists()


def test_channel_mismatch_is_one_line_error(stamp_sim, tmp_path):
    from rtcnn.train import train

    cfg = compose_train([*_overrides(stamp_sim, tmp_path), "data.channels=pair"],
                        tmp_path / "run")
    with pytest.raises(RtcnnInputError, match="in_channels=2"):
        train(cfg)
