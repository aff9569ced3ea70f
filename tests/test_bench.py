"""``python -m rtcnn.bench``: train and infer end to end at tiny sizes, and their parts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from torch import nn

from rtcnn import bench
from rtcnn.inference import scan_attn5
from rtcnn.tiles import TILE_SIZE, TILE_STRIDE, n_tiles, tile_origins

TRAIN_KEYS = {"model", "batch", "precision", "mode", "steps", "repeats", "warmup_s",
              "tiles_per_s_median", "tiles_per_s_min", "tiles_per_s_max", "tiles_per_s",
              "cpu_ms_per_tile"}
INFER_KEYS = {"method", "seconds_median", "seconds_min", "seconds_max", "seconds", "warmup_s",
              "peak_rss_mib", "after_import_rss_mib", "rows", "torch_threads", "process_wall_s"}


@pytest.fixture()
def keep_threads():
    """The bench sets torch's thread count for the process: restore it afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_train_tiny(tmp_path, keep_threads):
    res = bench.main(["train", "--out", str(tmp_path), "--models", "attn5", "dense",
                      "--no-compile", "--batch", "4", "--max-batch", "8", "--steps", "1",
                      "--repeats", "2", "--warmup", "1", "--threads", "1"])
    saved = json.loads((tmp_path / "bench-train.json").read_text())
    assert saved["machine"]["torch_threads"] == 1 and saved["machine"]["cores"] >= 1
    train = saved["train"]
    assert train["torch_threads"] == 1
    # batch 4 and the largest that fits under the cap of 8, fp32 and bf16, eager only
    runs = train["runs"]
    assert {(r["model"], r["batch"], r["precision"], r["mode"]) for r in runs} == {
        (m, b, p, "eager") for m in ("attn5", "dense") for b in (4, 8) for p in ("fp32", "bf16")}
    for r in runs:
        assert "error" not in r, r
        assert TRAIN_KEYS <= set(r)
        assert len(r["tiles_per_s"]) == 2 and r["steps"] == 1
        assert r["tiles_per_s_min"] <= r["tiles_per_s_median"] <= r["tiles_per_s_max"]
        assert r["loss_finite"]
    for model in ("attn5", "dense"):
        lb = train["largest_batch"][model]
        assert lb["batch"] == 8 and [s["batch"] for s in lb["search"]] == [4, 8]
        assert all(s["peak_mib"] >= 0 for s in lb["search"])
    assert res["train"]["runs"] == runs


def test_bench_train_records_a_failure_instead_of_crashing(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(bench, "_Steps", broken)
    r = bench.time_training("attn5", 2, torch.device("cpu"), "fp32", True, repeats=1, steps=1)
    assert r["error"] == "RuntimeError: no C++ compiler"
    assert r["mode"] == "compile" and "tiles_per_s_median" not in r


def test_bench_infer_tiny(tmp_path, keep_threads):
    # simulates its own 256 x 256 px epochs pair (independent noise: the baseline needs it)
    bench.main(["infer", "--out", str(tmp_path), "--size", "256", "--repeats", "1",
                "--threads", "1", "--scan-batch", "16", "--cases", "same-grid"])
    saved = json.loads((tmp_path / "bench-infer.json").read_text())["infer"]
    assert saved["image_shape"] == [256, 256]
    runs = saved["runs"]
    assert set(runs) == {"detector", "baseline", "attn5_scan"}
    for method, r in runs.items():
        assert INFER_KEYS <= set(r), (method, r)
        assert r["method"] == method and len(r["seconds"]) == 1
        assert 0 < r["seconds_median"] < r["process_wall_s"]
        assert r["peak_rss_mib"] >= r["after_import_rss_mib"] > 0
    assert runs["detector"]["model"].startswith("untrained")
    assert runs["attn5_scan"]["rows"] == n_tiles((256, 256), TILE_SIZE, TILE_STRIDE)
    assert runs["detector"]["torch_threads"] == 1
    assert set(saved["targets"]) == {"detector_s<=baseline_s"}


def test_bench_infer_survey_case(tmp_path, keep_threads):
    # the reference on a north-up coadd grid: the detector aligns it inside the timed run
    bench.main(["infer", "--out", str(tmp_path), "--size", "128", "--repeats", "1",
                "--threads", "1", "--cases", "survey", "--methods", "detector"])
    saved = json.loads((tmp_path / "bench-infer.json").read_text())["infer"]
    assert saved["runs"] == {} and "north-up" in saved["survey"]["reference"]
    r = saved["survey"]["runs"]["detector"]
    assert INFER_KEYS <= set(r) and r["seconds_median"] > 0
    assert set(saved["survey"]["targets"]) == {"detector_s<=3"}


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["train", "--repeats", "0"])
    assert exc.value.code == 2
    assert "rtcnn: error: --repeats must be >= 1, got 0" in capsys.readouterr().err


class _Centre(nn.Module):
    """Says every tile's transient is at its pixel (x, y) = (0, 63)."""

    def forward(self, x):
        out = torch.empty(x.shape[0], 2)
        out[:, 0], out[:, 1] = 0.0, 63.0 / 64
        return out


def test_scan_attn5_maps_tile_positions_to_the_image():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 300)).astype(np.float32)
    new = ref.copy()
    xy = scan_attn5(_Centre(), ref, new, batch_size=7)
    origins = tile_origins((200, 300), TILE_SIZE, TILE_STRIDE)
    assert xy.shape == (len(origins), 2)
    assert_allclose(xy, origins + np.array([0.0, 63.0]), atol=1e-4)
