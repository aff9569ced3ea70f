"""rtcnn.io.pairdir: the pair-directory layout and the one atomic writer."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from rtcnn.errors import RtcnnInputError
from rtcnn.io import pairdir
from rtcnn.io.pairdir import (
    PAIR_FILES,
    atomic_write,
    check_output,
    check_output_dir,
    find_pairs,
    output_name,
    pair_dir,
    read_params,
    write_pair,
)


class Crash(RuntimeError):
    pass


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def pair_files(seed: int = 0) -> dict:
    data = np.random.default_rng(seed).normal(size=(8, 8)).astype(np.float32)
    return {"ref.fits": fits.HDUList([fits.PrimaryHDU(data)]),
            "new.fits": fits.HDUList([fits.PrimaryHDU(data + 1)]),
            "truth.ecsv": Table({"x": [1.0], "y": [2.0]}),
            "sources.ecsv": Table({"x": [1.0, 3.0], "y": [2.0, 4.0]}),
            "params.json": {"seed": seed}}


def test_layout_names():
    assert PAIR_FILES == ("ref.fits", "new.fits", "truth.ecsv", "sources.ecsv", "params.json")
    assert pair_dir("out", 7) == Path("out") / "pair_0007"
    assert output_name("x/a_b/p") == output_name("x_a/b/p") == "x_a_b_p"


def test_write_pair_all_files_then_found(tmp_path):
    d = write_pair(tmp_path / "sets" / "pair_0000", pair_files())
    assert sorted(p.name for p in d.iterdir()) == sorted(PAIR_FILES)
    assert read_params(d) == {"seed": 0}
    (pf,) = find_pairs(tmp_path / "sets")
    assert (pf.ref, pf.new, pf.truth, pf.name) == (d / "ref.fits", d / "new.fits",
                                                    d / "truth.ecsv", "pair_0000")
    assert leftovers(tmp_path / "sets") == []


def test_write_pair_is_all_or_nothing(tmp_path, monkeypatch):
    from astropy.io import ascii

    files = pair_files()
    calls = []

    def crash_on_sources(self, path, *args, **kwargs):
        calls.append(Path(path).name)
        if Path(path).name == "sources.ecsv":
            raise Crash("killed while writing the pair")
        ascii.write(self, path, format="ecsv")

    monkeypatch.setattr(Table, "write", crash_on_sources)
    with pytest.raises(Crash):
        write_pair(tmp_path / "pair_0000", files)
    assert calls == ["truth.ecsv", "sources.ecsv"]
    assert list(tmp_path.iterdir()) == []  # no pair, no temporary directory


def test_write_pair_refuses_and_overwrites(tmp_path):
    d = write_pair(tmp_path / "p", pair_files(0))
    with pytest.raises(RtcnnInputError, match="pair already exists; pass --overwrite"):
        write_pair(d, pair_files(1))
    assert read_params(d) == {"seed": 0}
    (d / "extra.txt").write_text("kept")
    write_pair(d, pair_files(1), overwrite=True)
    assert read_params(d) == {"seed": 1} and (d / "extra.txt").read_text() == "kept"
    assert leftovers(d) == []


def test_pair_directory_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        d = write_pair(tmp_path / "p", pair_files())
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "ref.fits").stat().st_mode) == 0o640


def test_atomic_write_exclusive_without_overwrite(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write(path, False, lambda tmp: Path(tmp).write_text("one"))
    with pytest.raises(RtcnnInputError, match="already exists; pass --overwrite"):
        atomic_write(path, False, lambda tmp: Path(tmp).write_text("two"))
    assert path.read_text() == "one"
    atomic_write(path, True, lambda tmp: Path(tmp).write_text("three"))
    assert path.read_text() == "three" and leftovers(tmp_path) == []


def test_atomic_write_many_threads_one_winner(tmp_path):
    path = tmp_path / "out.txt"
    n = 8
    barrier = threading.Barrier(n, timeout=30)
    outcome = [None] * n

    def run(i):
        def writer(tmp):
            barrier.wait()
            Path(tmp).write_text(str(i))

        try:
            atomic_write(path, False, writer)
            outcome[i] = "won"
        except RtcnnInputError:
            outcome[i] = "refused"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcome.count("won") == 1 and outcome.count("refused") == n - 1
    assert path.read_text() == str(outcome.index("won"))
    assert leftovers(tmp_path) == []


def test_atomic_write_without_hard_links_is_still_exclusive(tmp_path, monkeypatch):
    """A file system without hard links: the name is claimed with O_EXCL instead."""
    import errno

    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(pairdir.os, "link", no_links)
    path = tmp_path / "out.txt"
    atomic_write(path, False, lambda tmp: Path(tmp).write_text("one"))
    assert path.read_text() == "one"
    with pytest.raises(RtcnnInputError, match="already exists"):
        atomic_write(path, False, lambda tmp: Path(tmp).write_text("two"))
    assert path.read_text() == "one" and leftovers(tmp_path) == []


def test_check_output_refusals(tmp_path):
    inp = tmp_path / "in.fits"
    inp.write_text("x")
    link = tmp_path / "hard.fits"
    os.link(inp, link)
    with pytest.raises(RtcnnInputError, match=r"is an input of this command"):
        check_output(link, True, inputs=[inp])  # the same file under another name
    with pytest.raises(RtcnnInputError, match="is a directory; give a file name"):
        check_output(tmp_path, True)
    with pytest.raises(RtcnnInputError, match=r"output directory .*nowhere does not exist"):
        check_output(tmp_path / "nowhere" / "c.ecsv")
    with pytest.raises(RtcnnInputError, match=r"in.fits is a file, not a directory"):
        check_output(inp / "c.ecsv")
    with pytest.raises(RtcnnInputError, match=r"^/proc/x.ecsv: cannot be written"):
        check_output("/proc/x.ecsv", probe=True)
    assert check_output(tmp_path / "ok.ecsv", probe=True) == tmp_path / "ok.ecsv"
    assert leftovers(tmp_path) == []


def test_check_output_dir_creates_nothing(tmp_path):
    target = tmp_path / "a" / "b"
    assert check_output_dir(target) == target and not (tmp_path / "a").exists()
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RtcnnInputError, match=r"afile: is a file; several pairs"):
        check_output_dir(afile)
    with pytest.raises(RtcnnInputError, match=r"sub: cannot be created: .*afile is a file"):
        check_output_dir(afile / "sub")


def test_json_writer_is_sorted_and_final_newline(tmp_path):
    atomic_write(tmp_path / "p.json", False,
                 pairdir.file_writer("p.json", {"b": 1, "a": [1, 2]}))
    text = (tmp_path / "p.json").read_text()
    assert text.endswith("}\n") and json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"')
    with pytest.raises(ValueError, match="no writer for pair file 'x.txt'"):
        pairdir.file_writer("x.txt", "")
