"""Helpers shared by the training tests (importable by a training subprocess too: the
callbacks here are named as ``support.<Class>`` in ``+callbacks.x._target_=`` overrides,
with ``tests/`` on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from numpy.testing import assert_allclose


class PauseAt(Callback):
    """At global step ``step``: save ``save`` and/or write ``marker`` and wait for SIGTERM,
    or send ``signal`` to this process."""

    def __init__(self, step: int, marker: str | None = None, save: str | None = None,
                 signal: int | None = None, timeout: float = 120.0):
        self.step, self.marker, self.save, self.sig = int(step), marker, save, signal
        self.timeout = timeout

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        if self.save:
            trainer.save_checkpoint(self.save)  # every process calls it (a barrier under DDP)
        if self.sig is not None:
            # raise_signal delivers to this (the main) thread and runs the Python handler
            # before it returns; os.kill(getpid()) lets the kernel pick any thread, and the
            # handler can then run a batch later on a loaded machine
            signal.raise_signal(self.sig)
            assert trainer.received_sigterm, "the handler did not ask for a graceful stop"
        if self.marker:
            Path(self.marker).write_text(str(os.getpid()))
            t0 = time.monotonic()
            while not trainer.received_sigterm and time.monotonic() - t0 < self.timeout:
                time.sleep(0.02)


class RecordTiles(Callback):
    """Writes ``<folder>/rank<R>.jsonl``: per training batch, the epoch and the tiles
    (``pair``, ``origin``) this process trained on."""

    def __init__(self, folder: str):
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        tiles = [[str(p), *map(int, o)] for p, o in zip(batch["pair"], batch["origin"].tolist())]
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step,
                                 "tiles": tiles}) + "\n")


def read_tiles(folder: Path) -> dict[int, list[dict]]:
    """``RecordTiles`` output: rank -> its batch records."""
    return {int(p.stem[4:]): [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(Path(folder).glob("rank*.jsonl"))}


def run_hydra(module, argv: list[str], monkeypatch, tmp_path: Path) -> int:
    """``python -m <module> ARGV`` in-process: its Hydra ``main``; returns the exit code."""
    import logging
    import sys

    from hydra.core.global_hydra import GlobalHydra

    monkeypatch.setenv("PROJECT_ROOT", str(tmp_path / "project"))
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")  # config_path relative to the file
    monkeypatch.setattr(sys, "argv", [module.__name__, *argv])
    GlobalHydra.instance().clear()
    try:
        module.run_hydra_main(module.main)
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code
    finally:
        logging.getLogger().handlers.clear()  # Hydra's handlers point into tmp_path
        GlobalHydra.instance().clear()
    return 0


def small_run_overrides(data: Path, extra: list[str] = (), max_epochs: int = 3) -> list[str]:
    """A tiny training run on ``data`` (conftest ``sim128``: 2 train pairs = 4 batches of 2
    tiles), a 5-block attn5 of width 4, no logger, no test stage."""
    return ["data=fits", f"data.root={data}", "data.batch_size=2", "data.num_workers=0",
            "data.persistent_workers=false", "data.progress=false", "data.val_fraction=0.25",
            "data.test_fraction=0.25", "model.net.filters=[4,4,4,4,4]", "model.net.hidden=8",
            "model.n_panels=0", "trainer=debug", f"trainer.max_epochs={max_epochs}",
            "trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "~logger",
            "~callbacks.lr_monitor", "callbacks.progress_bar.refresh_rate=0", "test=false",
            "extras.print_config=false", *extra]


def train_in_process(args: list[str], out: Path, extra_callbacks=()):
    """``rtcnn.train.train`` on the composed config; returns (exit code, metrics)."""
    import rtcnn.train as cmd
    from conftest import compose_train

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
    """A checkpoint this test session wrote (so unpickling it is safe)."""
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


__all__ = ["PauseAt", "RecordTiles", "assert_same_state", "load", "read_tiles", "run_hydra",
           "small_run_overrides", "train_in_process"]
