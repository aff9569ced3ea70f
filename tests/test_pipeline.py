"""The per-pair step :func:`rtcnn.pipeline.process_pair` behind ``rtcnn.detect`` and ``rtcnn.survey``."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from rtcnn.detect import main as detect_main
from rtcnn.errors import RtcnnInputError
from rtcnn.pipeline import (
    DEFAULT_THRESHOLD,
    PairOptions,
    PairOutputs,
    files_checksum,
    load_model,
    process_pair,
)

LOW = 0.001  # a threshold low enough that an untrained net reports candidates


def _pair(root, i=0):
    d = root / f"pair_{i:04d}"
    return d / "ref.fits", d / "new.fits"


def test_process_pair_writes_what_detect_writes(small_pairs, tiny_detector_ckpt, tmp_path):
    ref, new = _pair(small_pairs, 1)
    assert detect_main([str(ref), str(new), "--ckpt", str(tiny_detector_ckpt), "-o",
                        str(tmp_path / "cmd.ecsv"), "--threshold", str(LOW), "--regions",
                        "--no-progress"]) == 0  # fmt: skip
    model = load_model(tiny_detector_ckpt, "cpu")
    out = PairOutputs(tmp_path / "lib.ecsv", tmp_path / "lib.reg")
    result = process_pair(ref, new, model, PairOptions(threshold=LOW), out)

    cmd = Table.read(tmp_path / "cmd.ecsv", format="ascii.ecsv")
    lib = Table.read(out.catalog, format="ascii.ecsv")
    assert len(lib) == len(cmd) == result.n_candidates > 0
    assert lib.colnames == cmd.colnames
    for name in lib.colnames:
        assert np.array_equal(np.asarray(lib[name]), np.asarray(cmd[name])), name
        assert lib[name].unit == cmd[name].unit
    assert {k: v for k, v in lib.meta.items() if "seconds" not in k} == {
        k: v for k, v in cmd.meta.items() if "seconds" not in k}  # all but the timings
    assert (tmp_path / "lib.reg").read_text() == (tmp_path / "cmd.reg").read_text()

    assert result.catalog == out.catalog and result.files == (out.catalog, out.regions)
    assert result.checksum == files_checksum(result.files)
    assert result.seconds >= lib.meta["seconds"] > 0
    # the checksum covers every output: a changed region file changes it
    out.regions.write_text(out.regions.read_text() + "# edited\n")
    assert files_checksum(result.files) != result.checksum


def test_process_pair_refuses_to_overwrite_and_names_bad_pairs(small_pairs, tiny_detector_ckpt,
                                                               tmp_path):
    ref, new = _pair(small_pairs, 0)
    model = load_model(tiny_detector_ckpt, "cpu")
    out = PairOutputs(tmp_path / "c.ecsv")
    out.catalog.write_text("precious")
    with pytest.raises(RtcnnInputError, match="already exists; pass --overwrite"):
        process_pair(ref, new, model, PairOptions(threshold=LOW), out)
    assert out.catalog.read_text() == "precious"
    result = process_pair(ref, new, model, PairOptions(threshold=LOW, overwrite=True), out)
    assert result.n_candidates == len(Table.read(out.catalog, format="ascii.ecsv"))

    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with pytest.raises(RtcnnInputError, match=str(broken)):
        process_pair(ref, broken, model, PairOptions(), PairOutputs(tmp_path / "b.ecsv"))
    assert not (tmp_path / "b.ecsv").exists()


def test_threshold_and_option_checks(tiny_detector_ckpt):
    model = load_model(tiny_detector_ckpt, "cpu")
    assert model.threshold(PairOptions(threshold=0.25)) == 0.25
    saved = model.saved_threshold
    assert model.threshold(PairOptions()) == (DEFAULT_THRESHOLD if saved is None else saved)
    model.saved_threshold = 0.7
    assert model.threshold(PairOptions()) == 0.7
    assert model.bf16(PairOptions(precision="bf16")) and not model.bf16(PairOptions(precision="fp32"))
    for bad, message in ((PairOptions(threshold=1.5), "--threshold must lie in"),
                         (PairOptions(batch_size=0), "--batch-size must be >= 1"),
                         (PairOptions(mode="fast"), "--mode must be one of")):
        with pytest.raises(RtcnnInputError, match=message):
            bad.check()
