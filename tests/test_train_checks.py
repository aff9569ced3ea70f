"""The training command refuses mistakes before any work, with one line and exit status 2;
a crash exits 1.

* config mistakes (a batch size that is not a number, a negative tile size, ...) name the key;
* a run directory that already holds checkpoints is not silently continued or overwritten:
  an unset ``ckpt_path`` means a fresh run;
* a truncated checkpoint, or one of the wrong kind, given as ``ckpt_path`` is refused before
  the data is indexed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import rtcnn.train as train_cmd
from conftest import compose_train, tiny_overrides
from rtcnn.errors import RtcnnInputError
from rtcnn.utils import check_resume_checkpoint, check_run_dir, check_train_config
from support import run_hydra


def run_train(argv: list[str], monkeypatch, tmp_path: Path) -> int:
    """``python -m rtcnn.train ARGV`` in-process; returns the exit code."""
    return run_hydra(train_cmd, argv, monkeypatch, tmp_path)


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------- config mistakes
@pytest.mark.parametrize("override, key, problem", [
    ("data.batch_size=abc", "data.batch_size", "must be an integer >= 1, got 'abc'"),
    ("data.tile_size=-64", "data.tile_size", "must be an integer >= 1 (px), got -64"),
    ("model.optimizer.lr=-1", "model.optimizer.lr", "must be a number > 0, got -1"),
    ("data.num_workers=-1", "data.num_workers", "must be an integer >= 0, got -1"),
    ("seed=abc", "seed", "must be an integer (or null), got 'abc'"),
    ("trainer.max_epochs=0", "trainer.max_epochs", "must be an integer >= 1 (or -1: no limit)"),
    ("data.tile_overlap=64", "data.tile_overlap", "must be smaller than data.tile_size (64)"),
])
def test_config_mistakes_are_one_line_naming_the_key(override, key, problem, monkeypatch,
                                                     tmp_path, capsys):
    code = run_train([override, "data=fits", f"data.root={tmp_path / 'no-data'}"],
                     monkeypatch, tmp_path)
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"rtcnn: error: {key}: {problem}"), line
    assert not (tmp_path / "no-data").exists()  # nothing was read or made


def test_good_config_passes_the_checks(tmp_path):
    cfg = compose_train(["trainer.max_epochs=-1", "seed=null", "model.optimizer.lr=1e-4"],
                        tmp_path / "run")
    check_train_config(cfg)
    cfg = compose_train(["train=false", "trainer.max_epochs=0"], tmp_path / "run")
    check_train_config(cfg)  # testing only: the epochs do not matter


def test_a_crash_exits_1_and_a_bad_command_line_2(monkeypatch, tmp_path, capsys):
    def boom(*args, **kwargs):
        raise RuntimeError("a bug, not a user mistake")

    monkeypatch.setattr(train_cmd, "log_hyperparameters", boom)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    data = ["data=fits", f"data.root={tmp_path / 'no-data'}", "trainer=debug"]
    assert run_train(data, monkeypatch, tmp_path) == 1
    assert "a bug, not a user mistake" in capsys.readouterr().err
    assert run_train(["data.no_such_key=1"], monkeypatch, tmp_path) == 2  # Hydra's own error


# ------------------------------------------------------------------- run directories
def fake_run(folder: Path) -> dict[Path, bytes]:
    """An earlier run's directory: its config record and checkpoints (their bytes)."""
    files = {folder / ".hydra" / "config.yaml": b"seed: 12345\n",
             folder / "checkpoints" / "last.ckpt": b"PK\x03\x04 the old run",
             folder / "checkpoints" / "epoch_003.ckpt": b"PK\x03\x04 its best"}
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return files


def test_an_existing_run_directory_is_not_continued_silently(tiny_sim, monkeypatch, tmp_path,
                                                             capsys):
    old = tmp_path / "old_run"
    files = fake_run(old)
    argv = [f"hydra.run.dir={old}", "seed=99", "trainer=debug",
            *tiny_overrides(tiny_sim, tmp_path)]
    code = run_train(argv, monkeypatch, tmp_path)
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"rtcnn: error: {old}: already holds the checkpoints of a run")
    assert f"ckpt_path={old / 'checkpoints' / 'last.ckpt'}" in line
    for path, content in files.items():  # refused before Hydra wrote anything there
        assert path.read_bytes() == content, path
    assert sorted(p.relative_to(old) for p in old.rglob("*") if p.is_file()) == sorted(
        p.relative_to(old) for p in files)

    # the same through the Python API (train(cfg) with that output directory)
    cfg = compose_train(["seed=99", "trainer=debug", *tiny_overrides(tiny_sim, tmp_path)], old)
    with pytest.raises(RtcnnInputError, match="already holds the checkpoints of a run"):
        train_cmd.train(cfg)


def test_run_directory_rule(tmp_path):
    check_run_dir(tmp_path / "new", None)  # does not exist: fresh
    (tmp_path / "crashed" / "checkpoints").mkdir(parents=True)
    check_run_dir(tmp_path / "crashed", None)  # no checkpoint in it: nothing to lose
    files = fake_run(tmp_path / "old")
    with pytest.raises(RtcnnInputError, match="resume it with ckpt_path="):
        check_run_dir(tmp_path / "old", None)
    check_run_dir(tmp_path / "old", str(next(iter(files))))  # an explicit resume


# ------------------------------------------------------------------- resume checkpoints
@pytest.fixture(scope="module")
def attn5_ckpts(tmp_path_factory) -> dict[str, Path]:
    """Real Lightning checkpoints of a tiny attn5 (full and weights only) and of a dense
    detector, after one training step each."""
    import lightning as L
    from torch.utils.data import DataLoader

    from rtcnn.data.synthetic import synthetic_batch
    from rtcnn.tasks import build_task

    out = tmp_path_factory.mktemp("ckpts")
    paths = {}
    for name, model, over in (("attn5", "attn5", {"net": {
            "_target_": "rtcnn.models.attn5.Attn5", "filters": [4, 4, 4, 4, 4], "hidden": 8}}),
                              ("dense", "dense", {})):
        torch.manual_seed(0)
        task = build_task(model, **over)
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0)
        trainer.fit(task, DataLoader([synthetic_batch(model, 4)], batch_size=None))
        paths[name] = out / f"{name}.ckpt"
        trainer.save_checkpoint(paths[name])
        if name == "attn5":
            paths["weights_only"] = out / "weights_only.ckpt"
            trainer.save_checkpoint(paths["weights_only"], weights_only=True)
    data = paths["attn5"].read_bytes()
    paths["truncated"] = out / "truncated.ckpt"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    return paths


ATTN5 = "rtcnn.models.attn5.Attn5"


def test_resume_checkpoint_checks(attn5_ckpts):
    assert check_resume_checkpoint(attn5_ckpts["attn5"], ATTN5) == attn5_ckpts["attn5"]
    for name, problem in (("truncated", "not a readable"),
                          ("dense", "DenseDetector"),
                          ("weights_only", "holds weights only")):
        with pytest.raises(RtcnnInputError, match=problem) as err:
            check_resume_checkpoint(attn5_ckpts[name], ATTN5)
        assert err.value.path == str(attn5_ckpts[name])
        assert str(err.value).endswith("(ckpt_path)")


@pytest.mark.parametrize("name", ["truncated", "dense", "weights_only"])
def test_a_bad_resume_checkpoint_is_one_line_before_the_data(name, attn5_ckpts, monkeypatch,
                                                            tmp_path, capsys):
    data = tmp_path / "no-data"  # the data would be indexed (and found missing) after the check
    code = run_train([f"ckpt_path={attn5_ckpts[name]}", "data=fits", f"data.root={data}",
                      "model.net.filters=[4,4,4,4,4]", "model.net.hidden=8", "trainer=debug"],
                     monkeypatch, tmp_path)
    line = one_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"rtcnn: error: {attn5_ckpts[name]}: ") and "(ckpt_path)" in line
