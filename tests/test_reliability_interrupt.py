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
from lightning.pytorch.callbacks import Callback
from numpy.testing import assert_allclose

from conftest import compose_train

REPO = Path(__file__).resolve().parents[1]
STOP_STEP = 5  # the interruption comes after this training step (epoch 1 of 3, batch 2 of 4)
MAX_EPOCHS = 3


class PauseAt(Callback):
    """At global step ``step``: save ``save`` and/or write ``marker`` and wait for SIGTERM,
    or send ``signal`` to this process. (Used by the subprocess through the config.)"""

    def __init__(self, step: int, marker: str | None = None, save: str | None = None,
                 signal: int | None = None, timeout: float = 120.0):
        self.step, self.marker, self.save, self.sig = int(step), marker, save, signal
        self.timeout = timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.save:
            trainer.save_checkpoint(self.save)
        if self.sig is not None:
            os.kill(os.getpid(), self.sig)
        if self.marker:
            Path(self.marker).write_text(str(os.getpid()))
            t0 = time.monotonic()
            while not trainer.received_sigterm and time.monotonic() - t0 < self.timeout:
                time.sleep(0.02)


def overrides(data: Path, extra: list[str] = ()) -> list[str]:
    """The tiny run: 4 pairs (2 train = 4 batches of 2 tiles), a 5-block attn5 of width 4."""
    return ["data=fits", f"data.root={data}", "data.batch_size=2", "data.num_workers=0",
            "data.persistent_workers=false", "data.progress=false", "data.val_fraction=0.25",
            "data.test_fraction=0.25", "model.net.filters=[4,4,4,4,4]", "model.net.hidden=8",
            "model.n_panels=0", "trainer=debug", f"trainer.max_epochs={MAX_EPOCHS}",
            "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "~logger",
            "~callbacks.lr_monitor", "callbacks.progress_bar.refresh_rate=0", "test=false",
            "extras.print_config=false", *extra]


def train_in_process(args: list[str], out: Path, extra_callbacks=()):
    """``rtcnn.train.train`` on the composed config; returns (exit code, metrics)."""
    import rtcnn.train as cmd

    cfg = compose_train(args, out)
    orig = cmd.instantiate_callbacks
    cmd.instantiate_callbacks = lambda c: [*orig(c), *extra_callbacks]
    try:
        metrics, _ = cmd.train(cfg)
        return 0, metrics
    except SystemExit as exit_:
        return exit_.code, None
    finally:
        cmd.instantiate_callbacks = orig


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_state(a: dict, b: dict, skip: tuple[str, ...] = ()) -> None:
    """Same epoch counter, global step, weights and optimizer state (but ``skip``)."""
    assert (a["epoch"], a["global_step"]) == (b["epoch"], b["global_step"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in set(a["state_dict"]) - set(skip):
        assert_allclose(a["state_dict"][k].float().numpy(), b["state_dict"][k].float().numpy(),
                        rtol=1e-6, atol=1e-7, err_msg=k)
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert_allclose(torch.as_tensor(sa[i][k]).float().numpy(),
                            torch.as_tensor(sb[i][k]).float().numpy(), rtol=1e-6, atol=1e-8)


VAL_METRICS = ("val/loss", "val/dist_mean", "val/within5px", "val/within2px_best")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("interrupt_sim")
    simulate_dataset(root, 4, 128, "inject", 3, progress=False, n_transients=6)
    return root


@pytest.fixture(scope="module")
def threads():
    """One torch thread here and in the subprocess (bitwise-comparable CPU results)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def uninterrupted(data, threads, tmp_path_factory):
    """The reference run: 3 epochs; its state after step 5 saved as ``step5.ckpt``."""
    out = tmp_path_factory.mktemp("uninterrupted")
    code, metrics = train_in_process(overrides(data), out / "run",
                                     [PauseAt(STOP_STEP, save=str(out / "step5.ckpt"))])
    assert code == 0
    return out, metrics


def test_sigterm_to_a_training_subprocess_then_resume(data, uninterrupted, tmp_path):
    ref_dir, ref_metrics = uninterrupted
    marker = tmp_path / "paused"
    env = {**os.environ, "PROJECT_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO),
                                          os.environ.get("PYTHONPATH", "")])}
    args = overrides(data, ["+callbacks.pause._target_=test_reliability_interrupt.PauseAt",
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
    code, metrics = train_in_process(overrides(data, [f"ckpt_path={ckpt}"]), tmp_path / "resumed")
    assert code == 0
    assert_same_state(load(tmp_path / "resumed" / "checkpoints" / "last.ckpt"),
                      load(ref_dir / "run" / "checkpoints" / "last.ckpt"))
    for name in VAL_METRICS:
        assert_allclose(metrics[name], ref_metrics[name], rtol=1e-6, err_msg=name)


def test_sigint_in_process_then_resume(data, uninterrupted, tmp_path, caplog):
    ref_dir, ref_metrics = uninterrupted
    code, _ = train_in_process(overrides(data), tmp_path / "run",
                               [PauseAt(STOP_STEP + 1, signal=signal.SIGINT)])
    assert code == 128 + signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    assert "SIGINT: finishing the current batch" in caplog.text
    ckpt = tmp_path / "run" / "checkpoints" / "interrupted.ckpt"
    saved = load(ckpt)
    assert (saved["epoch"], saved["global_step"]) == (1, STOP_STEP + 1)

    # the best value so far survives the resume (it is in the checkpoint)
    saved["state_dict"]["val_within2px_best.max_value"] = torch.tensor(0.75)
    torch.save(saved, ckpt)
    code, metrics = train_in_process(overrides(data, [f"ckpt_path={ckpt}"]), tmp_path / "resumed")
    assert code == 0
    assert metrics["val/within2px_best"] == pytest.approx(max(0.75, ref_metrics["val/within2px"]))
    final, ref = (load(d / "checkpoints" / "last.ckpt") for d in (tmp_path / "resumed",
                                                                   ref_dir / "run"))
    assert_same_state(final, ref, skip=("val_within2px_best.max_value",))
    assert_allclose(metrics["val/loss"], ref_metrics["val/loss"], rtol=1e-6)


def test_resume_from_the_last_epoch_checkpoint(data, uninterrupted, tmp_path):
    """Resuming from ``last.ckpt`` (end of epoch 1) also ends where the reference ends."""
    ref_dir, ref_metrics = uninterrupted
    assert train_in_process(overrides(data, ["trainer.max_epochs=1"]), tmp_path / "one")[0] == 0
    last = tmp_path / "one" / "checkpoints" / "last.ckpt"
    assert load(last)["epoch"] == 0
    code, metrics = train_in_process(overrides(data, [f"ckpt_path={last}"]), tmp_path / "rest")
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


@pytest.mark.parametrize("content, problem", [(None, "checkpoint not found"),
                                              (b"", "empty file"),
                                              (b"hello", "not a PyTorch/Lightning checkpoint")])
def test_resume_from_a_bad_checkpoint_is_one_line(tmp_path, content, problem):
    from rtcnn.errors import RtcnnInputError
    from rtcnn.utils import check_resume_checkpoint

    path = tmp_path / "x.ckpt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RtcnnInputError, match=problem) as err:
        check_resume_checkpoint(path)
    assert err.value.path == str(path)
