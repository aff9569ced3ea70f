"""Safe loading of networks (rtcnn.checkpoint): checkpoints a stranger made are refused with
one line (exit 2) and never run code; bundles and shipped models load the same network."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from rtcnn import checkpoint
from rtcnn.checkpoint import (
    BUNDLE_CARD,
    BUNDLE_WEIGHTS,
    check_checkpoint,
    export_bundle,
    load_model,
)
from rtcnn.detect import main as detect
from rtcnn.errors import RtcnnInputError
from rtcnn.models.attn5 import Attn5
from rtcnn.models.detector import DenseDetector


class Evil:
    """Unpickling this creates the file ``path`` (a stand-in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def state(tiny_detector_ckpt):
    """The tiny detector checkpoint as a dict (read safely)."""
    return torch.load(tiny_detector_ckpt, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def pair(small_pairs):
    d = small_pairs / "pair_0000"
    return str(d / "ref.fits"), str(d / "new.fits")


def _detect_error(pair, ckpt, tmp_path, capsys) -> str:
    """Run detect with ``ckpt``: it must exit 2 with one line and write nothing."""
    out = tmp_path / "c.ecsv"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        detect([*pair, "--ckpt", str(ckpt), "-o", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("rtcnn: error: "), err
    assert "Traceback" not in err and not out.exists()
    return err


def _save(tmp_path, obj, name="bad.ckpt"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def _with(state, **hp):
    """The checkpoint with some hyperparameters replaced (``None`` deletes one)."""
    out = dict(state)
    hyper = dict(state["hyper_parameters"])
    for k, v in hp.items():
        if v is None:
            hyper.pop(k, None)
        else:
            hyper[k] = v
    out["hyper_parameters"] = hyper
    return out


def test_a_checkpoint_that_runs_code_is_refused_and_runs_nothing(state, pair, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = _save(tmp_path, {**state, "callbacks": {"x": Evil(marker)}}, "evil.ckpt")
    err = _detect_error(pair, evil, tmp_path, capsys)
    assert "evil.ckpt: not a readable PyTorch checkpoint" in err and "never unpickled" in err
    assert not marker.exists()
    for check in (lambda: check_checkpoint(evil), lambda: load_model(evil)):
        with pytest.raises(RtcnnInputError, match="never unpickled"):
            check()
    assert not marker.exists()
    # the same file unpickled without the policy would have run the payload
    torch.load(evil, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_a_foreign_target_is_refused_before_it_is_imported(state, pair, tmp_path, capsys):
    assert "this" not in sys.modules
    spec = {**state["hyper_parameters"]["net"], "_target_": "this.Anything"}
    bad = _save(tmp_path, _with(state, net=spec))
    err = _detect_error(pair, bad, tmp_path, capsys)
    assert "'this.Anything', which is not one of rtcnn's networks" in err
    assert "this" not in sys.modules  # never imported (it prints the Zen of Python)
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    with pytest.raises(RtcnnInputError, match="not one of rtcnn's networks"):
        check_checkpoint(bad)


@pytest.mark.parametrize("case, message", [
    ("no_target", "names no network class (no '_target_' in its net spec)"),
    ("foreign", "'torch.nn.Linear', which is not one of rtcnn's networks"),
    ("attn5", "holds a Attn5, not a DenseDetector"),
    ("bad_kwargs", "bad arguments for DenseDetector"),
    ("bad_values", "bad arguments for DenseDetector"),
    ("spec_list", "network spec is a list, not a mapping with '_target_'"),
    ("no_net", "no network spec in its hyper_parameters"),
    ("ckpt_list", "not a Lightning checkpoint (no 'state_dict' dict in it)"),
    ("nan_threshold", "saved threshold nan is not a number in [0, 1]"),
    ("big_threshold", "saved threshold 1.5 is not a number in [0, 1]"),
    ("str_threshold", "saved threshold 'high' is not a number"),
    ("wrong_weights", "weights do not fit rtcnn.models.detector.DenseDetector"),
    ("no_weights", "holds no network weights"),
])
def test_malformed_checkpoints_are_one_line_errors(state, pair, tmp_path, capsys, case, message):
    spec = dict(state["hyper_parameters"]["net"])
    obj = {
        "no_target": lambda: _with(state, net={k: v for k, v in spec.items() if k != "_target_"}),
        "foreign": lambda: _with(state, net={"_target_": "torch.nn.Linear", "in_features": 2,
                                             "out_features": 2}),
        "attn5": lambda: _with(state, net={"_target_": "rtcnn.models.attn5.Attn5"}),
        "bad_kwargs": lambda: _with(state, net={**spec, "colour": "red"}),
        "bad_values": lambda: _with(state, net={**spec, "channels": "abc"}),
        "spec_list": lambda: _with(state, net=[spec]),
        "no_net": lambda: _with(state, net=None),
        "ckpt_list": lambda: [state],
        "nan_threshold": lambda: _with(state, threshold=math.nan),
        "big_threshold": lambda: _with(state, threshold=1.5),
        "str_threshold": lambda: _with(state, threshold="high"),
        "wrong_weights": lambda: _with(state, net={**spec, "head_channels": 16}),
        "no_weights": lambda: {**state, "state_dict": {}},
    }[case]()
    err = _detect_error(pair, _save(tmp_path, obj), tmp_path, capsys)
    assert message in err


def test_unreadable_files_are_one_line_errors(tiny_detector_ckpt, pair, tmp_path, capsys):
    data = tiny_detector_ckpt.read_bytes()
    cases = {"truncated.ckpt": data[: len(data) // 2], "empty.ckpt": b"",
             "text.ckpt": b"not a checkpoint\n"}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        err = _detect_error(pair, tmp_path / name, tmp_path, capsys)
        assert f"{name}: " in err and ("not a readable PyTorch checkpoint" in err or "empty" in err)
    err = _detect_error(pair, tmp_path / "missing.ckpt", tmp_path, capsys)
    assert "missing.ckpt: no such checkpoint file, bundle directory or shipped model" in err
    # the check that evaluate and train ckpt_path= run names the key
    with pytest.raises(RtcnnInputError, match=r"not a readable PyTorch checkpoint .*\(ckpt_path\)$"):
        check_checkpoint(tmp_path / "truncated.ckpt", key="ckpt_path")


def test_checkpoint_bundle_and_shipped_model_give_the_same_network(
        tiny_detector_ckpt, pair, tmp_path, monkeypatch):
    loaded = load_model(tiny_detector_ckpt, expect=DenseDetector)
    assert loaded.threshold == 0.5 and loaded.spec["_target_"].endswith("DenseDetector")
    bundle = export_bundle(tiny_detector_ckpt, tmp_path / "bundle",
                           card={"metrics": {"test/f1": 0.0}, "seed": 0})
    card = json.loads((bundle / BUNDLE_CARD).read_text())
    assert card["net"] == loaded.spec and card["threshold"] == 0.5
    assert card["metrics"] == {"test/f1": 0.0} and card["format"].startswith("rtcnn-bundle")
    with pytest.raises(RtcnnInputError, match="already exists; pass --overwrite"):
        export_bundle(tiny_detector_ckpt, bundle)
    from_bundle = load_model(bundle, expect=DenseDetector)
    assert from_bundle.card["seed"] == 0 and from_bundle.threshold == 0.5
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        a, b = loaded.net(x), from_bundle.net(x)
    for key in a:
        assert torch.equal(a[key], b[key])
    # a shipped model is a bundle in the package, chosen by name
    monkeypatch.setattr(checkpoint, "SHIPPED_DIR", tmp_path)
    assert checkpoint.shipped_models() == ["bundle"]
    shipped = load_model("bundle")
    assert shipped.source == "shipped:bundle"
    with pytest.raises(RtcnnInputError, match="shipped models: bundle"):
        load_model("nosuchmodel")
    # detect reads a bundle as it reads the checkpoint: the same catalog
    from astropy.table import Table

    for i, source in enumerate((tiny_detector_ckpt, bundle)):
        assert detect([*pair, "--ckpt", str(source), "-o", str(tmp_path / f"c{i}.ecsv"),
                       "--threshold", "0.001", "--no-progress"]) == 0

    t0, t1 = (Table.read(tmp_path / f"c{i}.ecsv", format="ascii.ecsv") for i in range(2))
    assert len(t0) == len(t1) > 0
    assert_allclose(np.asarray(t0["score"]), np.asarray(t1["score"]))


def test_broken_bundles_are_one_line_errors(tiny_detector_ckpt, tmp_path):
    bundle = export_bundle(tiny_detector_ckpt, tmp_path / "b")
    (bundle / BUNDLE_WEIGHTS).write_bytes((bundle / BUNDLE_WEIGHTS).read_bytes()[:100])
    with pytest.raises(RtcnnInputError, match="model.safetensors: not a readable safetensors"):
        load_model(bundle)
    (bundle / BUNDLE_CARD).write_text("{not json")
    with pytest.raises(RtcnnInputError, match="card.json: not a readable model card"):
        load_model(bundle)
    (bundle / BUNDLE_CARD).write_text(json.dumps({"net": {"_target_": "os.system"}}))
    with pytest.raises(RtcnnInputError, match="'os.system', which is not one of rtcnn's"):
        load_model(bundle)
    (bundle / BUNDLE_CARD).unlink()
    with pytest.raises(RtcnnInputError, match="not a model bundle \\(no card.json in it\\)"):
        load_model(bundle)


def test_attn5_checkpoints_pass_the_check(tmp_path):
    """What evaluate and train ckpt_path= run: an rtcnn network passes, with its class."""
    net = Attn5()
    path = _save(tmp_path, {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
                            "hyper_parameters": {"net": {"_target_": "rtcnn.models.attn5.Attn5",
                                                         **net.config}}}, "attn5.ckpt")
    assert check_checkpoint(path) == path
    assert check_checkpoint(path, expect=Attn5) == path
    with pytest.raises(RtcnnInputError, match="holds a Attn5, not a DenseDetector"):
        check_checkpoint(path, expect=DenseDetector)
    assert isinstance(load_model(path).net, Attn5)
