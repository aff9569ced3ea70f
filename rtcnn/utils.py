"""Helpers of the Hydra commands: build callbacks and loggers, log the config, pick a metric.

Used by :mod:`rtcnn.train` (and any later command built the same way); nothing here holds
training logic.
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
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from rtcnn.errors import RtcnnInputError

log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- reliability
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save files are zip archives
_PICKLE_MAGIC = b"\x80"  # legacy (non-zip) torch.save files start with a pickle protocol


def check_resume_checkpoint(ckpt_path: str | Path | None) -> Path | None:
    """Check ``ckpt_path`` (the checkpoint to resume from) before any work is done.

    Raises
    ------
    RtcnnInputError
        Missing, a directory, empty, or not a torch checkpoint (by its first bytes).
    """
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if not path.exists():
        raise RtcnnInputError(path, "checkpoint not found (ckpt_path)")
    if not path.is_file():
        raise RtcnnInputError(path, "is a directory, not a checkpoint (ckpt_path)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise RtcnnInputError(path, "empty file, not a checkpoint (ckpt_path)")
    if not (head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC)):
        raise RtcnnInputError(path, "not a PyTorch/Lightning checkpoint (ckpt_path)")
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


def run_hydra_main(main: Any) -> None:
    """Run a ``@hydra.main`` entry point so that a bad command line exits with status 2.

    Hydra reports a config error (an unknown key, a bad override) itself and exits 1; that
    happens before the task function starts, which is how it is told apart from a failure
    of the task (still exit 1 for an unexpected error, 2 for a user mistake).
    """
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().cfg = None
    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not HydraConfig.initialized():
            raise SystemExit(2) from None
        raise
