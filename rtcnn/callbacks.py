"""Training callbacks and a checkpoint writer that make a run resumable and its files safe.

* :class:`InterruptCheckpoint` — SIGTERM (a cluster scheduler, ``kill``) or a first
  SIGINT (Ctrl-C) lets the current training batch finish, then writes
  ``checkpoints/interrupted.ckpt`` and stops the run (a second Ctrl-C stops at once).
  Resuming from it (``ckpt_path=...``) continues at the next batch: the epoch counter,
  the global step, the optimizer and scheduler state and the callbacks' state come from
  the checkpoint, and :class:`rtcnn.data.dataset.TileLoader` skips the batches already
  seen in the interrupted epoch.
* :class:`StepSeed` — seeds torch's global RNG (dropout) from ``(seed, global step)``
  before every training step, so the random numbers of a step do not depend on whether,
  or where, the run was interrupted and resumed.
* :class:`AtomicCheckpointIO` — every checkpoint is written to a temporary file in its
  own directory, flushed to disk and renamed onto its final name, so a crash never leaves
  a half-written ``.ckpt`` there (Lightning's own writer stages the file in the system
  temporary directory, which is a copy, not a rename, when that is another file system).

The training configs use all three (``conf/callbacks/default.yaml``,
``conf/trainer/default.yaml``).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from rtcnn.io.pairdir import atomic_write

log = logging.getLogger(__name__)

INTERRUPT_FILENAME = "interrupted"  # checkpoints/interrupted.ckpt
SIGNAL_EXIT_BASE = 128  # exit status of a run stopped by signal N: 128 + N (shell convention)


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Save a resumable checkpoint when training is interrupted (SIGTERM, SIGINT, an error).

    SIGTERM is Lightning's own graceful stop (the current batch finishes, then
    :class:`lightning.pytorch.utilities.exceptions.SIGTERMException`); this callback makes
    the first SIGINT do the same, instead of a ``KeyboardInterrupt`` that can land in the
    middle of an optimizer step. On the exception it saves ``dirpath/filename.ckpt``
    (atomically, with the trainer's checkpoint IO) if training had started.

    The checkpoint also keeps the trainer's current metrics (its ``callback_metrics``),
    which are put back when a run resumes: a stop after the last batch of an epoch comes
    after that epoch's validation but before its end-of-epoch hooks, and early stopping
    and the best-model checkpoint need the validation metrics there.

    Parameters
    ----------
    dirpath : str or path-like
        Folder of the checkpoint (the run's ``checkpoints/``).
    filename : str
        Name without ``.ckpt``.

    Attributes
    ----------
    signal_name : str or None
        ``"SIGTERM"`` or ``"SIGINT"`` once one was received, else None.
    saved : pathlib.Path or None
        The checkpoint written on the interruption, else None.
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = INTERRUPT_FILENAME) -> None:
        super().__init__(os.fspath(dirpath), filename)
        self.signal_name: str | None = None
        self.saved: Path | None = None
        self._previous_sigint: Any = None
        self._fit_trainer: pl.Trainer | None = None
        self._restored_metrics: dict[str, float] = {}

    # -- signals --------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._fit_trainer = trainer

    def _install_sigint(self) -> None:
        # after Lightning registered its SIGTERM handler (it restores the handlers it found
        # then, on its teardown): on_train_start, not setup
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.signal_name == "SIGINT":  # second Ctrl-C: stop now
            self._restore_sigint()
            raise KeyboardInterrupt
        self.signal_name = "SIGINT"
        log.warning("SIGINT: finishing the current batch, then saving %s (Ctrl-C again to "
                    "stop at once)", self.ckpt_path)
        sigterm = signal.getsignal(signal.SIGTERM)
        if callable(sigterm):  # Lightning's SIGTERM handler: a graceful stop after the batch
            sigterm(signal.SIGTERM, frame)
        else:  # no graceful path available: behave as a plain Ctrl-C
            raise KeyboardInterrupt

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None:
            try:
                signal.signal(signal.SIGINT, self._previous_sigint)
            except ValueError:  # not the main thread
                pass
            self._previous_sigint = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)

    # -- the checkpoint -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        metrics = {}
        if self._fit_trainer is not None:
            for name, value in self._fit_trainer.callback_metrics.items():
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    metrics[name] = float(value)
        return {"callback_metrics": metrics}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_metrics = dict(state_dict.get("callback_metrics") or {})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_sigint()
        for name, value in self._restored_metrics.items():  # resumed: metrics of the last step
            trainer.callback_metrics.setdefault(name, torch.tensor(value))
        self._restored_metrics = {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore_sigint()
        if self.signal_name is None and trainer.received_sigterm:
            self.signal_name = "SIGTERM"
        if trainer.state.fn != "fit" or not _training_started(trainer):
            return
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return  # an error on one process only: saving needs every process (a barrier)
        super().on_exception(trainer, pl_module, exception)
        self.saved = Path(self.ckpt_path)
        log.warning("interrupted at epoch %d, step %d: resumable checkpoint %s",
                    trainer.current_epoch, trainer.global_step, self.ckpt_path)


def _training_started(trainer: pl.Trainer) -> bool:
    """True once the fit loop has trained at least one batch (in this or a resumed run)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.total
    return trainer.global_step > 0 or progress.completed > 0


class StepSeed(Callback):
    """Seed torch's global RNG from ``(seed, global step)`` before each training step.

    Parameters
    ----------
    seed : int or None
        The run's seed; None disables the callback.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = None if seed is None else int(seed)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        if self.seed is None:
            return
        torch.manual_seed(step_seed(self.seed, trainer.global_step))


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of a run seeded with ``seed`` (numpy SeedSequence)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(1, np.uint64)
    return int(state[0] >> np.uint64(1))


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`TorchCheckpointIO` that writes each checkpoint atomically (temp file + rename).

    The checkpoint goes to ``.<name>.<random>.tmp`` in the target directory, is flushed
    and ``fsync``-ed, then :func:`os.replace`-d onto ``path``: readers see the old file or
    the complete new one, never a partial one. Remote (fsspec URL) paths fall back to
    Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if "://" in os.fspath(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)
        return None


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file in ``path``'s folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, True, lambda tmp: torch.save(obj, tmp))


__all__ = ["AtomicCheckpointIO", "InterruptCheckpoint", "StepSeed", "atomic_torch_save",
           "step_seed"]
