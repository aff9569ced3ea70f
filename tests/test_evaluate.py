"""The evaluation report: robustness mapping (oracle model), tables, files, the command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from astropy.table import Table
from torch.utils.data import DataLoader
from numpy.testing import assert_allclose

from rtcnn import augment, evaluate, report

TILE = 64  # px
SIGMA = 1.5  # px, Gaussian width of the synthetic sources


def _gaussian(xy, n=TILE, sigma=SIGMA, flux=100.0):
    yy, xx = np.mgrid[0:n, 0:n]
    return flux * np.exp(-((xx - xy[0]) ** 2 + (yy - xy[1]) ** 2) / (2 * sigma**2))


def _batches(n_tiles=10, batch_size=4, seed=0):
    """Tiles of the data contract: a static star in both images, a transient in 'new'."""
    rng = np.random.default_rng(seed)
    true = rng.uniform(8, TILE - 9, (n_tiles, 2))  # sub-pixel, well inside the tile
    images = np.zeros((n_tiles, 2, TILE, TILE), np.float32)
    for i, xy in enumerate(true):
        star = _gaussian(rng.uniform(8, TILE - 9, 2), flux=300.0)
        images[i, 0] = star
        images[i, 1] = star + _gaussian(xy)
    out = []
    for s in range(0, n_tiles, batch_size):
        sl = slice(s, s + batch_size)
        b = len(true[sl])
        out.append({
            "image": torch.from_numpy(images[sl]),
            "target": torch.from_numpy(true[sl] / TILE).float(),
            "pair": [f"pair_{s + j:04d}" for j in range(b)],
            "origin": torch.tensor([[54 * (s + j), 108] for j in range(b)]),
            "dmag_sel": torch.full((b,), -1.5),
            "edge_dist": torch.from_numpy(np.minimum(true[sl] + 0.5, TILE - 0.5 - true[sl]).min(1)),
            "mag": torch.full((b,), 22.0),
            "snr": torch.linspace(5, 30, b),
        })
    return out, true


class DifferenceCentroid(torch.nn.Module):
    """Oracle: the intensity-weighted centroid of the positive difference new - ref.

    Exact (to float precision) for an isolated noiseless Gaussian transient, and it
    follows the transient under any D4 view, so it "knows" the truth in every view.
    """

    def __init__(self, with_dmag=False):
        super().__init__()
        self.with_dmag = with_dmag

    def forward(self, x):
        d = (x[:, 1] - x[:, 0]).clamp(min=0).double()
        n = x.shape[-1]
        ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        w = d.sum((1, 2))
        xy = torch.stack([(d * xs).sum((1, 2)) / w, (d * ys).sum((1, 2)) / w], 1) / n
        if self.with_dmag:
            xy = torch.cat([xy, torch.full((len(xy), 1), -1.25, dtype=xy.dtype)], 1)
        return xy.float()


class ListDataModule(L.LightningDataModule):
    """A LightningDataModule over fixed batches of the data contract."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches
        self.stages = []

    def setup(self, stage):
        self.stages.append(stage)

    def val_dataloader(self):
        return DataLoader(self.batches, batch_size=None)  # items are whole batches

    def test_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def test_oracle_robustness_zero_under_all_views():
    batches, true = _batches()
    pred = report.predict_split(DifferenceCentroid(), batches, views=augment.PAPER_VIEWS)
    assert pred.view_xy.shape == (len(true), 6, 2)
    assert_allclose(pred.true_xy, true, atol=1e-5)
    assert_allclose(pred.view_distance, 0.0, atol=1e-3)
    table = report.robustness_table(pred)
    assert_allclose(table["dist_median"], 0.0, atol=1e-3)
    for g in augment.PAPER_VIEWS:
        assert_allclose(np.median(table[f"dist_{g}"]), 0.0, atol=1e-3)


def test_oracle_robustness_detects_wrong_inverse(monkeypatch):
    # the test above has power: mapping back with the forward map instead of the inverse
    # leaves the rot90 / rot270 predictions far from the truth
    batches, _ = _batches()
    monkeypatch.setattr(report, "invert_coords", augment.apply_coords)
    pred = report.predict_split(DifferenceCentroid(), batches, views=augment.PAPER_VIEWS)
    med = np.median(pred.view_distance, axis=0)
    assert med[augment.PAPER_VIEWS.index("rot90")] > 5.0
    assert med[augment.PAPER_VIEWS.index("identity")] < 1e-3


def test_predict_split_views_must_start_with_identity():
    batches, _ = _batches(n_tiles=2)
    with pytest.raises(ValueError, match="views must start with 'identity'"):
        report.predict_split(DifferenceCentroid(), batches, views=("rot90", "identity"))


def test_angle_convention_in_predictions_table():
    # a model that always predicts 2 px above (+y, row index + 2) the true position
    batches, true = _batches(n_tiles=4)

    class Up(torch.nn.Module):
        def forward(self, x):
            return DifferenceCentroid()(x) + torch.tensor([0.0, 2.0 / TILE])

    pred = report.predict_split(Up(), batches, views=("identity",))
    table = report.predictions_table(pred)
    assert_allclose(table["angle"], 90.0, atol=1e-2)
    assert_allclose(table["distance"], 2.0, atol=1e-3)
    assert table["angle"].unit == "deg"


def test_extremes_are_best_and_worst():
    batches, true = _batches(n_tiles=9)

    class Biased(torch.nn.Module):  # error = 0.05 * true x (px): best = leftmost transient
        def forward(self, x):
            xy = DifferenceCentroid()(x)
            return xy + torch.stack([0.05 * xy[:, 0], 0 * xy[:, 1]], 1)

    pred = report.predict_split(Biased(), batches, views=("identity",), n_extremes=3)
    ex = pred.extremes
    order = np.argsort(true[:, 0])
    assert ex["n_best"] == 3
    assert ex["index"].tolist() == order[:3].tolist() + order[::-1][:3].tolist()
    flat = torch.cat([b["image"] for b in batches]).numpy()
    assert_allclose(ex["images"], flat[ex["index"]])  # the images kept are those tiles'


def test_write_report_files_and_roundtrip(tmp_path):
    batches, true = _batches(n_tiles=10)
    dm = ListDataModule(batches)
    result = evaluate.write_report(DifferenceCentroid(with_dmag=True), dm, tmp_path / "ev",
                                   meta={"checkpoint": "oracle"}, n_extremes=1)
    out = tmp_path / "ev"
    for name in ("metrics.json", "predictions.ecsv", "robustness.ecsv", "error_distribution.png",
                 "error_vs_dmag_edge.png", "best_worst_tiles.png", "robustness.png"):
        assert (out / name).is_file(), name
    assert dm.stages == ["validate", "test"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == set(result["splits"]) == {"val", "test", "val_snr10",
                                                                 "test_snr10"}
    for split in ("val", "test"):
        m = metrics["splits"][split]
        assert m["n_tiles"] == 10 and m["n_pairs"] == 10
        assert m["within1px"] == 1.0 and m["dist_max"] < 1e-3
        assert_allclose(m["dmag_mae"], 0.25, atol=1e-6)  # predicts -1.25, truth -1.5
        assert_allclose(m["dmag_bias"], 0.25, atol=1e-6)
    assert metrics["splits"]["test_snr10"]["n_tiles"] == 7  # snr 5 ... 30 per batch of 4/4/2
    assert metrics["robustness"]["median_of_median_px"] < 1e-3
    assert metrics["checkpoint"] == "oracle"

    written = report.predictions_table(
        report.predict_split(DifferenceCentroid(with_dmag=True), batches,
                             views=("identity",)), {"checkpoint": "oracle", "split": "test"})
    back = Table.read(out / "predictions.ecsv", format="ascii.ecsv")
    assert back.colnames == written.colnames
    for name in back.colnames:
        assert back[name].unit == written[name].unit, name
        if back[name].dtype.kind == "f":
            assert_allclose(back[name], written[name], rtol=1e-12, err_msg=name)
        else:
            assert list(back[name]) == list(written[name]), name
    assert back.meta["angle_convention"] == report.ANGLE_CONVENTION
    assert str(back["x_true"].unit) == "pix" and str(back["dmag"].unit) == "mag"
    # full-image = tile + origin
    assert_allclose(back["x_true_image"], back["x_true"] + back["x0"])
    assert_allclose(back["y_pred_image"], back["y_pred"] + back["y0"])

    rob = Table.read(out / "robustness.ecsv", format="ascii.ecsv")
    assert len(rob) == 10 and rob.meta["views"] == list(augment.PAPER_VIEWS)
    assert {f"dist_{g}" for g in augment.PAPER_VIEWS} <= set(rob.colnames)

    with pytest.raises(evaluate.RtcnnInputError, match="already holds an evaluation"):
        evaluate.write_report(DifferenceCentroid(), dm, out)


def test_run_dir_and_new_eval_dir(tmp_path):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("a: 1\n")
    ckpt = run / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"")
    assert evaluate.run_dir_of(ckpt) == run.resolve()
    bare = tmp_path / "bare" / "checkpoints" / "x.ckpt"
    assert evaluate.run_dir_of(bare) == (tmp_path / "bare").resolve()
    first = evaluate.new_eval_dir(run)
    assert first.parent == run / "eval"
    first.mkdir(parents=True)
    second = evaluate.new_eval_dir(run, now=None)
    assert second != first and not second.exists()


@pytest.mark.parametrize(
    "content, problem",
    [(None, "checkpoint not found"), (b"not a checkpoint", "not a readable PyTorch checkpoint"),
     ("nodict", "not a Lightning checkpoint")],
)
def test_check_checkpoint_errors(tmp_path, content, problem):
    path = tmp_path / "model.ckpt"
    if content == "nodict":
        torch.save({"weights": 1}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(evaluate.RtcnnInputError, match=problem):
        evaluate.check_checkpoint(path)
    with pytest.raises(evaluate.RtcnnInputError, match="no checkpoint given"):
        evaluate.check_checkpoint(None)


def test_predict_split_skips_tiles_without_transient_and_limits():
    batches, true = _batches(n_tiles=8)
    batches[0]["target"][1] = float("nan")
    pred = report.predict_split(DifferenceCentroid(), batches, views=("identity",))
    assert len(pred) == 7 and pred.pair[1] == "pair_0002"
    assert_allclose(pred.true_xy, np.delete(true, 1, axis=0), atol=1e-5)
    limited = report.predict_split(DifferenceCentroid(), batches, views=("identity",),
                                   max_tiles=5)
    assert limited.pair == pred.pair[:5]


def test_report_figures_callback_logs_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rtcnn.tasks import LocalizationTask

    batches, _ = _batches(n_tiles=8)
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    trainer = L.Trainer(accelerator="cpu", logger=logger,
                        callbacks=[report.ReportFigures(n_extremes=1)],
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(LocalizationTask(net=DifferenceCentroid(), n_panels=0),
                 datamodule=ListDataModule(batches), verbose=False)
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {f"report/{k}" for k in ("error_distribution", "error_vs_dmag_edge",
                                     "best_worst_tiles", "robustness")} <= tags


# ----------------------------------------------------------------- the command, tiny run
REPO = Path(__file__).resolve().parents[1]


def _run_cli(args, tmp_path):
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "rtcnn.evaluate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(sim128, tmp_path_factory):
    """A real training run in miniature: sim pairs (conftest ``sim128``), a small attn5
    fitted a few steps, ``<run>/checkpoints/last.ckpt`` and ``<run>/.hydra/config.yaml``
    with its data config."""
    from omegaconf import OmegaConf

    from rtcnn.models.attn5 import Attn5
    from rtcnn.tasks import LocalizationTask

    tmp = tmp_path_factory.mktemp("tiny")
    data_cfg = {"_target_": "rtcnn.data.SimDataModule", "root": str(sim128), "pairs": 4,
                "size": 128, "sim_seed": 3, "scene": {"n_transients": 6}, "batch_size": 4, "num_workers": 0,
                "persistent_workers": False, "val_fraction": 0.25, "test_fraction": 0.25,
                "progress": False}
    run = tmp / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"data": data_cfg}), run / ".hydra" / "config.yaml")
    import hydra.utils

    dm = hydra.utils.instantiate(data_cfg)
    task = LocalizationTask(net=Attn5(filters=[4, 4, 4, 4, 4], hidden=8), n_panels=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, dm)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


def test_command_writes_every_file_in_a_new_eval_dir(tiny_run, tmp_path):
    ckpt = tiny_run / "checkpoints" / "last.ckpt"
    proc = _run_cli([f"ckpt_path={ckpt}", "n_extremes=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (tiny_run / "eval").iterdir()
    for name in ("metrics.json", "predictions.ecsv", "robustness.ecsv", "error_distribution.png",
                 "error_vs_dmag_edge.png", "best_worst_tiles.png", "robustness.png",
                 "evaluate.log", ".hydra/config.yaml"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["checkpoint"] == str(ckpt.resolve())
    assert metrics["data"]["size"] == 128  # the run's own data config
    test = Table.read(out / "predictions.ecsv", format="ascii.ecsv")
    assert len(test) == metrics["splits"]["test"]["n_tiles"] > 0
    assert "test: n=" in (out / "evaluate.log").read_text()


def test_command_missing_checkpoint_is_one_line_exit_2(tmp_path):
    proc = _run_cli([f"ckpt_path={tmp_path / 'nope.ckpt'}"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"rtcnn: error: {tmp_path / 'nope.ckpt'}: checkpoint not found"


def test_run_group_config_run_vs_overrides(tmp_path):
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"data": {"_target_": "Run", "root": "${paths.data_dir}/x",
                                              "num_workers": 2}}), run / ".hydra/config.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    cfg = OmegaConf.create({"paths": {"data_dir": "/d"},
                            "data": {"_target_": "Composed", "num_workers": 0, "size": 64}})
    OmegaConf.set_struct(cfg, True)
    got = evaluate.run_group_config(cfg, ckpt, "data")
    assert got._target_ == "Run" and got.root == "/d/x" and got.num_workers == 2
    got = evaluate.run_group_config(cfg, ckpt, "data", ["data.num_workers=0"])  # key replaced
    assert got._target_ == "Run" and got.num_workers == 0 and "size" not in got
    assert evaluate.run_group_config(cfg, ckpt, "data", ["data=sim"])._target_ == "Composed"
    bare = tmp_path / "bare" / "x.ckpt"
    assert evaluate.run_group_config(cfg, bare, "data")._target_ == "Composed"


def test_load_module_rejects_non_localization_models(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "rtcnn.tasks.detection.DetectionTask"})
    with pytest.raises(evaluate.RtcnnInputError, match="reports localisation models"):
        evaluate.load_module(cfg, tmp_path / "x.ckpt")
    with pytest.raises(evaluate.RtcnnInputError, match="cannot import"):
        evaluate.load_module(OmegaConf.create({"_target_": "rtcnn.nowhere.Model"}), "x.ckpt")


@pytest.mark.parametrize(
    "key, value, problem",
    [("splits", ["train"], "must be a non-empty list"), ("views", ["rot90"], "must start with"),
     ("views", ["identity", "spin"], "must start with"), ("n_extremes", 0, "must be >= 1")],
)
def test_check_options(key, value, problem):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"splits": ["val", "test"], "views": list(augment.PAPER_VIEWS),
                            "n_extremes": 3, "device": "cpu"})
    assert evaluate.check_options(cfg) == "cpu"
    cfg[key] = value
    with pytest.raises(evaluate.RtcnnInputError, match=problem):
        evaluate.check_options(cfg)
