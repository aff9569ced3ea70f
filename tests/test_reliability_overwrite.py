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

from test_reliability_inputs import (  # noqa: F401 - candidates, det_ckpt, good: fixtures
    NEW,
    REF,
    TRUTH,
    candidates,
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


# --------------------------------------------------------------------------- issue 20
# "Nothing lost, nothing overwritten": concurrent writers, colliding outputs, outputs that
# are inputs, bench JSON, permissions and special files, impossible output paths.
def _catalog_table() -> Table:
    return Table({"x": [1.0, 2.0], "y": [3.0, 4.0], "score": [0.9, 0.8]})


def test_concurrent_writers_of_one_output_exactly_one_wins(tmp_path):
    """Two writers that both passed the existence check: one file, one one-line error."""
    import threading

    from rtcnn.catalog import atomic_write
    from rtcnn.errors import RtcnnInputError

    path = tmp_path / "c.ecsv"
    barrier = threading.Barrier(2, timeout=30)
    results = {}

    def run(tag):
        def writer(tmp):
            barrier.wait()  # both are past the check; now both write and rename
            Path(tmp).write_text(f"{tag}\n")

        try:
            atomic_write(path, False, writer)
            results[tag] = "ok"
        except RtcnnInputError as err:
            results[tag] = str(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in ("A", "B")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t, r in results.items() if r == "ok"]
    assert len(winners) == 1, results
    loser = ({"A", "B"} - set(winners)).pop()
    assert results[loser] == f"{path}: already exists; pass --overwrite to replace it"
    assert path.read_text() == f"{winners[0]}\n"
    assert no_temp_files(tmp_path)


def test_output_made_by_another_process_meanwhile_is_kept(tmp_path, monkeypatch):
    from astropy.io import ascii

    from rtcnn.catalog import write_catalog
    from rtcnn.errors import RtcnnInputError

    path = tmp_path / "c.ecsv"

    def slow_write(self, target, *args, **kwargs):
        path.write_text(KEEP)  # the other process finishes first
        ascii.write(self, target, format="ecsv", overwrite=True)

    monkeypatch.setattr(Table, "write", slow_write)
    with pytest.raises(RtcnnInputError, match="already exists; pass --overwrite"):
        write_catalog(_catalog_table(), path)
    monkeypatch.undo()
    assert path.read_text() == KEEP
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("how", ["reg-named-catalog", "regions-equal-catalog"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_colliding_outputs_are_refused_before_writing(how, overwrite, good, tmp_path, capsys):
    from rtcnn.baseline import main

    out = tmp_path / ("x.reg" if how == "reg-named-catalog" else "x.ecsv")
    regions = ["--regions"] if how == "reg-named-catalog" else ["--regions", out]
    argv = [good / REF, good / NEW, "-o", out, *regions]
    if overwrite:
        out.write_text(KEEP)
        argv.append("--overwrite")
    assert run_cli(main, argv) == 2
    assert error_line(capsys) == (f"rtcnn: error: {out}: is both the catalog and the region "
                                  "file; give them different names")
    assert (out.read_text() == KEEP) if overwrite else not out.exists()
    assert no_temp_files(tmp_path)


def test_pair_name_collision_is_refused_up_front(good, tmp_path, capsys):
    import shutil

    from rtcnn.baseline import main

    root = tmp_path / "coll"
    for rel in ("x/a_b/p", "x_a/b/p"):
        shutil.copytree(good, root / rel)
    outdir = tmp_path / "out"
    assert run_cli(main, [root, "-o", outdir]) == 2
    assert error_line(capsys) == (f"rtcnn: error: {outdir / 'x_a_b_p.ecsv'}: pairs x/a_b/p "
                                  "and x_a/b/p would write the same output; rename one of "
                                  "their directories")
    assert not outdir.exists()


@pytest.mark.parametrize("cmd", ["detect", "baseline"])
def test_an_output_is_never_an_input(cmd, good, det_ckpt, tmp_path, capsys):
    import shutil

    from rtcnn.baseline import main as baseline
    from rtcnn.detect import main as detect

    d = tmp_path / "pair"
    shutil.copytree(good, d)
    before = {n: (d / n).read_bytes() for n in (REF, NEW)}
    main, extra = ((detect, ["--ckpt", det_ckpt, "--threshold", "0.001", "--no-progress"])
                   if cmd == "detect" else (baseline, []))
    for target in (NEW, REF):
        assert run_cli(main, [d / REF, d / NEW, "-o", d / target, "--overwrite", *extra]) == 2
        assert error_line(capsys) == (f"rtcnn: error: {d / target}: is an input of this "
                                      f"command ({d / target}); an output never replaces an "
                                      "input")
    # a region file that is an input, too
    assert run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "c.ecsv", "--regions", d / NEW,
                          "--overwrite", *extra]) == 2  # fmt: skip
    assert "an output never replaces an input" in error_line(capsys)
    assert {n: (d / n).read_bytes() for n in (REF, NEW)} == before
    assert not (tmp_path / "c.ecsv").exists()


def test_score_json_is_never_an_input(good, candidates, tmp_path, capsys):
    import shutil

    from rtcnn.score import main

    cat = tmp_path / "cands.ecsv"
    shutil.copy(candidates, cat)
    truth = tmp_path / "truth.ecsv"
    shutil.copy(good / TRUTH, truth)
    before = cat.read_bytes(), truth.read_bytes()
    for target in (cat, truth):
        assert run_cli(main, [cat, "--truth", truth, "--json", target, "--overwrite"]) == 2
        assert "an output never replaces an input" in error_line(capsys)
    assert (cat.read_bytes(), truth.read_bytes()) == before


def test_bench_json_is_not_overwritten_without_overwrite(good, tmp_path, capsys):
    from rtcnn.bench import main

    out = tmp_path / "bench"
    out.mkdir()
    target = out / "bench-data.json"
    target.write_text(KEEP)
    argv = ["data", "--out", out, "--data", good.parent, "--size", "128", "--repeats", "1",
            "--workers", "0"]
    assert run_cli(main, argv) == 2
    assert error_line(capsys) == (f"rtcnn: error: {target}: already exists; pass --overwrite "
                                  "to replace it")
    assert target.read_text() == KEEP
    assert "tiles_per_s" not in capsys.readouterr().out  # refused before any work


def test_bench_json_is_written_atomically(tmp_path):
    """bench.write_results: a failure half-way through the JSON stream leaves the old file
    whole; the write itself refuses or replaces as asked. (The command runs it in
    tests/test_bench.py.)"""
    import json

    from rtcnn import bench
    from rtcnn.errors import RtcnnInputError

    target = tmp_path / "bench-data.json"
    target.write_text(KEEP)
    with pytest.raises(TypeError, match="not JSON serializable"):
        bench.write_results({"machine": {"cores": 2}, "data": object()}, target, overwrite=True)
    assert target.read_text() == KEEP and no_temp_files(tmp_path)
    results = {"machine": {"cores": 2}, "data": {"tiles_per_s": [1.5, float("nan")]}}
    with pytest.raises(RtcnnInputError, match="already exists; pass --overwrite"):
        bench.write_results(results, target)
    bench.write_results(results, target, overwrite=True)
    assert json.loads(target.read_text())["data"]["tiles_per_s"][0] == 1.5
    assert no_temp_files(tmp_path)


def test_new_outputs_respect_the_umask(tmp_path):
    import os
    import stat

    from rtcnn.catalog import write_catalog, write_ds9_regions

    old = os.umask(0o022)
    try:
        write_catalog(_catalog_table(), tmp_path / "a.ecsv")
        write_ds9_regions(_catalog_table(), tmp_path / "a.reg")
        os.umask(0o027)
        write_catalog(_catalog_table(), tmp_path / "b.ecsv")
    finally:
        os.umask(old)
    mode = {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.ecsv", "a.reg", "b.ecsv")}
    assert mode == {"a.ecsv": 0o644, "a.reg": 0o644, "b.ecsv": 0o640}


def test_overwrite_keeps_the_mode_of_the_replaced_file(tmp_path):
    import os
    import stat

    from rtcnn.catalog import write_catalog

    path = tmp_path / "c.ecsv"
    for mode in (0o644, 0o664, 0o600):
        path.write_text(KEEP)
        os.chmod(path, mode)
        write_catalog(_catalog_table(), path, overwrite=True)
        assert stat.S_IMODE(path.stat().st_mode) == mode
        assert path.read_text() != KEEP


def test_overwrite_refuses_special_files(tmp_path):
    import os
    import stat

    from rtcnn.catalog import write_catalog
    from rtcnn.errors import RtcnnInputError

    fifo = tmp_path / "pipe.ecsv"
    os.mkfifo(fifo)
    with pytest.raises(RtcnnInputError, match="is not a regular file .* refusing to replace"):
        write_catalog(_catalog_table(), fifo, overwrite=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert no_temp_files(tmp_path)


@pytest.mark.parametrize("where", ["proc", "under-a-file"])
@pytest.mark.parametrize("cmd", ["detect", "baseline"])
def test_impossible_output_paths_are_one_line(where, cmd, good, det_ckpt, tmp_path, capsys):
    from rtcnn.baseline import main as baseline
    from rtcnn.detect import main as detect

    main, extra = ((detect, ["--ckpt", det_ckpt, "--threshold", "0.001", "--no-progress"])
                   if cmd == "detect" else (baseline, []))
    afile = tmp_path / "afile"
    afile.write_text(KEEP)
    out = Path("/proc/x.ecsv") if where == "proc" else afile / "sub"
    assert run_cli(main, [good / REF, good / NEW, "-o", out, *extra]) == 2
    line = error_line(capsys)
    assert line.startswith(f"rtcnn: error: {out}: "), line
    assert "cannot be written" in line if where == "proc" else f"{afile} is a file" in line
    # directory mode: the output directory cannot be made
    assert run_cli(main, [good.parent, "-o", out, *extra]) == 2
    line = error_line(capsys)
    assert line.startswith(f"rtcnn: error: {out}: "), line
    assert afile.read_text() == KEEP


def test_missing_checkpoint_leaves_no_output_tree(good, tmp_path, capsys):
    from rtcnn.detect import main

    outdir = tmp_path / "new" / "tree"
    missing = tmp_path / "missing.ckpt"
    assert run_cli(main, [good.parent, "--ckpt", missing, "-o", outdir, "--no-progress"]) == 2
    assert str(missing) in error_line(capsys)
    assert not (tmp_path / "new").exists()


@pytest.mark.slow  # 13 s of two process starts; the mechanism is tested above in-process
def test_two_baseline_processes_one_output(good, tmp_path):
    """End to end: two processes writing one ``-o`` at once; exactly one exits 0, the other
    gets one line and exit 2, and the catalog is whole (whatever their timing)."""
    import subprocess
    import sys

    out = tmp_path / "c.ecsv"
    cmd = [sys.executable, "-m", "rtcnn.baseline", str(good / REF), str(good / NEW), "-o",
           str(out)]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    err = next(e for code, e in results if code == 2)
    assert [ln for ln in err.splitlines() if ln.startswith("rtcnn: error:")] == [
        f"rtcnn: error: {out}: already exists; pass --overwrite to replace it"]
    assert len(Table.read(out, format="ascii.ecsv")) > 0 and no_temp_files(tmp_path)
