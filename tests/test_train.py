"""The training command end to end on a tiny simulated set (conftest.tiny_sim).

fit + test with trainer=debug, a 2-value multirun, resuming from a checkpoint, DDP on
CPU (2 processes, gloo), every experiment config, and the task's own pieces.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import CONF_DIR, compose_train, tiny_overrides
from rtcnn.models import Attn5
from rtcnn.tasks import DetectionTask, LocalizationTask, panel_figure
from rtcnn.train import train

REPO = Path(__file__).resolve().parents[1]
# experiments on the tile data (stargal classifies stamps of data=stamps: tests/test_stargal.py
# trains experiment=stargal through rtcnn.train and checks its accuracy floor)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")
                     if p.stem != "stargal")


def run_cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m rtcnn.train ARGS`` in ``cwd`` with the repository (and ``tests/``, for the
    callbacks of ``support``) importable, on one torch thread per process."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    env.pop("PROJECT_ROOT", None)
    proc = subprocess.run([sys.executable, "-m", "rtcnn.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def epoch_values(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name) not in (None, "")]


# ------------------------------------------------------------------------- end to end
def test_debug_fit_and_test_end_to_end(tiny_sim, tmp_path):
    out = tmp_path / "run"
    cfg = compose_train(["trainer=debug", "trainer.max_epochs=4", "logger=many_loggers",
                         *tiny_overrides(tiny_sim, tmp_path)], out)
    metrics, objects = train(cfg)

    # the loss fell: first vs last training epoch (csv logger)
    rows = read_csv_metrics(out / "csv" / "metrics.csv")
    losses = epoch_values(rows, "train/loss")
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    for name in ("val/within2px", "val/within2px_best", "val/loss", "test/within1px",
                 "test/within2px", "test/within5px", "test/dist_mean", "test/n_tiles",
                 "test/within2px_snr10", "test/n_tiles_snr10"):
        assert name in metrics, name
    assert metrics["test/n_tiles"] >= metrics["test/n_tiles_snr10"] >= 1

    # a best checkpoint and last.ckpt
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("epoch_") for n in ckpts)

    # TensorBoard: scalars, learning rate, image panels, hyperparameters
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    for name in ("train/loss", "val/loss", "val/within2px", "test/within2px", "lr-Adam"):
        assert name in tags["scalars"], name
    assert "val/panels" in tags["images"]
    assert any(t.startswith("report/") for t in tags["images"])  # ReportFigures after test
    assert (out / "tensorboard" / "hparams.yaml").is_file()

    # the checkpoint alone rebuilds the model (no arguments)
    best = objects["trainer"].checkpoint_callback.best_model_path
    module = LocalizationTask.load_from_checkpoint(best, map_location="cpu")
    assert isinstance(module.net, Attn5)
    assert module.net.config == objects["model"].net.config


def test_multirun_makes_separate_run_dirs(tiny_sim, tmp_path):
    args = ["-m", "model.optimizer.lr=1e-2,1e-3", "trainer=debug", "trainer.max_epochs=1",
            "logger=csv", *tiny_overrides(tiny_sim, tmp_path)]
    run_cli(args, cwd=tmp_path)
    sweeps = list((tmp_path / "outputs" / "train" / "multiruns").iterdir())
    assert len(sweeps) == 1
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    lrs = []
    for job in jobs:
        rows = read_csv_metrics(job / "csv" / "metrics.csv")
        assert epoch_values(rows, "val/within2px") and epoch_values(rows, "test/within2px")
        assert (job / "checkpoints" / "last.ckpt").is_file()
        lrs.append(OmegaConf.load(job / ".hydra" / "config.yaml").model.optimizer.lr)
        assert_allclose(epoch_values(rows, "lr-Adam")[0], lrs[-1])
    assert sorted(lrs) == [1e-3, 1e-2]


def test_resume_continues_epochs_and_optimizer(tiny_sim, tmp_path):
    base = ["trainer=debug", "test=false", "logger=csv", *tiny_overrides(tiny_sim, tmp_path)]
    first = compose_train([*base, "trainer.max_epochs=1"], tmp_path / "first")
    _, obj1 = train(first)
    steps = obj1["trainer"].global_step
    assert steps >= 1 and obj1["trainer"].current_epoch == 1
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == steps
    adam_steps = {float(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert adam_steps == {float(steps)}

    second = compose_train([*base, "trainer.max_epochs=2", f"ckpt_path={last}"],
                           tmp_path / "second")
    _, obj2 = train(second)
    trainer = obj2["trainer"]
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * steps
    state = trainer.optimizers[0].state
    assert {float(s["step"]) for s in state.values()} == {float(2 * steps)}
    # the resumed run wrote its own outputs; the first run's checkpoint is untouched
    assert (tmp_path / "second" / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    rows = read_csv_metrics(tmp_path / "second" / "csv" / "metrics.csv")
    assert {int(r["epoch"]) for r in rows if r.get("train/loss")} == {1}

    # test only, from the checkpoint: train=false test=true ckpt_path=...
    only = compose_train([*base, "train=false", "test=true", f"ckpt_path={last}"],
                         tmp_path / "test_only")
    metrics, _ = train(only)
    assert "test/within2px" in metrics and "val/within2px_best" not in metrics


def expected_shards(cfg, epoch: int, world: int = 2) -> tuple[dict[int, list[list]], set]:
    """rank -> the training tiles ``[pair, x0, y0]`` of ``epoch``, in order, that the
    sampler gives that process (from the composed data config, in this process); and the
    set of all training tiles."""
    import hydra.utils

    from rtcnn.data import EpochSampler

    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    ds = dm.datasets["train"]
    names = dm.index.pairs["name"][dm.index.tiles["pair"][ds.tile_ids]]
    origin = dm.index.tiles["origin"][ds.tile_ids]
    tiles = [[str(names[i]), *map(int, origin[i])] for i in range(len(ds))]
    out = {}
    for rank in range(world):
        sampler = EpochSampler(len(ds), shuffle=True, seed=cfg.data.seed, num_replicas=world,
                               rank=rank)
        sampler.set_epoch(epoch)
        out[rank] = [tiles[i] for i in sampler.shard()]
    return out, {tuple(t) for t in tiles}


# two gloo processes, twice: ~40 s on an idle 2-core machine (the DDP path is a must)
def test_ddp_shards_and_an_exact_mid_epoch_resume(tiny_sim, tmp_path):
    """Two CPU processes (gloo): each trains on its own shard of every epoch (disjoint, and
    together the whole training split), and a run resumed from a checkpoint saved after
    step 1 (mid-epoch 0) ends exactly where the uninterrupted run ends, on the same tiles."""
    from support import assert_same_state, load, read_tiles

    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.sync_batchnorm=false", "trainer.precision=32", "trainer.max_epochs=2",
           "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
           "trainer.num_sanity_val_steps=0", "logger=csv", "model.net.filters=[4,8,8,8,8]",
           *tiny_overrides(tiny_sim, tmp_path), "data.batch_size=4"]
    record = "+callbacks.record._target_=support.RecordTiles"
    mid = tmp_path / "mid.ckpt"
    proc = run_cli([*ddp, f"hydra.run.dir={tmp_path / 'a'}", record,
                    f"+callbacks.record.folder={tmp_path / 'a_tiles'}",
                    "+callbacks.pause._target_=support.PauseAt", "+callbacks.pause.step=1",
                    f"+callbacks.pause.save={mid}"], cwd=tmp_path)
    assert "world_size=2" in proc.stderr or "MEMBER: 2/2" in proc.stderr
    rows = read_csv_metrics(tmp_path / "a" / "csv" / "metrics.csv")
    assert epoch_values(rows, "test/within2px")

    # the shards: each process got exactly its sampler's shard, batch by batch
    cfg = compose_train(ddp, tmp_path / "cfg")
    seen = read_tiles(tmp_path / "a_tiles")
    assert sorted(seen) == [0, 1]
    for epoch in (0, 1):
        want, every = expected_shards(cfg, epoch)
        assert {tuple(t) for r in want for t in want[r]} == every  # complete
        pad = len(want[0]) + len(want[1]) - len(every)
        assert pad == -len(every) % 2  # disjoint but for the padding to equal shards
        got = {r: [t for rec in seen[r] if rec["epoch"] == epoch for t in rec["tiles"]]
               for r in seen}
        steps = {r: sum(rec["epoch"] == epoch for rec in seen[r]) for r in seen}
        assert steps[0] == steps[1] >= 2  # the same number of steps on each process
        for r in (0, 1):  # drop_last: the last partial batch is left out
            assert got[r] == want[r][: steps[r] * cfg.data.batch_size]
        assert len({tuple(t) for t in got[0]} & {tuple(t) for t in got[1]}) <= pad

    # resumed under DDP from mid-epoch 0: the same tiles after step 1 and the same end state
    assert (load(mid)["epoch"], load(mid)["global_step"]) == (0, 1)
    run_cli([*ddp, f"hydra.run.dir={tmp_path / 'b'}", record,
             f"+callbacks.record.folder={tmp_path / 'b_tiles'}", f"ckpt_path={mid}",
             "test=false"], cwd=tmp_path)
    resumed = read_tiles(tmp_path / "b_tiles")
    for r in (0, 1):
        assert resumed[r] == [rec for rec in seen[r] if rec["step"] >= 1]
    assert_same_state(load(tmp_path / "b" / "checkpoints" / "last.ckpt"),
                      load(tmp_path / "a" / "checkpoints" / "last.ckpt"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_configs_compose_and_run(tiny_sim, tmp_path, name):
    # one real (not fast_dev_run) epoch of 2 batches with TensorBoard, so that every
    # callback of the experiment runs with a logger, as in a real run
    overrides = [f"experiment={name}", *tiny_overrides(tiny_sim, tmp_path),
                 "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
                 "trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu",
                 "trainer.devices=1", "trainer.precision=32", "trainer.strategy=auto",
                 "logger=tensorboard"]
    cfg = compose_train(overrides, tmp_path / "run")
    metrics, _ = train(cfg)
    assert "test/within2px" in metrics
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))


def test_dense_experiment_is_the_reported_recipe(tmp_path):
    """experiment=dense trains its 12 epochs (no CPU time cap) on 12 full SCAs, seed 2."""
    cfg = compose_train(["experiment=dense"], tmp_path / "run")
    assert cfg.trainer.max_time is None and cfg.trainer.max_epochs == 12
    assert (cfg.data.pairs, cfg.data.size, cfg.data.sim_seed, cfg.data.mode) == (12, 4088, 2,
                                                                                "epochs")
    assert cfg.callbacks.get("report_figures") is None
    assert list(cfg.data.kinds) == ["transient"]  # variable stars are negatives
    assert cfg.callbacks.model_checkpoint.monitor == "val/f1"


def test_sweep_and_launcher_configs_compose(tiny_sim, tmp_path):
    cfg = compose_train(["hparams_search=optuna", *tiny_overrides(tiny_sim, tmp_path)],
                        tmp_path / "run")
    assert cfg.optimized_metric == "val/within2px_best"
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.hydra.mode.name == "MULTIRUN"
    assert "model.optimizer.lr" in cfg.hydra.sweeper.params
    cfg = compose_train(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                         "trainer.num_nodes=2", *tiny_overrides(tiny_sim, tmp_path)],
                        tmp_path / "run")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)


# ------------------------------------------------------------------------- the task
def blob_batch(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tiles with a Gaussian transient in the new image at known sub-pixel positions."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(6, 58, size=(n, 2))
    yy, xx = np.mgrid[0:64, 0:64]
    new = np.exp(-((xx - xy[:, 0, None, None]) ** 2 + (yy - xy[:, 1, None, None]) ** 2) / 2.0)
    ref = rng.normal(0, 0.01, size=new.shape)
    image = np.stack([ref, new + ref], axis=1).astype(np.float32)
    return {"image": torch.from_numpy(image), "target": torch.tensor(xy / 64, dtype=torch.float32),
            "snr": torch.tensor(rng.uniform(5, 20, size=n), dtype=torch.float32)}


def test_panel_figure_marks_true_and_predicted_positions():
    batch = blob_batch(3)
    pred = batch["target"] + 2.0 / 64
    fig = panel_figure(batch["image"], batch["target"], pred, batch["snr"], title="t")
    axes = fig.axes
    assert len([a for a in axes if a.images]) == 9  # 3 rows x (ref, new, difference)
    lines = axes[1].get_lines()  # row 0, "new": true circle then predicted plus
    assert_allclose(np.r_[lines[0].get_xdata(), lines[0].get_ydata()],
                    batch["target"][0].numpy() * 64, atol=1e-4)
    assert_allclose(np.r_[lines[1].get_xdata(), lines[1].get_ydata()],
                    pred[0].numpy() * 64, atol=1e-4)
    # origin='lower': the image's brightest pixel sits under the true marker
    img = axes[1].images[0].get_array()
    y, x = np.unravel_index(np.argmax(img), img.shape)
    assert np.hypot(x - lines[0].get_xdata()[0], y - lines[0].get_ydata()[0]) <= 0.71


def test_task_step_metrics_and_snr_subset():
    torch.manual_seed(0)
    task = LocalizationTask(Attn5(filters=[4, 8]), snr_threshold=10.0)
    batch = blob_batch(8)
    loss, pred = task._step(batch, "test")
    assert_allclose(float(loss.detach()), float(((pred - batch["target"]) ** 2).mean()), rtol=1e-5)
    out = task.test_metrics.compute()
    sub = task.test_snr_metrics.compute()
    assert float(out["test/n_tiles"]) == 8
    assert float(sub["test/n_tiles_snr10"]) == int((batch["snr"] >= 10).sum())
    d = (pred - batch["target"]).norm(dim=1) * 64
    assert_allclose(float(out["test/dist_mean"]), float(d.mean()), rtol=1e-5)


class _Centre(torch.nn.Module):
    """Says every tile's transient is at its centre, (0.5, 0.5) in tile units."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 2), 0.5)


@pytest.mark.parametrize("size", [48, 64, 80])
def test_pixel_metrics_use_the_tile_size_of_the_data(size):
    """Distances in px are tile units times the side of the batch's tiles (data.tile_size),
    not a fixed 64 px: a 48 px tile with the transient 3 px from the centre says 3 px."""
    task = LocalizationTask(_Centre(), n_panels=0)
    offsets = torch.tensor([[3.0, 0.0], [0.0, -1.5], [4.0, 3.0]])  # px: 3, 1.5 and 5 away
    batch = {"image": torch.zeros(3, 2, size, size), "target": 0.5 + offsets / size,
             "snr": torch.tensor([20.0, 5.0, 20.0])}
    task.validation_step(batch, 0)
    out, sub = task.val_metrics.compute(), task.val_snr_metrics.compute()
    assert_allclose(float(out["val/dist_mean"]), (3 + 1.5 + 5) / 3, rtol=1e-5)
    assert_allclose(float(out["val/dist_max"]), 5.0, rtol=1e-5)
    assert_allclose([float(out[f"val/within{r}px"]) for r in (1, 2, 5)], [0, 1 / 3, 1])
    assert_allclose(float(sub["val/dist_mean_snr10"]), 4.0, rtol=1e-5)  # S/N >= 10: 3 and 5


@pytest.mark.parametrize("model, task", [("attn5", LocalizationTask), ("dense", DetectionTask)])
def test_callbacks_watch_the_task_monitor(tmp_path, model, task):
    """The task class declares its monitor and mode; checkpoint, early stopping and the
    sweeper's metric follow it (no second copy of the string in the configs)."""
    assert (LocalizationTask.monitor, DetectionTask.monitor) == ("val/within2px", "val/f1")
    cfg = compose_train([f"model={model}"], tmp_path / "run")
    for name in ("model_checkpoint", "early_stopping"):
        assert cfg.callbacks[name].monitor == task.monitor
        assert cfg.callbacks[name].mode == task.mode == "max"
    assert cfg.optimized_metric == f"{task.monitor}_best"
