"""``python -m rtcnn.evaluate ckpt_path=<run>/checkpoints/<file>.ckpt [data=...]``.

Turns a trained localisation model into the paper's report (figures 4 to 7 and the
numbers), written to a new directory ``<run>/eval/<date>_<time>/`` of the checkpoint's run
(the nearest parent holding ``.hydra/``, else the parent of ``checkpoints/``); a previous
evaluation is never overwritten. ``eval_root=DIR`` puts the new ``<date>_<time>/`` under
``DIR`` instead of ``<run>/eval``.

Files: ``metrics.json`` (per split: within 1/2/5 px, distance mean / std / median / max,
dmag errors where the model predicts dmag, counts; the test subset with S/N >= 10; the
robustness summary), ``predictions.ecsv`` and ``robustness.ecsv`` (astropy, with units),
``error_distribution.png``, ``error_vs_dmag_edge.png``, ``best_worst_tiles.png``,
``robustness.png``, plus Hydra's ``.hydra/`` and ``evaluate.log``.

The ``model`` and ``data`` configs are the run's own (``<run>/.hydra/config.yaml``), with
``model.<key>=``/``data.<key>=`` overrides applied on top; ``model=<option>`` or
``data=<option>`` picks a composed group instead, as does a run without a saved config.
The model class is ``model._target_`` (a :class:`rtcnn.tasks.LocalizationTask`); its
weights and hyperparameters come from the checkpoint (``load_from_checkpoint``).
All logic is in :mod:`rtcnn.report` and the functions below; ``main`` only wires them.

``model=NAME`` with no ``ckpt_path`` evaluates the shipped model ``NAME``
(``python -m rtcnn.models``; e.g. ``python -m rtcnn.evaluate model=attn5 data.root=...``)
and ``ckpt_path=`` also takes a bundle directory (``python -m rtcnn.export``) or a shipped
name: the network and its weights come from the bundle, the task from ``model``, the data
from ``data`` (composed), and the report goes to a new directory under ``eval_root`` (default
``${paths.log_dir}/evaluate``).

A checkpoint name with ``=`` (Lightning's ``epoch=3-step=120.ckpt``) must be quoted for
Hydra's override parser: ``'ckpt_path="<run>/checkpoints/epoch=3-step=120.ckpt"'``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import pickle
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from rtcnn import plots, report
from rtcnn.augment import D4_NAMES
from rtcnn import checkpoint
from rtcnn.catalog import atomic_write
from rtcnn.errors import RtcnnInputError, cli_main
from rtcnn.tasks import LocalizationTask
from rtcnn.tasks.classification import ClassificationTask
from rtcnn.utils import log_unusable_pairs, run_hydra_main

log = logging.getLogger(__name__)

EVAL_SUBDIR = "eval"  # evaluations of a run go to <run>/eval/<timestamp>/
RUN_CONFIG = Path(".hydra") / "config.yaml"  # a Hydra run's composed config
RUN_SEARCH_DEPTH = 4  # parents of the checkpoint searched for the run directory
SPLITS = ("val", "test")  # splits evaluated; robustness and figures use "test"


def run_dir_of(ckpt_path: str | Path) -> Path:
    """The training run directory that holds ``ckpt_path``.

    The nearest of the first :data:`RUN_SEARCH_DEPTH` parents that holds ``.hydra/``;
    else the parent of a ``checkpoints/`` folder; else the checkpoint's folder.
    """
    ckpt = Path(ckpt_path).resolve()
    for parent in list(ckpt.parents)[:RUN_SEARCH_DEPTH]:
        if (parent / RUN_CONFIG).is_file():
            return parent
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def new_eval_dir(
    run_dir: str | Path, subdir: str = EVAL_SUBDIR, now: _dt.datetime | None = None
) -> Path:
    """A not yet existing ``<run_dir>/<subdir>/<YYYY-mm-dd_HH-MM-SS>[_N]`` (not created)."""
    stamp = (now or _dt.datetime.now()).strftime("%Y-%m-%d_%H-%M-%S")
    base = Path(run_dir) / subdir / stamp
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{stamp}_{i}"), i + 1
    return out


def _eval_dir_resolver(ckpt_path: str | None, eval_root: str | None, fallback: str) -> str:
    """Hydra ``run.dir`` of an evaluation: a new ``<date>_<time>`` dir under ``eval_root``.

    ``eval_root`` defaults to ``<run>/eval`` of the checkpoint; for a missing checkpoint
    it is ``fallback`` (only Hydra's log lands there; the command then stops with a
    one-line error).
    """
    if eval_root not in (None, "", "None"):
        return str(new_eval_dir(eval_root, subdir=""))
    if ckpt_path and Path(ckpt_path).is_file():
        return str(new_eval_dir(run_dir_of(ckpt_path)))
    return str(new_eval_dir(fallback, subdir=""))


OmegaConf.register_new_resolver("rtcnn_eval_dir", _eval_dir_resolver, replace=True, use_cache=True)


def check_checkpoint(ckpt_path) -> Path:
    """Check that ``ckpt_path`` is a readable rtcnn checkpoint; return it as a Path.

    Raises
    ------
    RtcnnInputError
        Not given, or anything :func:`rtcnn.checkpoint.check_checkpoint` refuses (missing,
        unreadable, pickled code, no ``state_dict``, a network class not rtcnn's).
    """
    if ckpt_path in (None, "", "???"):
        raise RtcnnInputError("ckpt_path", "no checkpoint given; pass ckpt_path=<run>/checkpoints/<file>.ckpt")
    # the one safe loading policy: weights_only, rtcnn's own network classes only
    return checkpoint.check_checkpoint(Path(str(ckpt_path)))


def _task_class(model_cfg: DictConfig, source):
    """The task class ``model_cfg._target_``: one the report handles, or one line."""
    target = str(model_cfg._target_)
    try:
        cls = hydra.utils.get_class(target)
    except Exception:  # noqa: BLE001 - hydra raises plain Exception / ImportError variants
        raise RtcnnInputError("model._target_", f"cannot import {target!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, (LocalizationTask, ClassificationTask))):
        raise RtcnnInputError(
            source, f"was trained as {target}; rtcnn.evaluate reports localisation models "
            "(LocalizationTask, e.g. model=attn5); score detectors with rtcnn.detect / rtcnn.score")
    return cls


def load_bundle_module(model_cfg: DictConfig, source: str | Path, device: str = "cpu"):
    """The task ``model_cfg._target_`` around the network of a bundle or shipped model.

    The network (class, arguments, weights) is the bundle's (:func:`rtcnn.checkpoint.load_model`,
    safetensors, no pickle); the task's other settings are ``model_cfg``'s.
    """
    cls = _task_class(model_cfg, source)
    loaded = checkpoint.load_model(source)
    module = hydra.utils.instantiate(model_cfg, net=loaded.net)
    if not isinstance(module, cls):
        raise RtcnnInputError("model._target_", f"did not build a {cls.__name__}")
    return module.to(device).eval()


def model_source(ckpt_path, model_name: str | None) -> tuple[str, Path | str]:
    """What to evaluate: ``("checkpoint", path)`` or ``("bundle", bundle dir or shipped name)``.

    ``ckpt_path`` unset and ``model=NAME`` a shipped model: that model. Otherwise
    ``ckpt_path`` is a training checkpoint (checked, :func:`check_checkpoint`), a bundle
    directory or a shipped model's name.
    """
    if ckpt_path in (None, "", "???"):
        if model_name and model_name in checkpoint.shipped_models():
            return "bundle", model_name
        return "checkpoint", check_checkpoint(ckpt_path)
    path = Path(str(ckpt_path))
    if path.is_dir() or (not path.exists() and str(ckpt_path) in checkpoint.shipped_models()):
        return "bundle", str(ckpt_path)
    return "checkpoint", check_checkpoint(ckpt_path)


def load_module(model_cfg: DictConfig, ckpt_path: str | Path, device: str = "cpu"):
    """Load the LightningModule class ``model_cfg._target_`` from ``ckpt_path`` (eval mode).

    The class must be a :class:`rtcnn.tasks.LocalizationTask` (the report needs
    ``forward`` -> (B, 2) positions); weights and hyperparameters come from the checkpoint.
    """
    target = str(model_cfg._target_)
    cls = _task_class(model_cfg, ckpt_path)
    try:
        module = cls.load_from_checkpoint(str(ckpt_path), map_location=device)
    except (RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise RtcnnInputError(ckpt_path, f"does not load into {target} ({first})") from None
    return module.eval()


def _overridden(overrides: Sequence[str]) -> list[str]:
    """The keys of command-line overrides (``+``/``~``/``++`` prefixes and values dropped)."""
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]


def run_group_config(
    cfg: DictConfig, ckpt_path: Path, group: str, overrides: Sequence[str] = ()
) -> DictConfig:
    """The ``group`` ('data' or 'model') config to evaluate with.

    ``<group>=<option>`` on the command line: the composed group, as given. Otherwise the
    run's own ``<group>`` (``<run>/.hydra/config.yaml``) with any ``<group>.<key>=<value>``
    overrides applied on top (e.g. ``data.num_workers=0``); without a run config, the
    composed group.
    """
    keys = _overridden(overrides)
    run_cfg = run_dir_of(ckpt_path) / RUN_CONFIG
    if group in keys or not run_cfg.is_file():
        return cfg[group]
    saved = OmegaConf.load(run_cfg)
    if group not in saved:
        return cfg[group]
    merged = cfg.copy()
    with open_dict(merged):
        merged[group] = saved[group]  # replaced whole (another class may have other keys)
        for key in keys:
            if key.startswith(f"{group}."):
                OmegaConf.update(merged, key, OmegaConf.select(cfg, key), force_add=True)
    log.info("%s config from %s", group, run_cfg)
    return merged[group]  # its interpolations (${paths...}) resolve against this config


def split_loader(datamodule, split: str):
    """``datamodule``'s dataloader for ``split`` ('val' or 'test'), set up for it."""
    stage = {"val": "validate", "test": "test"}[split]
    datamodule.setup(stage)
    datasets = getattr(datamodule, "datasets", None) or {}
    if split in datasets and len(datasets[split]) == 0:
        where = getattr(datamodule, "source", None)
        raise RtcnnInputError(where, f"the {split} split has no tiles (too few pairs for "
                              f"data.val_fraction/test_fraction, or data.split=region for one "
                              f"pair); evaluate other splits with splits=[...]")
    return getattr(datamodule, f"{split}_dataloader")()


def write_report(
    module: torch.nn.Module,
    datamodule,
    out_dir: str | Path,
    splits: Sequence[str] = SPLITS,
    views: Sequence[str] = report.PAPER_VIEWS,
    device: str = "cpu",
    meta: dict | None = None,
    max_tiles: int | None = None,
    n_extremes: int = report.N_EXTREMES,
) -> dict:
    """Evaluate ``module`` on ``datamodule`` and write every report file into ``out_dir``.

    Parameters
    ----------
    module : torch.nn.Module
        Images (B, 2, n, n) -> (B, 2) (x, y) / n (optionally a 3rd column, dmag).
    datamodule : LightningDataModule-like
        Has ``setup(stage)``, ``val_dataloader()``, ``test_dataloader()``.
    out_dir : path
        Created if needed; must not hold a previous ``metrics.json``.
    splits : sequence of str
        Splits for ``metrics.json``; the last one ("test") gets the tables and figures.
    views : sequence of str
        D4 views of the robustness test (first "identity").
    device : str
        Torch device of the forward passes.
    meta : dict
        Extra provenance written into ``metrics.json`` and the tables (checkpoint...).
    max_tiles : int or None
        Limit per split (None: all tiles).
    n_extremes : int
        Best and worst tiles shown in ``best_worst_tiles.png``.

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    out = Path(out_dir)
    if (out / "metrics.json").exists():
        raise RtcnnInputError(out, "already holds an evaluation (metrics.json)")
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    module = module.to(device)
    result: dict = {**meta, "splits": {}}
    test = None
    for split in splits:
        report_split = split == splits[-1]
        pred = report.predict_split(
            module, split_loader(datamodule, split),
            views=tuple(views) if report_split else ("identity",),
            device=device, n_extremes=n_extremes, max_tiles=max_tiles,
        )
        result["splits"][split] = report.split_metrics(pred)
        bright = pred.snr >= report.SNR_CUT
        result["splits"][f"{split}_snr{report.SNR_CUT:g}"] = report.split_metrics(pred, bright)
        if report_split:
            test = pred
    result["robustness"] = report.robustness_summary(test)
    table_meta = {**meta, "split": splits[-1]}
    # atomic writes (temporary file + rename); metrics.json last: it marks a complete report
    for name, table in (("predictions", report.predictions_table(test, table_meta)),
                        ("robustness", report.robustness_table(test, table_meta))):
        atomic_write(out / f"{name}.ecsv", True,
                     lambda tmp, t=table: t.write(tmp, format="ascii.ecsv", overwrite=True))
    for name, fig in report.report_figures(test).items():
        plots.save_figure(fig, out / f"{name}.png")
    atomic_write(out / "metrics.json", False, lambda tmp: Path(tmp).write_text(
        json.dumps(report.jsonable(result), indent=2)))
    return result


def metric_lines(result: dict) -> list[str]:
    """One human-readable line per split of a ``metrics.json`` dict."""
    lines = []
    for split, m in result["splits"].items():
        lines.append(
            f"{split}: n={m['n_tiles']} within1px={m['within1px']:.3f} "
            f"within2px={m['within2px']:.3f} within5px={m['within5px']:.3f} "
            f"mean={m['dist_mean']:.2f} std={m['dist_std']:.2f} "
            f"median={m['dist_median']:.2f} max={m['dist_max']:.2f} px"
        )
    r = result["robustness"]
    lines.append(
        f"robustness ({len(r['views'])} views): median of per-tile median "
        f"{r['median_of_median_px']:.2f} px, median of per-tile std {r['median_of_std_px']:.2f} px, "
        f"all views within 2 px: {r['all_views_within2px']:.3f}"
    )
    return lines


def check_options(cfg: DictConfig) -> str:
    """Check ``splits``, ``views``, ``device``, ``n_extremes``; return the torch device."""
    splits = list(cfg.splits)
    if not splits or any(s not in SPLITS for s in splits):
        raise RtcnnInputError("splits", f"must be a non-empty list of {list(SPLITS)}, got {splits}")
    views = list(cfg.views)
    if not views or views[0] != "identity" or any(v not in D4_NAMES for v in views):
        raise RtcnnInputError(
            "views", f"must start with 'identity' and name D4 elements {list(D4_NAMES)}, got {views}")
    if int(cfg.n_extremes) < 1:
        raise RtcnnInputError("n_extremes", f"must be >= 1, got {cfg.n_extremes}")
    device = str(cfg.device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RtcnnInputError("device", f"{device} requested but CUDA is not available here")
    return device


def evaluate(cfg: DictConfig, out_dir: str | Path, overrides: Sequence[str] = (),
             model_name: str | None = None) -> dict:
    """The whole command for a composed config: check, load, evaluate, write.

    ``model_name``: the ``model`` group's choice (``model=NAME``), a shipped model when no
    ``ckpt_path`` is given.
    """
    device = check_options(cfg)
    kind, ckpt = model_source(OmegaConf.select(cfg, "ckpt_path", default=None), model_name)
    if kind == "bundle":  # the bundle's network; task and data as composed
        model_cfg, data_cfg = cfg.model, cfg.data
        module = load_bundle_module(model_cfg, ckpt, device)
        meta = {"model_bundle": str(ckpt)}
    else:
        model_cfg = run_group_config(cfg, ckpt, "model", overrides)
        module = load_module(model_cfg, ckpt, device)
        data_cfg = run_group_config(cfg, ckpt, "data", overrides)
        meta = {"checkpoint": str(ckpt.resolve()), "run_dir": str(run_dir_of(ckpt))}
    datamodule = hydra.utils.instantiate(data_cfg)
    meta.update({"data": OmegaConf.to_container(data_cfg, resolve=True),
                 "model": str(model_cfg._target_)})
    if isinstance(module, ClassificationTask):  # star/galaxy stamps: rtcnn.report_stargal
        from rtcnn import report_stargal

        result = report_stargal.write_classification_report(
            module, datamodule, out_dir, splits=list(cfg.splits), device=device, meta=meta,
            max_stamps=cfg.max_tiles,
            n_worst=int(OmegaConf.select(cfg, "n_worst", default=report_stargal.N_WORST)))
        for line in report_stargal.metric_lines(result):
            log.info(line)
        log.info("report written to %s", out_dir)
        return result
    result = write_report(module, datamodule, out_dir, splits=list(cfg.splits),
                          views=list(cfg.views), device=device, meta=meta,
                          max_tiles=cfg.max_tiles, n_extremes=cfg.n_extremes)
    for line in metric_lines(result):
        log.info(line)
    log_unusable_pairs(datamodule)
    log.info("report written to %s", out_dir)
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
@cli_main
def main(cfg: DictConfig) -> None:
    """Entry point: ``python -m rtcnn.evaluate ckpt_path=... [data=...] [eval_root=...]``."""
    hc = HydraConfig.get()
    evaluate(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task),
             model_name=hc.runtime.choices.get("model"))


if __name__ == "__main__":
    run_hydra_main(main)  # a bad command line (Hydra's own message) exits 2
