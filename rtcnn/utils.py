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
    container = OmegaConf.to_container(cfg, resolve=True)
    params: dict[str, Any] = {
        key: container.get(key)
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
    text = OmegaConf.to_yaml(cfg, resolve=True)
    log.info("config:\n%s", text)
    if save_dir is not None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / "config_tree.log").write_text(text)
