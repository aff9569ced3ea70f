"""``python -m rtcnn.models [NAME ...] [--json]``: the models shipped with rtcnn and their cards.

Each shipped model is a bundle ``rtcnn/models/weights/<name>/`` (``model.safetensors`` +
``card.json``, :mod:`rtcnn.checkpoint`) installed with the package. Without arguments every
shipped model is listed with its card: the network, the training recipe and seed, the
training data, the threshold, the rtcnn version and the metrics measured on a fresh test
set. ``--json`` prints the whole card(s) as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from rtcnn.checkpoint import BUNDLE_CARD, SHIPPED_DIR, shipped_models
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main

__all__ = ["card_lines", "fresh_lines", "main", "read_card"]

DATA_KEYS = ("mode", "pairs", "size", "sim_seed", "kinds", "min_snr", "tile_size", "split")


def read_card(name: str) -> dict[str, Any]:
    """The card of the shipped model ``name`` (a JSON object)."""
    if name not in shipped_models():
        raise RtcnnInputError(name, f"not a shipped model (shipped: {', '.join(shipped_models())})")
    path = SHIPPED_DIR / name / BUNDLE_CARD
    try:
        card = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RtcnnInputError(path, f"not a readable model card ({type(err).__name__})") from None
    if not isinstance(card, dict):
        raise RtcnnInputError(path, "model card is not a JSON object")
    return card


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


SCORE_KEYS = ("n_transients", "n_detections", "completeness", "completeness_snr", "m50",
              "fp_per_sca", "purity", "loc_median_px", "dmag_median_abs_err")  # rtcnn.score
EVAL_KEYS = ("n_tiles", "within1px", "within2px", "within5px", "dist_median")  # rtcnn.evaluate


def fresh_lines(block: dict[str, Any]) -> list[str]:
    """Summary lines of a fresh-test block: an ``rtcnn.score --json`` or an
    ``rtcnn.evaluate`` ``metrics.json`` (other blocks: one line per entry)."""
    if isinstance(block.get("methods"), dict):  # rtcnn.score: one line per catalog
        snr = block.get("snr_min", 5)
        out = []
        for name, m in block["methods"].items():
            at = m.get("at_threshold", {})
            out.append(f"{name}: " + ", ".join(
                f"{'completeness_snr' + format(snr, 'g') if k == 'completeness_snr' else k}"
                f"={_fmt(at[k])}" for k in SCORE_KEYS if k in at))
        return out
    if isinstance(block.get("splits"), dict):  # rtcnn.evaluate
        return [f"{split}: " + ", ".join(f"{k}={_fmt(m[k])}" for k in EVAL_KEYS if k in m)
                for split, m in block["splits"].items()]
    return [f"{k}: {_fmt(v)}" for k, v in block.items()]


def card_lines(name: str, card: dict[str, Any]) -> list[str]:
    """The human-readable lines of one model card."""
    net = dict(card.get("net") or {})
    target = net.pop("_target_", "?")
    recipe = card.get("recipe") or {}
    data = card.get("data") or {}
    lines = [f"{name}: {card.get('description', '')}".rstrip(": "),
             f"  network     {target} ({_fmt(net)})",
             f"  threshold   {card.get('threshold')}",
             f"  rtcnn       {card.get('rtcnn_version')} (torch {card.get('torch_version', '?')})"]
    if recipe:
        lines.append(f"  recipe      {recipe.get('command', '?')}  (seed {recipe.get('seed', '?')})")
        lines.append(f"  weights     {recipe.get('checkpoint', '?')}: epoch {recipe.get('epoch', '?')} "
                     f"({recipe.get('epochs_trained', '?')} epochs trained, "
                     f"step {recipe.get('global_step', '?')})")
    for key in ("shipped_epoch", "regenerate", "train_time", "calibration"):
        if key in card:
            lines.append(f"  {key:<11s} {_fmt(card[key])}")
    if data:
        lines.append("  data        " + ", ".join(f"{k}={_fmt(data[k])}" for k in DATA_KEYS
                                               if k in data))
    if isinstance(card.get("run_metrics"), dict):
        lines.append("  run_metrics (the training run's own val/test split)")
        lines += [f"    {k:<28s} {_fmt(v)}" for k, v in card["run_metrics"].items()]
    if isinstance(card.get("fresh_test"), dict):
        lines.append(f"  fresh_test  {card.get('fresh_test_set', '')}")
        lines += [f"    {line}" for line in fresh_lines(card["fresh_test"])]
    if "notes" in card:
        lines.append(f"  notes       {card['notes']}")
    return lines


def build_parser() -> CommandParser:
    """The command-line parser."""
    p = CommandParser(prog="python -m rtcnn.models", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", metavar="NAME", help="shipped models (default: all)")
    p.add_argument("--json", action="store_true", help="print the whole card(s) as JSON")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.models``."""
    args = build_parser().parse_args(argv)
    names = args.names or shipped_models()
    cards = {name: read_card(name) for name in names}
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    if not names:
        print(f"no models shipped (looked in {SHIPPED_DIR})")
    for name in names:
        print("\n".join(card_lines(name, cards[name])))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
