"""No silent overwrite, and no half-written file under a final name.

``detect``/``baseline``/``score``/``sim`` refuse an existing output without
``--overwrite`` (exit 2, the file untouched); ``train`` runs get new directories; catalogs
and checkpoints are written to a temporary file and renamed, so a crash while writing
leaves the previous file (or nothing) under the final name and no temporary file.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from astropy.table import Table

from test_reliability_inputs import (  # noqa: F401 - det_ckpt and good are fixtures
    NEW,
    REF,
    TRUTH,
    det_ckpt,
    error_line,
    good,
    run_cli,
    run_hydra,
)

KEEP = "# an earlier result that must survive\n"


def refuses(main, argv, target: Path, capsys) -> None:
    """``main(argv)`` exits 2 naming ``target``, which keeps its content."""
    target.write_text(KEEP)
    assert run_cli(main, argv) == 2
    assert error_line(capsys) == (f"rtcnn: error: {target}: already exists; pass --overwrite "
                                  "to replace it")
    assert target.read_text() == KEEP


def test_detect_refuses_to_overwrite_a_catalog(good, det_ckpt, tmp_path, capsys):
    from rtcnn.detect import main

    out = tmp_path / "cands.ecsv"
    argv = [good / REF, good / NEW, "--ckpt", det_ckpt, "-o", out, "--threshold", "0.001",
            "--no-progress"]
    refuses(main, argv, out, capsys)
    assert run_cli(main, [*argv, "--overwrite"]) == 0
    assert out.read_text() != KEEP and len(Table.read(out, format="ascii.ecsv").colnames) > 2
    # the region file too, and nothing is written when one of the two exists
    out.unlink()
    reg = tmp_path / "cands.reg"
    refuses(main, [*argv, "--regions"], reg, capsys)
    assert not out.exists()


def test_detect_directory_refuses_before_any_work(good, det_ckpt, tmp_path, capsys):
    from rtcnn.detect import main

    outdir = tmp_path / "cats"
    outdir.mkdir()
    refuses(main, [good.parent, "--ckpt", det_ckpt, "-o", outdir, "--no-progress"],
            outdir / f"{good.name}.ecsv", capsys)


def test_baseline_refuses_to_overwrite(good, tmp_path, capsys):
    from rtcnn.baseline import main

    out = tmp_path / "base.ecsv"
    refuses(main, [good / REF, good / NEW, "-o", out], out, capsys)
    assert run_cli(main, [good / REF, good / NEW, "-o", out, "--overwrite"]) == 0
    assert out.read_text() != KEEP


def test_score_refuses_to_overwrite_json_and_plot(good, tmp_path, capsys):
    from rtcnn.baseline import main as baseline
    from rtcnn.score import main

    cat = tmp_path / "base.ecsv"
    assert run_cli(baseline, [good / REF, good / NEW, "-o", cat]) == 0
    capsys.readouterr()
    for opt, name in (("--json", "s.json"), ("--plot", "s.png")):
        refuses(main, [cat, "--truth", good / TRUTH, opt, tmp_path / name], tmp_path / name,
                capsys)


def test_sim_refuses_existing_pairs(good, capsys):
    from rtcnn.sim.__main__ import main

    before = (good / NEW).read_bytes()
    assert run_cli(main, [good.parent, "--pairs", "1", "--size", "64", "--no-progress"]) == 2
    assert error_line(capsys) == (f"rtcnn: error: {good}: pair already exists; pass "
                                  "--overwrite to replace it")
    assert (good / NEW).read_bytes() == before


def test_every_training_run_gets_a_new_directory(tmp_path, monkeypatch, capsys):
    import rtcnn.train as train_cmd

    dirs = set()
    for _ in range(2):  # a quick failing run still makes its run directory first
        argv = ["data=fits", f"data.root={tmp_path / 'nowhere'}", "~logger"]
        assert run_hydra(train_cmd, argv, monkeypatch, tmp_path) == 2
        assert "nowhere: no such file or directory" in error_line(capsys)
        dirs |= set((tmp_path / "project" / "outputs" / "train" / "runs").iterdir())
    assert len(dirs) == 2


# --------------------------------------------------------------------------- atomic writes
class Crash(RuntimeError):
    pass


def half_then_crash(real_write):
    """A writer that writes part of the file, then fails (a crash mid-write)."""

    def write(obj, target, *args, **kwargs):
        buf = io.BytesIO()
        real_write(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if hasattr(target, "write"):
            target.write(data[: len(data) // 2])
        else:
            Path(target).write_bytes(data[: len(data) // 2])
        raise Crash("disk full")

    return write


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_catalog_write_is_atomic(tmp_path, monkeypatch):
    from rtcnn.catalog import read_catalog, write_catalog

    t = Table({"x": [1.0, 2.0], "y": [3.0, 4.0], "score": [0.9, 0.8]})
    path = tmp_path / "c.ecsv"
    write_catalog(t, path)
    before = path.read_bytes()
    def crash(self, target, *args, **kwargs):
        from astropy.io import ascii

        ascii.write(self, target, format="ecsv", overwrite=True)  # the temporary file ...
        raise Crash("killed")  # ... then the process dies before the rename

    monkeypatch.setattr(Table, "write", crash)
    with pytest.raises(Crash):
        write_catalog(t[:1], path, overwrite=True)
    with pytest.raises(Crash):
        write_catalog(t, tmp_path / "new.ecsv")
    assert path.read_bytes() == before and len(read_catalog(path)) == 2
    assert not (tmp_path / "new.ecsv").exists()
    assert no_temp_files(tmp_path)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from rtcnn.callbacks import AtomicCheckpointIO

    cio = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    cio.save_checkpoint({"epoch": 1, "w": torch.arange(1000.0)}, path)
    assert cio.load_checkpoint(path)["epoch"] == 1
    monkeypatch.setattr(torch, "save", half_then_crash(torch.save))
    with pytest.raises(Crash):
        cio.save_checkpoint({"epoch": 2, "w": torch.zeros(1000)}, path)
    with pytest.raises(Crash):
        cio.save_checkpoint({"epoch": 2}, tmp_path / "checkpoints" / "other.ckpt")
    monkeypatch.undo()
    assert cio.load_checkpoint(path)["epoch"] == 1  # the previous checkpoint, whole
    assert not (tmp_path / "checkpoints" / "other.ckpt").exists()
    assert no_temp_files(path.parent)


def test_the_trainer_config_writes_checkpoints_atomically():
    import hydra.utils
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rtcnn.callbacks import AtomicCheckpointIO

    GlobalHydra.instance().clear()
    conf = Path(__file__).resolve().parents[1] / "conf"
    for name in ("cpu", "debug", "gpu", "ddp"):
        with initialize_config_dir(config_dir=str(conf / "trainer"), version_base="1.3"):
            cfg = compose(name)
        plugins = [hydra.utils.instantiate(p) for p in cfg.plugins]
        assert any(isinstance(p, AtomicCheckpointIO) for p in plugins), name
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf / "trainer"), version_base="1.3"):
        cfg = compose("debug")
    GlobalHydra.instance().clear()
    trainer = hydra.utils.instantiate(cfg, default_root_dir=None, logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
