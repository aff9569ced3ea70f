"""Train a model: ``python -m rtcnn.train [group=option ...] [key=value ...]``.

The config is ``conf/train.yaml`` (Hydra). Examples::

    python -m rtcnn.train                              # attn5 on the simulated set, CPU
    python -m rtcnn.train model=attn5 trainer=gpu      # one GPU, bf16
    python -m rtcnn.train trainer=ddp trainer.devices=4  # DDP, one process per GPU
    python -m rtcnn.train experiment=paper             # the paper's network and 7000 epochs
    python -m rtcnn.train -m model.optimizer.lr=1e-2,1e-3 data.batch_size=16,32
    python -m rtcnn.train hparams_search=optuna        # maximise val/within2px_best
    python -m rtcnn.train ckpt_path=outputs/train/runs/<time>/checkpoints/last.ckpt
    python -m rtcnn.train -m hydra/launcher=slurm trainer=ddp trainer.devices=4 \
        trainer.num_nodes=2 hydra.launcher.partition=gpu  # SLURM via submitit (conf/hydra/launcher)
    tensorboard --logdir outputs                       # losses, metrics, LR, hparams, panels

Each run writes to its own ``outputs/<task_name>/runs/<time>/`` (multiruns:
``outputs/<task_name>/multiruns/<time>/<job number>/``): ``checkpoints/`` (best by the
task's ``monitor``, e.g. ``val/within2px``, and ``last.ckpt``), ``tensorboard/``,
``<task_name>.log``, ``config_tree.log`` and ``.hydra/``.

An unset ``ckpt_path`` means a fresh run: a run directory that already holds checkpoints
(``hydra.run.dir=<old run>``) is refused unless ``ckpt_path=`` asks to resume. The main
config keys, the run directory and the checkpoint are checked before any data is read;
a mistake is one line ``rtcnn: error: <key or file>: <problem>`` and exit status 2, a
crash exits 1 (Hydra prints its traceback).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from rtcnn.errors import cli_main
from rtcnn.utils import (
    check_resume_checkpoint,
    check_run_dir,
    check_train_config,
    exit_interrupted,
    get_metric_value,
    instantiate_callbacks,
    instantiate_loggers,
    log_hyperparameters,
    log_unusable_pairs,
    print_config,
    run_hydra_main,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the model described by ``cfg``, then test its best checkpoint.

    Parameters
    ----------
    cfg : DictConfig
        The composed ``train`` config (``data``, ``model``, ``callbacks``, ``logger``,
        ``trainer``, ``paths``, ``seed``, ``train``, ``test``, ``ckpt_path``).

    Returns
    -------
    metrics : dict of str -> float
        Everything logged at the end of fit and test (``val/within2px``, ``test/...``).
    objects : dict
        ``cfg``, ``datamodule``, ``model``, ``callbacks``, ``loggers``, ``trainer``.
    """
    check_train_config(cfg)
    check_run_dir(cfg.paths.output_dir, cfg.get("ckpt_path"))
    check_resume_checkpoint(cfg.get("ckpt_path"), OmegaConf.select(cfg, "model.net._target_"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("print_config"):
        print_config(cfg, cfg.paths.output_dir)

    log.info("instantiating datamodule <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    log.info("instantiating model <%s>", cfg.model._target_)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    log.info("instantiating trainer <%s>", cfg.trainer._target_)
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    objects = {"cfg": cfg, "datamodule": datamodule, "model": model, "callbacks": callbacks,
               "loggers": loggers, "trainer": trainer}
    log_hyperparameters(cfg, model, loggers)

    try:
        if cfg.get("train"):
            log.info("training")
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        if cfg.get("test"):
            ckpt = None
            if cfg.get("train") and trainer.checkpoint_callback is not None:
                ckpt = trainer.checkpoint_callback.best_model_path or None
            elif not cfg.get("train"):
                ckpt = cfg.get("ckpt_path")
            log.info("testing %s", ckpt or "the current weights")
            trainer.test(model=model, datamodule=datamodule, ckpt_path=ckpt)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    except SIGTERMException:  # SIGTERM / first Ctrl-C: checkpoint saved, say how to resume
        exit_interrupted(cfg, callbacks, trainer)
    log_unusable_pairs(datamodule)
    log.info("output dir: %s", cfg.paths.output_dir)
    return metrics, objects


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
@cli_main
def main(cfg: DictConfig) -> float | None:
    """Entry point: train, test, and return ``cfg.optimized_metric`` (for sweepers)."""
    metrics, _ = train(cfg)
    for name in sorted(metrics):
        log.info("%-28s %.4f", name, metrics[name])
    if not cfg.get("train"):  # test only: there is no validation metric to return
        return None
    return get_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    run_hydra_main(main)  # exit 2: a user mistake; 1: a crash
