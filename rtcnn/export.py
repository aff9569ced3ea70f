"""``python -m rtcnn.export CKPT -o BUNDLE``: a training run's network as a shareable bundle.

A bundle is a directory with ``model.safetensors`` (the network's weights, no pickle) and
``card.json`` (the model card), the format of the shipped models
(:mod:`rtcnn.checkpoint`, ``python -m rtcnn.models``). Any bundle is accepted wherever a
model is named: ``python -m rtcnn.detect REF NEW --model BUNDLE``,
``python -m rtcnn.evaluate model_path=BUNDLE``.

The card is filled from the run the checkpoint belongs to (:func:`run_card`): the
network spec and threshold (from the checkpoint), the training recipe (the command's
overrides, the seed, the epoch and step of the checkpoint), the data, model and trainer
configs (``<run>/.hydra/config.yaml``), the run's best validation score and its final
``test/*`` metrics (its TensorBoard events) where they exist, and the rtcnn and torch
versions. ``--card KEY=FILE.json`` adds the content of a JSON file under ``KEY`` (e.g. the
``python -m rtcnn.score --json`` summary on a fresh test set); ``--set KEY=VALUE`` adds a
string. An existing bundle is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtcnn.checkpoint import check_checkpoint, export_bundle, read_checkpoint
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main

__all__ = ["build_parser", "main", "run_card", "run_metrics"]

log = logging.getLogger(__name__)

RUN_OVERRIDES = Path(".hydra") / "overrides.yaml"  # a Hydra run's command-line overrides
CARD_CONFIG_KEYS = ("seed", "task_name", "data", "model", "trainer")  # run config kept


def _run_dir(ckpt: Path) -> Path | None:
    """The checkpoint's training run (:func:`rtcnn.evaluate.run_dir_of`) if it has a config."""
    from rtcnn.evaluate import RUN_CONFIG, run_dir_of

    run = run_dir_of(ckpt)
    return run if (run / RUN_CONFIG).is_file() else None


def run_metrics(run_dir: str | Path) -> dict[str, float]:
    """The last value of every ``test/*`` scalar in the TensorBoard events of a run.

    Parameters
    ----------
    run_dir : path-like
        A training run directory (events anywhere below it).

    Returns
    -------
    dict of str -> float
        ``{"test/f1": 0.83, ...}``; empty when the run logged no test metrics.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, float] = {}
    for events in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith("test/"):
                out[tag] = float(acc.Scalars(tag)[-1].value)
    return out


def run_card(ckpt: str | Path) -> dict[str, Any]:
    """The model-card entries of a training checkpoint's run.

    Parameters
    ----------
    ckpt : path-like
        A Lightning checkpoint of ``python -m rtcnn.train`` (read with
        ``weights_only=True``).

    Returns
    -------
    dict
        ``recipe`` (command, overrides, seed, epoch, step, checkpoint file), the run's
        ``data``/``model``/``trainer`` configs, ``run_metrics`` (best validation score and
        ``test/*``), ``torch_version``, ``exported`` (UTC time). Keys whose source is
        missing (a checkpoint outside a Hydra run) are left out.
    """
    import torch
    from omegaconf import OmegaConf

    ckpt = Path(ckpt)
    state = read_checkpoint(ckpt)
    card: dict[str, Any] = {"torch_version": torch.__version__,
                            "exported": _dt.datetime.now(_dt.timezone.utc).isoformat(
                                timespec="seconds")}
    recipe: dict[str, Any] = {"checkpoint": ckpt.name}
    for key in ("epoch", "global_step"):
        if isinstance(state.get(key), int):
            recipe[key] = state[key]
    if "epoch" in recipe:
        recipe["epochs_trained"] = recipe["epoch"] + 1
    metrics: dict[str, Any] = {}
    for name, cb in (state.get("callbacks") or {}).items():
        if (str(name).startswith("ModelCheckpoint") and isinstance(cb, dict)
                and cb.get("monitor") and cb.get("best_model_score") is not None):
            metrics[f"best_{cb['monitor']}"] = float(cb["best_model_score"])
    run = _run_dir(ckpt)
    if run is not None:
        cfg = OmegaConf.load(run / RUN_OVERRIDES.with_name("config.yaml"))
        overrides = (list(OmegaConf.load(run / RUN_OVERRIDES))
                     if (run / RUN_OVERRIDES).is_file() else [])
        recipe["command"] = " ".join(["python -m rtcnn.train", *map(str, overrides)])
        recipe["overrides"] = [str(o) for o in overrides]
        recipe["run_dir"] = str(run)
        if "seed" in cfg:
            recipe["seed"] = cfg.seed
        for key in CARD_CONFIG_KEYS[1:]:
            if key not in cfg:
                continue
            node = cfg._get_node(key)
            if not OmegaConf.is_config(node):
                card[key] = cfg[key]
                continue
            try:
                card[key] = OmegaConf.to_container(node, resolve=True)
            except Exception:  # noqa: BLE001 - a resolver of another run: keep it unresolved
                card[key] = OmegaConf.to_container(node, resolve=False)
        metrics.update(run_metrics(run))
    card["recipe"] = recipe
    if metrics:
        card["run_metrics"] = metrics
    return card


def _extra_entries(cards: Sequence[str], sets: Sequence[str]) -> dict[str, Any]:
    """``--card KEY=FILE.json`` and ``--set KEY=VALUE`` as card entries (checked)."""
    out: dict[str, Any] = {}
    for item in cards:
        key, sep, name = item.partition("=")
        if not sep or not key or not name:
            raise RtcnnInputError(None, f"--card takes KEY=FILE.json, got {item!r}")
        try:
            out[key] = json.loads(Path(name).read_text())
        except FileNotFoundError:
            raise RtcnnInputError(name, "not found (--card)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RtcnnInputError(name, f"not a readable JSON file ({type(err).__name__})") from None
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RtcnnInputError(None, f"--set takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> CommandParser:
    """The command-line parser."""
    p = CommandParser(prog="python -m rtcnn.export", description=__doc__.splitlines()[0])
    p.add_argument("ckpt", metavar="CKPT", help="a training checkpoint (.ckpt) of rtcnn.train")
    p.add_argument("-o", "--output", required=True, metavar="BUNDLE",
                   help="bundle directory to write (model.safetensors + card.json)")
    p.add_argument("--name", default=None, help="the model's name in its card "
                   "(default: the bundle directory's name)")
    p.add_argument("--card", action="append", default=[], metavar="KEY=FILE.json",
                   help="add a JSON file's content to the card under KEY (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="add a string entry to the card (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.export``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    ckpt = check_checkpoint(args.ckpt)
    extra = _extra_entries(args.card, args.set)
    out = Path(args.output)
    card = {"name": args.name or out.resolve().name, **run_card(ckpt), **extra}
    export_bundle(ckpt, out, card=card, overwrite=args.overwrite)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
