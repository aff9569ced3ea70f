"""Helpers of the Hydra commands: build callbacks and loggers, log the config, pick a metric,
check the config, the run directory and the checkpoint before any work, and exit codes.

Used by :mod:`rtcnn.train` and :mod:`rtcnn.evaluate`; nothing here holds training logic.

Importing this module registers the ``rtcnn.task`` config resolver:
``${rtcnn.task:${model._target_},monitor}`` is the ``monitor`` (or ``mode``) class
attribute of the task class (:class:`rtcnn.tasks.NetTask`), which the callback configs use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rtcnn.errors import EXIT_INPUT_ERROR, RtcnnInputError

log = logging.getLogger(__name__)

__all__ = [
    "HPARAM_METRICS",
    "JobStarted",
    "RunDirGuard",
    "check_resume_checkpoint",
    "check_run_dir",
    "check_train_config",
    "exit_interrupted",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_hyperparameters",
    "log_unusable_pairs",
    "print_config",
    "run_hydra_main",
    "task_attribute",
]

# metrics shown against the hyperparameters in TensorBoard's HPARAMS tab
HPARAM_METRICS = (
    "val/within2px_best",
    "val/within1px",
    "val/within2px",
    "val/within5px",
    "val/dist_mean",
    "test/within1px",
    "test/within2px",
    "test/within5px",
    "test/within2px_snr10",
    "test/dist_mean",
)


def _instantiate_group(cfg: DictConfig | None, what: str) -> list[Any]:
    if not cfg:
        return []
    if not isinstance(cfg, (DictConfig, Mapping)):
        raise RtcnnInputError(what, f"must be a mapping of name -> {{_target_: ...}}, got {cfg!r}")
    objects = []
    for name, sub in cfg.items():
        if isinstance(sub, (DictConfig, Mapping)) and "_target_" in sub:
            log.info("instantiating %s %s <%s>", what, name, sub["_target_"])
            objects.append(hydra.utils.instantiate(sub))
    return objects


def instantiate_callbacks(cfg: DictConfig | None) -> list[Callback]:
    """Build every ``{_target_: ...}`` entry of the ``callbacks`` config (None -> [])."""
    return _instantiate_group(cfg, "callbacks")


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Build every ``{_target_: ...}`` entry of the ``logger`` config (None -> [])."""
    return _instantiate_group(cfg, "logger")


@rank_zero_only
def log_hyperparameters(cfg: DictConfig, model: Any, loggers: list[Logger]) -> None:
    """Send the composed config and parameter counts to every logger.

    ``model``, ``data``, ``trainer``, ``callbacks``, seed, tags and ``ckpt_path`` go to each
    logger's ``log_hyperparams``; on TensorBoard the HPARAMS tab additionally lists the
    :data:`HPARAM_METRICS` (their values come from the scalars logged during the run).
    """
    if not loggers:
        return
    params: dict[str, Any] = {
        key: OmegaConf.to_container(cfg[key], resolve=True)
        if OmegaConf.is_config(cfg.get(key)) else cfg.get(key)
        for key in ("model", "data", "trainer", "callbacks", "task_name", "tags", "seed",
                    "ckpt_path")
    }
    params["model/params/total"] = sum(p.numel() for p in model.parameters())
    params["model/params/trainable"] = sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    for logger in loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_hparams(logger, params)


def _tensorboard_hparams(logger: TensorBoardLogger, params: dict[str, Any]) -> None:
    from lightning.fabric.utilities.logger import _flatten_dict
    from torch.utils.tensorboard.summary import hparams

    flat = logger._sanitize_params(_flatten_dict(params))
    flat = {k: (str(v) if not isinstance(v, (int, float, str, bool)) else v)
            for k, v in flat.items()}
    exp, ssi, sei = hparams(flat, {name: 0.0 for name in HPARAM_METRICS})
    writer = logger.experiment._get_file_writer()
    for summary in (exp, ssi, sei):
        writer.add_summary(summary)


def get_metric_value(metrics: Mapping[str, Any], name: str | None) -> float | None:
    """The value of metric ``name`` as a float (None if ``name`` is None).

    Raises
    ------
    RtcnnInputError
        If ``name`` was not logged (a typo in ``optimized_metric``).
    """
    if not name:
        return None
    if name not in metrics:
        raise RtcnnInputError(
            "optimized_metric", f"metric {name!r} was not logged; logged: {sorted(metrics)}"
        )
    value = float(metrics[name])
    return value if math.isfinite(value) else None


@rank_zero_only
def print_config(cfg: DictConfig, save_dir: str | Path | None = None) -> None:
    """Log the resolved config as YAML and save it to ``save_dir/config_tree.log``."""
    text = OmegaConf.to_yaml({k: v for k, v in cfg.items() if k != "hydra"}, resolve=True)
    log.info("config:\n%s", text)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / "config_tree.log").write_text(text)


# --------------------------------------------------------------------------- resolvers
TASK_ATTRIBUTES = ("monitor", "mode")  # what ${rtcnn.task:<target>,<name>} may read


def task_attribute(target: str, name: str) -> str:
    """The ``monitor`` or ``mode`` class attribute of the task class ``target``.

    Parameters
    ----------
    target : str
        The model config's ``_target_``, e.g. ``rtcnn.tasks.localization.LocalizationTask``.
    name : {'monitor', 'mode'}

    Raises
    ------
    RtcnnInputError
        ``target`` is not a subclass of :class:`rtcnn.tasks.NetTask`, or ``name`` is not
        one of :data:`TASK_ATTRIBUTES`.
    """
    from rtcnn.tasks.base import NetTask

    if name not in TASK_ATTRIBUTES:
        raise RtcnnInputError("rtcnn.task", f"reads one of {TASK_ATTRIBUTES}, not {name!r}")
    try:
        cls = hydra.utils.get_class(str(target))
    except Exception:  # noqa: BLE001 - hydra raises ImportError or ValueError
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, NetTask)):
        raise RtcnnInputError("model._target_", f"{target!r} is not an rtcnn task class "
                              "(a subclass of rtcnn.tasks.NetTask)")
    return getattr(cls, name)


OmegaConf.register_new_resolver("rtcnn.task", task_attribute, replace=True)


# --------------------------------------------------------------------------- checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# key -> (test, what it must be); a key absent from the config (or null, where allowed)
# is not checked here
_TRAIN_CHECKS: dict[str, tuple[Any, str]] = {
    "data.batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "data.tile_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1 (px)"),
    "data.tile_overlap": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (px)"),
    "data.num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "data.val_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "data.test_fraction": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "model.optimizer.lr": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "model.optimizer.weight_decay": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "seed": (lambda v: v is None or _is_int(v), "an integer (or null)"),
    "trainer.max_epochs": (lambda v: v is None or (_is_int(v) and (v >= 1 or v == -1)),
                           "an integer >= 1 (or -1: no limit)"),
}


def check_train_config(cfg: DictConfig) -> None:
    """Check the main keys of a ``train`` config before any work, one line per mistake.

    Checks the keys of :data:`_TRAIN_CHECKS` that the config holds (``data.batch_size``,
    ``data.tile_size``, ``model.optimizer.lr``, ``data.num_workers``, ``seed``,
    ``trainer.max_epochs``...), and that ``data.tile_overlap < data.tile_size``.
    ``trainer.max_epochs`` is only checked when the command trains (``train=true``).

    Raises
    ------
    RtcnnInputError
        Naming the key (as the file) and what it must be, e.g.
        ``data.batch_size: must be an integer >= 1, got 'abc'``.
    """
    for key, (ok, what) in _TRAIN_CHECKS.items():
        if key == "trainer.max_epochs" and not cfg.get("train"):
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not OmegaConf.is_dict(node) or leaf not in node:
            continue
        try:
            value = OmegaConf.select(cfg, key, throw_on_missing=True)
        except Exception as err:  # noqa: BLE001 - a missing or broken interpolation
            raise RtcnnInputError(key, f"cannot be read ({str(err).splitlines()[0]})") from None
        if not ok(value):
            raise RtcnnInputError(key, f"must be {what}, got {value!r}")
    size, overlap = OmegaConf.select(cfg, "data.tile_size"), OmegaConf.select(cfg,
                                                                            "data.tile_overlap")
    if _is_int(size) and _is_int(overlap) and overlap >= size:
        raise RtcnnInputError("data.tile_overlap",
                              f"must be smaller than data.tile_size ({size}), got {overlap}")


CHECKPOINT_DIR = "checkpoints"  # a run's checkpoints: <run>/checkpoints/*.ckpt


def check_run_dir(output_dir: str | Path, ckpt_path: str | Path | None) -> None:
    """Refuse to train afresh in a run directory that already holds checkpoints.

    A run directory given again (``hydra.run.dir=<old run>``) without ``ckpt_path`` would
    overwrite the old run's checkpoints; resuming must be asked for (``ckpt_path=``).

    Raises
    ------
    RtcnnInputError
        ``output_dir/checkpoints`` holds a ``.ckpt`` and ``ckpt_path`` is unset.
    """
    if ckpt_path:
        return
    folder = Path(output_dir) / CHECKPOINT_DIR
    old = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    if old:
        last = folder / "last.ckpt"
        resume = last if last.is_file() else old[-1]
        raise RtcnnInputError(
            output_dir, f"already holds the checkpoints of a run ({len(old)} in "
            f"{CHECKPOINT_DIR}/); resume it with ckpt_path={resume}, or train in a new "
            "directory (leave hydra.run.dir unset)")


class RunDirGuard(HydraCallback):
    """Hydra callback of ``train``: :func:`check_run_dir` before Hydra writes anything.

    Hydra creates the run directory and writes ``.hydra/`` into it before the task starts,
    so the check runs at ``on_run_start``: a refused run leaves the old run untouched.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        before = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # ${hydra:...} in the run dir resolves
        try:
            output_dir = OmegaConf.select(config, "hydra.run.dir")
            check_run_dir(output_dir, OmegaConf.select(config, "ckpt_path"))
        except RtcnnInputError as err:
            import sys

            print(f"rtcnn: error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_INPUT_ERROR) from None
        finally:
            HydraConfig.instance().cfg = before


def check_resume_checkpoint(ckpt_path: str | Path | None,
                            net_target: str | None = None) -> Path | None:
    """Check ``ckpt_path`` (the checkpoint to resume from) before any work is done.

    The file is read with the one safe loading policy (:func:`rtcnn.checkpoint.check_checkpoint`:
    ``torch.load(weights_only=True)``, rtcnn's own network classes only); it must hold the
    network of this config (``net_target``, the ``model.net._target_``) and the training
    state that resuming needs (optimizer states and loop progress, not weights alone).

    Raises
    ------
    RtcnnInputError
        Missing, a directory, empty, truncated, not a torch checkpoint, not an rtcnn
        checkpoint, another network, or weights only; the message ends in ``(ckpt_path)``.
    """
    if not ckpt_path:
        return None
    from rtcnn.checkpoint import NETWORKS, check_checkpoint, network_class, read_checkpoint

    expect = network_class(net_target) if net_target in NETWORKS else None
    path = check_checkpoint(ckpt_path, expect=expect, key="ckpt_path")
    state = read_checkpoint(path)
    missing = [k for k in ("optimizer_states", "loops") if k not in state]
    if missing:
        raise RtcnnInputError(path, "holds weights only (no " + " or ".join(missing) + "), "
                              "so training cannot resume from it (ckpt_path)")
    return path


def log_unusable_pairs(datamodule: Any) -> None:
    """Name, at the end of a command, the pairs its data module left out as unusable."""
    broken = list(getattr(datamodule, "broken", None) or [])
    if not broken:
        return
    log.warning("%d unusable pair(s) were left out (data.strict=true makes this an error):",
                len(broken))
    for b in broken:
        log.warning("  %s", b)


def exit_interrupted(cfg: DictConfig, callbacks: list[Any], trainer: Any) -> None:
    """After a graceful stop (SIGTERM / Ctrl-C): say where the checkpoint is and how to
    resume, then exit with status 128 + signal number (143 SIGTERM, 130 SIGINT)."""
    import signal

    from rtcnn.callbacks import SIGNAL_EXIT_BASE, InterruptCheckpoint

    saver = next((c for c in callbacks if isinstance(c, InterruptCheckpoint)), None)
    name = (saver.signal_name if saver is not None else None) or "SIGTERM"
    ckpt = saver.saved if saver is not None else None
    if ckpt is None:  # no InterruptCheckpoint configured: the last epoch's checkpoint
        ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if ckpt is not None and Path(ckpt).is_file():
        log.warning("%s: stopped at epoch %d, step %d; resume with: python -m rtcnn.train %s",
                    name, trainer.current_epoch, trainer.global_step,
                    " ".join([*_task_overrides(), f"ckpt_path={ckpt}"]))
    else:
        log.warning("%s: stopped before any checkpoint was written", name)
    raise SystemExit(SIGNAL_EXIT_BASE + int(getattr(signal, name)))


def _task_overrides() -> list[str]:
    """The run's command-line overrides except ``ckpt_path`` (empty outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not running under Hydra
        return []
    return [o for o in overrides if not o.lstrip("+~").startswith("ckpt_path=")]


class JobStarted(HydraCallback):
    """Hydra callback (``conf/hydra/default.yaml``): notes that a command's task started.

    :func:`run_hydra_main` uses it to tell a bad command line (Hydra exits 1 before any
    job starts: exit 2) from a crash of the task (Hydra also exits 1: kept).
    """

    started = False

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        JobStarted.started = True


def run_hydra_main(main: Any) -> None:
    """Run a ``@hydra.main`` entry point with the exit codes of the project.

    * 2: a user mistake: an :class:`RtcnnInputError` in the task (one line, through
      :func:`rtcnn.errors.cli_main`), or a bad command line that Hydra reports itself
      (an unknown key, a bad override: Hydra exits 1 before any job starts, told by
      :class:`JobStarted`);
    * 1: the task crashed (an unexpected error: Hydra prints the traceback).
    """
    JobStarted.started = False
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not JobStarted.started:
            raise SystemExit(EXIT_INPUT_ERROR) from None
        raise
