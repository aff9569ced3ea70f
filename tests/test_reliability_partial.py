"""Partial data: a directory of pairs with some broken ones.

``train`` (through :mod:`rtcnn.data`) and ``detect`` work on the good pairs and name the
broken ones at the end; ``strict`` (``data.strict=true`` / ``--strict``) makes the first
broken pair an error (exit 2). A broken pair keeps its place in the split, so repairing
it moves no other pair between train / val / test.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from rtcnn.data import FitsDataModule
from rtcnn.errors import RtcnnInputError
from test_reliability_inputs import (  # noqa: F401 - det_ckpt is a fixture
    CASES,
    DATA_ARGS,
    data_overrides,
    det_ckpt,
    error_line,
    run_cli,
    run_hydra,
)

N_PAIRS = 6  # pairs simulated (128 px)
BROKEN = {"pair_0001": "truncated FITS", "pair_0004": "missing file"}  # pair -> how


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """Six good 128 px epochs-mode pairs (kept pristine; tests break copies)."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("partial_sim")
    simulate_dataset(root, N_PAIRS, 128, "epochs", 21, progress=False, n_transients=8)
    return root


def broken_copy(sim: Path, dst: Path, broken: dict[str, str] = BROKEN) -> Path:
    """A copy of the set with the pairs of ``broken`` broken as named (test_reliability_inputs)."""
    shutil.copytree(sim, dst, ignore=shutil.ignore_patterns(".rtcnn-index"))
    for name, case in broken.items():
        CASES[case][0](dst / name)
    return dst


def datamodule(root: Path, tmp_path: Path, **kwargs) -> FitsDataModule:
    args = {**DATA_ARGS, "val_fraction": 0.2, "test_fraction": 0.2, **kwargs}
    return FitsDataModule(str(root), cache_dir=str(tmp_path / "cache"), **args)


def test_datamodule_uses_the_good_pairs_and_names_the_broken(sim, tmp_path, caplog):
    root = broken_copy(sim, tmp_path / "data")
    caplog.set_level(logging.WARNING)
    dm = datamodule(root, tmp_path)
    dm.setup()
    good = sorted(set(f"pair_{i:04d}" for i in range(N_PAIRS)) - set(BROKEN))
    assert sorted(dm.index.pairs["name"]) == good
    assert [b.name for b in dm.broken] == sorted(BROKEN)
    assert {b.path for b in dm.broken} == {str(root / n / "new.fits") for n in BROKEN}
    assert "truncated FITS file" in str(dm.broken[0]) and "file not found" in str(dm.broken[1])
    assert f"2 of {N_PAIRS} pairs are unusable" in caplog.text
    for b in dm.broken:
        assert str(b) in caplog.text
    # no tile of a broken pair in any split
    used = {n for s in ("train", "val", "test") for n in dm.pairs(s)}
    assert used <= set(good) and not used & set(BROKEN)

    # the same from the cached index (no rebuild), still naming them
    caplog.clear()
    caplog.set_level(logging.INFO)  # "sample index loaded" is an INFO message
    again = datamodule(root, tmp_path)
    again.setup()
    assert [b.name for b in again.broken] == sorted(BROKEN)
    assert "sample index loaded from" in caplog.text  # the cache, not a rebuild
    assert "sample index written" not in caplog.text
    assert f"2 of {N_PAIRS} pairs are unusable" in caplog.text


@pytest.mark.parametrize("cached", [False, True])
def test_strict_makes_a_broken_pair_an_error(sim, tmp_path, cached):
    root = broken_copy(sim, tmp_path / "data")
    if cached:  # a lenient run cached the index first
        datamodule(root, tmp_path).setup()
    with pytest.raises(RtcnnInputError, match="truncated FITS file") as err:
        datamodule(root, tmp_path, strict=True).setup()
    assert err.value.path == str(root / "pair_0001" / "new.fits")
    assert "strict" in err.value.problem


def test_every_pair_broken_is_an_error(sim, tmp_path):
    root = broken_copy(sim, tmp_path / "data",
                       {f"pair_{i:04d}": "not FITS" for i in range(N_PAIRS)})
    with pytest.raises(RtcnnInputError, match=f"all {N_PAIRS} pairs are unusable") as err:
        datamodule(root, tmp_path).setup()
    assert err.value.path == str(root / "pair_0000" / "new.fits")


def test_a_broken_pair_moves_no_other_pair_between_splits(sim, tmp_path):
    whole = datamodule(sim, tmp_path / "a")
    whole.setup()
    broken = datamodule(broken_copy(sim, tmp_path / "data"), tmp_path / "b")
    broken.setup()
    for split in ("train", "val", "test"):
        expect = [n for n in whole.pairs(split) if n not in BROKEN]
        assert broken.pairs(split) == expect, split


def test_train_command_trains_on_the_good_pairs_and_names_the_broken(sim, tmp_path,
                                                                     monkeypatch):
    import rtcnn.train as train_cmd

    root = broken_copy(sim, tmp_path / "data")
    argv = ["data=fits", *data_overrides(root), "data.val_fraction=0.2",
            "data.test_fraction=0.2", "model.net.filters=[4,4,4,4,4]", "model.net.hidden=8",
            "model.n_panels=0", "trainer=debug", "trainer.max_epochs=1", "~logger",
            "callbacks=none", "extras.print_config=false", "optimized_metric=null"]
    assert run_hydra(train_cmd, argv, monkeypatch, tmp_path) == 0
    (log_file,) = (tmp_path / "project" / "outputs").glob("train/runs/*/train.log")
    text = log_file.read_text()  # Hydra's log of the run (it replaces the log handlers)
    assert "testing" in text  # fit and test ran
    tail = text[text.rindex("testing"):]  # named again at the end, after the test
    assert "2 unusable pair(s) were left out" in tail
    for name in BROKEN:
        assert f"{name}: {root / name / 'new.fits'}:" in tail

    assert run_hydra(train_cmd, [*argv, "data.strict=true"], monkeypatch, tmp_path) == 2


def test_detect_skips_broken_pairs_and_names_them(sim, det_ckpt, tmp_path, capsys, caplog):
    from rtcnn.detect import main

    root = broken_copy(sim, tmp_path / "data")
    out = tmp_path / "cats"
    caplog.set_level(logging.INFO)
    base = [root, "--ckpt", det_ckpt, "--threshold", "0.001", "--no-progress"]
    assert run_cli(main, [*base, "-o", out]) == 0
    good = sorted(f"pair_{i:04d}" for i in range(N_PAIRS) if f"pair_{i:04d}" not in BROKEN)
    assert sorted(p.stem for p in out.glob("*.ecsv")) == good
    assert capsys.readouterr().out.split() == [str(out / f"{n}.ecsv") for n in good]
    tail = caplog.text[caplog.text.rindex("rtcnn: "):]  # at the end
    assert f"2 of {N_PAIRS} pairs skipped as unusable" in tail
    for name, case in BROKEN.items():
        assert f"{name}: {root / name / 'new.fits'}: {CASES[case][2]}" in tail

    code = run_cli(main, [*base, "-o", tmp_path / "strict", "--strict"])
    assert code == 2
    line = error_line(capsys)
    assert line.startswith(f"rtcnn: error: {root / 'pair_0001' / 'new.fits'}: truncated FITS")


def test_baseline_skips_broken_pairs_and_names_them(sim, tmp_path, capsys, caplog):
    """The baseline takes a directory exactly as detect does (rtcnn.cli)."""
    from rtcnn.baseline import main

    root = broken_copy(sim, tmp_path / "data")
    out = tmp_path / "base"
    caplog.set_level(logging.INFO)
    assert run_cli(main, [root, "-o", out]) == 0
    good = sorted(f"pair_{i:04d}" for i in range(N_PAIRS) if f"pair_{i:04d}" not in BROKEN)
    assert sorted(p.stem for p in out.glob("*.ecsv")) == good
    tail = caplog.text[caplog.text.rindex("rtcnn: "):]  # at the end
    assert f"2 of {N_PAIRS} pairs skipped as unusable" in tail
    for name, case in BROKEN.items():
        assert f"{name}: {root / name / 'new.fits'}: {CASES[case][2]}" in tail
    capsys.readouterr()
    assert run_cli(main, [root, "-o", tmp_path / "strict", "--strict"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"rtcnn: error: {root / 'pair_0001' / 'new.fits'}: truncated FITS")