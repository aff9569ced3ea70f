"""Bundles and shipped models: ``python -m rtcnn.export`` turns a training run into a bundle
with its card; ``python -m rtcnn.models`` lists the shipped ones; ``rtcnn.detect`` uses the
shipped detector by default and ``rtcnn.evaluate model=attn5`` the shipped attn5; a
checkpoint that would run code when unpickled is one line from ``evaluate`` and
``train ckpt_path=``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from astropy.table import Table
from omegaconf import OmegaConf

import rtcnn.evaluate as evaluate_cmd
import rtcnn.train as train_cmd
from rtcnn import detect, export
from rtcnn.checkpoint import BUNDLE_CARD, load_model, shipped_models
from rtcnn.models import __main__ as models_cmd
from rtcnn.models.attn5 import Attn5
from rtcnn.models.detector import DenseDetector
from support import run_hydra

CARD_KEYS = ("net", "threshold", "rtcnn_version", "recipe", "data", "model", "trainer",
             "fresh_test", "fresh_test_set", "regenerate", "description")


class Evil:
    """Unpickling this creates the file ``path`` (a stand-in for any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def run_dir(tiny_detector_ckpt, tmp_path):
    """A training run's layout around a real checkpoint: ``checkpoints/``, the Hydra
    config and overrides, and TensorBoard events with a ``test/`` scalar."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_detector_ckpt, run / "checkpoints" / "epoch_000.ckpt")
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"seed": 7, "task_name": "dense",
                                     "data": {"mode": "epochs", "sim_seed": 2, "pairs": 3},
                                     "model": {"threshold": 0.5}, "trainer": {"max_epochs": 1}}),
                   run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(["experiment=dense", "trainer.max_epochs=1"]),
                   run / ".hydra" / "overrides.yaml")
    with SummaryWriter(str(run / "tensorboard")) as w:
        w.add_scalar("test/f1", 0.75, 1)
        w.add_scalar("val/f1", 0.5, 1)
    return run


def test_export_writes_a_bundle_with_the_runs_card(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    ckpt = run_dir / "checkpoints" / "epoch_000.ckpt"
    assert export.main([str(ckpt), "-o", str(out), "--set", "description=tiny"]) == 0
    card = json.loads((out / BUNDLE_CARD).read_text())
    assert card["recipe"]["command"] == "python -m rtcnn.train experiment=dense trainer.max_epochs=1"
    assert card["recipe"]["seed"] == 7 and card["recipe"]["checkpoint"] == "epoch_000.ckpt"
    assert card["data"]["sim_seed"] == 2 and card["trainer"]["max_epochs"] == 1
    assert card["run_metrics"] == {"test/f1": 0.75}  # test/* only, from the events
    assert card["description"] == "tiny" and card["name"] == "bundle"
    assert card["threshold"] == 0.5 and card["net"]["_target_"].endswith("DenseDetector")
    loaded = load_model(out, expect=DenseDetector)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        a, b = loaded.net(x), load_model(ckpt).net(x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # never silently replaced; a bad --card file is one line
    with pytest.raises(SystemExit) as exc:
        export.main([str(ckpt), "-o", str(out)])
    assert exc.value.code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export.main([str(ckpt), "-o", str(out), "--overwrite", "--card", f"x={tmp_path / 'no.json'}"])
    assert "no.json: not found (--card)" in capsys.readouterr().err


def test_shipped_models_and_their_cards(capsys):
    assert {"dense", "attn5"} <= set(shipped_models())
    assert isinstance(load_model("dense", expect=DenseDetector).net, DenseDetector)
    assert isinstance(load_model("attn5", expect=Attn5).net, Attn5)
    for name in ("dense", "attn5"):
        card = models_cmd.read_card(name)
        missing = [k for k in CARD_KEYS if k not in card]
        assert not missing, (name, missing)
        assert card["recipe"]["command"].startswith("python -m rtcnn.train")
        assert "seed" in card["recipe"] and card["data"]["sim_seed"] not in (4242, 4243, 4244)
    assert models_cmd.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("attn5: default attn5") and "\ndense: default transient detector" in out
    assert "fresh_test" in out and "recipe      python -m rtcnn.train experiment=dense" in out
    with pytest.raises(SystemExit) as exc:
        models_cmd.main(["nosuch"])
    assert exc.value.code == 2


def test_detect_uses_the_shipped_detector_by_default(small_pairs, tmp_path):
    pair = small_pairs / "pair_0000"
    cats = []
    for i, extra in enumerate(([], ["--model", "dense"], ["--ckpt", "dense"])):
        cats.append(tmp_path / f"c{i}.ecsv")
        assert detect.main([str(pair / "ref.fits"), str(pair / "new.fits"), "-o", str(cats[-1]),
                            "--no-progress", "--threshold", "0.05", *extra]) == 0
    tables = [Table.read(c, format="ascii.ecsv") for c in cats]
    assert len(tables[0]) > 0 and all(len(t) == len(tables[0]) for t in tables)
    assert "shipped:dense" in json.dumps({k: str(v) for k, v in tables[0].meta.items()})


def test_evaluate_model_name_evaluates_the_shipped_attn5(sim128, tmp_path, monkeypatch):
    code = run_hydra(evaluate_cmd, ["model=attn5", "data=fits", f"data.root={sim128}",
                                    "data.num_workers=0", "data.persistent_workers=false",
                                    "data.progress=false", "splits=[test]", "views=[identity]",
                                    f"eval_root={tmp_path / 'ev'}", "n_extremes=1"],
                     monkeypatch, tmp_path)
    assert code == 0
    (report,) = (tmp_path / "ev").iterdir()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["model_bundle"] == "attn5" and metrics["splits"]["test"]["n_tiles"] > 0


@pytest.fixture()
def evil_ckpt(tmp_path):
    """An attn5 checkpoint that would create ``pwned`` when unpickled; the marker path."""
    net = Attn5()
    state = {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
             "hyper_parameters": {"net": {"_target_": "rtcnn.models.attn5.Attn5", **net.config}},
             "callbacks": {"x": Evil(tmp_path / "pwned")}}
    path = tmp_path / "evil.ckpt"
    torch.save(state, path)
    return path, tmp_path / "pwned"


@pytest.mark.parametrize("module, args", [
    (evaluate_cmd, ["data.num_workers=0"]),
    (train_cmd, ["trainer=debug", "data.num_workers=0"]),
])
def test_evil_checkpoint_is_one_line_from_evaluate_and_train(module, args, evil_ckpt, tmp_path,
                                                             monkeypatch, capsys):
    path, marker = evil_ckpt
    code = run_hydra(module, [f"ckpt_path={path}", f"data.root={tmp_path / 'no-data'}", *args],
                     monkeypatch, tmp_path)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"rtcnn: error: {path}: not a readable PyTorch checkpoint")
    assert "never unpickled" in err[0]
    assert not marker.exists()
