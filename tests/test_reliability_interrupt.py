"""Interruption: SIGTERM / SIGINT during training leaves a resumable checkpoint.

A real ``python -m rtcnn.train`` subprocess is paused after training step 5 (mid-epoch)
and sent SIGTERM from here: it must exit 143 with ``checkpoints/interrupted.ckpt`` and a
resume command. That checkpoint must equal the state an uninterrupted run has after
step 5 (epoch counter, weights, optimizer), and resuming from it must end exactly where
the uninterrupted run ends (weights, optimizer, validation metrics; CPU, fixed seeds).
SIGINT (Ctrl-C) does the same in-process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from numpy.testing import assert_allclose

from support import PauseAt, assert_same_state, load, small_run_overrides, train_in_process

REPO = Path(__file__).resolve().parents[1]
STOP_STEP = 5  # the interruption comes after this training step (epoch 1 of 3, batch 2 of 4)
MAX_EPOCHS = 3


def overrides(data: Path, extra: list[str] = ()) -> list[str]:
    return small_run_overrides(data, extra, MAX_EPOCHS)


VAL_METRICS = ("val/loss", "val/dist_mean", "val/within5px", "val/within2px_best")


@pytest.fixture(scope="module")
def uninterrupted(sim128, one_thread, tmp_path_factory):
    """The reference run: 3 epochs; its state after step 5 saved as ``step5.ckpt``."""
    out = tmp_path_factory.mktemp("uninterrupted")
    code, metrics = train_in_process(overrides(sim128), out / "run",
                                     [PauseAt(STOP_STEP, save=str(out / "step5.ckpt"))])
    assert code == 0
    return out, metrics


def test_sigterm_to_a_training_subprocess_then_resume(sim128, uninterrupted, tmp_path):
    ref_dir, ref_metrics = uninterrupted
    marker = tmp_path / "paused"
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    args = overrides(sim128, ["+callbacks.pause._target_=support.PauseAt",
                            f"+callbacks.pause.step={STOP_STEP}",
                            f"+callbacks.pause.marker={marker}"])
    proc = subprocess.Popen([sys.executable, "-m", "rtcnn.train", *args], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.monotonic()
        while not marker.exists():  # training reached step 5 and waits
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() - t0 < 240, "the training subprocess never reached step 5"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-3000:]
    (run,) = (tmp_path / "outputs" / "train" / "runs").iterdir()
    ckpt = run / "checkpoints" / "interrupted.ckpt"
    assert ckpt.is_file()
    assert "resume with: python -m rtcnn.train" in output and f"ckpt_path={ckpt}" in output
    assert not list(run.glob("checkpoints/.*.tmp"))  # no temporary files left behind

    # the checkpoint is the uninterrupted run's state after step 5, mid-epoch 1
    saved = load(ckpt)
    assert saved["epoch"] == 1 and saved["global_step"] == STOP_STEP
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1}]
    assert_same_state(saved, load(ref_dir / "step5.ckpt"))

    # resuming ends where the uninterrupted run ends
    code, metrics = train_in_process(overrides(sim128, [f"ckpt_path={ckpt}"]), tmp_path / "resumed")
    assert code == 0
    assert_same_state(load(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
                      load(ref_dir / "run" / "checkpoints" / "last.ckpt"))
    for name in VAL_METRICS:
        assert_allclose(metrics[name], ref_metrics[name], rtol=1e-6, err_msg=name)


def test_sigint_in_process_then_resume(sim128, uninterrupted, tmp_path, caplog):
    ref_dir, ref_metrics = uninterrupted
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    code, _ = train_in_process(overrides(sim128), tmp_path / "run",
                               [PauseAt(STOP_STEP + 1, signal=signal.SIGINT)])
    assert code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is restored
    assert "SIGINT: finishing the current batch" in caplog.text
    ckpt = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    saved = load(ckpt)
    assert (saved["epoch"], saved["global_step"]) == (1, STOP_STEP + 1)

    # the best value so far survives the resume (it is in the checkpoint)
    saved["state_dict"]["val_within2px_best.max_value"] = torch.tensor(0.75)
    torch.save(saved, ckpt)
    code, metrics = train_in_process(overrides(sim128, [f"ckpt_path={ckpt}"]), tmp_path / "resumed")
    assert code == 0
    assert metrics["val/within2px_best"] == pytest.approx(max(0.75, ref_metrics["val/within2px"]))
    final, ref = (load(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "resumed",
                                                                   ref_dir / "run"))
    assert_same_state(final, ref, skip=("val_within2px_best.max_value",))
    assert_allclose(metrics["val/loss"], ref_metrics["val/loss"], rtol=1e-6)


def test_resume_from_the_last_epoch_checkpoint(sim128, uninterrupted, tmp_path):
    """Resuming from ``last.ckpt`` (end of epoch 1) also ends where the reference ends."""
    ref_dir, ref_metrics = uninterrupted
    assert train_in_process(overrides(sim128, ["trainer.max_epochs=1"]), tmp_path / "one")[0] == 0
    last = tmp_path / "one" / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == 0
    code, metrics = train_in_process(overrides(sim128, [f"ckpt_path={last}"]), tmp_path / "rest")
    assert code == 0
    assert_same_state(load(tmp_path / "rest" / "checkpoints" / "last.ckpt"),
                      load(ref_dir / "run" / "checkpoints" / "last.ckpt"))
    assert_allclose(metrics["val/loss"], ref_metrics["val/loss"], rtol=1e-6)


def test_second_ctrl_c_stops_at_once():
    from rtcnn.callbacks import InterruptCheckpoint

    calls = []
    previous = signal.signal(signal.SIGTERM, lambda *a: calls.append(a))
    cb = InterruptCheckpoint("unused")
    try:
        cb._on_sigint(signal.SIGINT, None)  # first: the graceful path (SIGTERM handler)
        assert len(calls) == 1 and cb.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            cb._on_sigint(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("content, problem", [(None, "not found"),
                                              (b"", "empty file"),
                                              (b"hello", "not a readable")])
def test_resume_from_a_bad_checkpoint_is_one_line(tmp_path, content, problem):
    from rtcnn.errors import RtcnnInputError
    from rtcnn.utils import check_resume_checkpoint

    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RtcnnInputError, match=problem) as err:
        check_resume_checkpoint(path)
    assert err.value.path == str(path)
