"""``make demo`` (``python -m rtcnn.demo``): train with experiment=demo, then evaluate the
best checkpoint, with tiny overrides (the conftest tiny set, one short epoch)."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_overrides
from rtcnn import demo

FAST = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0", "logger=csv",
        "model.net.filters=[4,4,4,4,4]", "callbacks.report_figures=null"]


def test_demo_trains_then_evaluates_the_best_checkpoint(tiny_sim, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    demo.main([*tiny_overrides(tiny_sim, tmp_path), *FAST])
    out = capsys.readouterr().out
    (run,) = (tmp_path / "outputs" / "demo").iterdir()
    ckpt = demo.best_checkpoint(run)
    assert ckpt.name.startswith("epoch_") and ckpt.is_file()  # the best, not last.ckpt
    assert f"rtcnn.train experiment=demo hydra.run.dir={run}" in out  # the commands, printed
    assert f"rtcnn.evaluate ckpt_path={ckpt}" in out
    (report,) = (run / "eval").iterdir()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["splits"]["test"]["n_tiles"] > 0
    assert f"report        : {report}" in out and f"checkpoint    : {ckpt}" in out
    assert (run / ".hydra" / "config.yaml").is_file()


def test_demo_stops_at_a_failing_step(tiny_sim, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        demo.main([*tiny_overrides(tiny_sim, tmp_path), "data.batch_size=0"])
    assert exit_.value.code == 2
    out = capsys.readouterr().out
    assert "rtcnn.train" in out and "rtcnn.evaluate" not in out
