"""Safe loading of rtcnn networks: training checkpoints, bundles and shipped models.

One loading policy for every command (``detect``, ``evaluate``, ``train ckpt_path=``):

* A training checkpoint (``.ckpt``) is read with ``torch.load(weights_only=True)``:
  unpickling never runs code from a file a user names.
* The network class named in it (``hyper_parameters["net"]["_target_"]``) must be one of
  rtcnn's own networks (:data:`NETWORKS`). The name is checked against that allow-list
  *before* anything is imported; its keyword arguments are checked against the class's
  signature before it is built.
* A bundle is a directory holding ``model.safetensors`` (the network's state dict) and
  ``card.json`` (the network spec, the threshold, metrics, version...): no pickle at all.
  :func:`export_bundle` turns a checkpoint into one.
* A shipped model is a bundle inside the package, ``rtcnn/models/weights/<name>/``,
  chosen by name (:func:`shipped_models`).

Every problem with such a file (missing, truncated, not a checkpoint, a foreign or
missing class, bad arguments, weights that do not fit, a threshold that is not a number
in [0, 1]) is one :class:`rtcnn.errors.RtcnnInputError` line.

:func:`load_model` returns a :class:`LoadedModel` (network in eval mode on the CPU, its
threshold, spec and source); the threshold travels as a value, never as an attribute
of the network.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rtcnn import __version__
from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import atomic_write

__all__ = [
    "BUNDLE_CARD",
    "BUNDLE_WEIGHTS",
    "DEFAULT_DETECTOR",
    "NETWORKS",
    "SHIPPED_DIR",
    "LoadedModel",
    "build_network",
    "check_checkpoint",
    "export_bundle",
    "load_model",
    "network_class",
    "read_checkpoint",
    "resolve_source",
    "shipped_models",
]

DEFAULT_DETECTOR = "dense"  # the shipped detector the commands use (rtcnn/models/weights/dense/)

# rtcnn's own networks: the only classes a checkpoint or bundle may name.
# ``_target_`` string -> (module, class name); both the defining module and the package
# re-export are accepted. Nothing outside this table is ever imported.
NETWORKS: dict[str, tuple[str, str]] = {
    "rtcnn.models.detector.DenseDetector": ("rtcnn.models.detector", "DenseDetector"),
    "rtcnn.models.DenseDetector": ("rtcnn.models.detector", "DenseDetector"),
    "rtcnn.models.attn5.Attn5": ("rtcnn.models.attn5", "Attn5"),
    "rtcnn.models.Attn5": ("rtcnn.models.attn5", "Attn5"),
    "rtcnn.models.stargal.StarGalaxyNet": ("rtcnn.models.stargal", "StarGalaxyNet"),
    "rtcnn.models.autoencoder.PairAutoencoder": ("rtcnn.models.autoencoder", "PairAutoencoder"),
}
BUNDLE_WEIGHTS = "model.safetensors"  # file name of a bundle's weights
BUNDLE_CARD = "card.json"  # file name of a bundle's model card
BUNDLE_FORMAT = "rtcnn-bundle/1"  # the card's "format" value
SHIPPED_DIR = Path(__file__).resolve().parent / "models" / "weights"  # shipped bundles
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a shipped model's name


@dataclass(frozen=True)
class LoadedModel:
    """A network read from a checkpoint, bundle or shipped model.

    Attributes
    ----------
    net : torch.nn.Module
        The network with its weights, in eval mode, on the CPU.
    threshold : float or None
        The score threshold saved with it (in [0, 1]); None when none was saved.
    spec : dict
        ``{"_target_": "rtcnn.models....", **kwargs}``: how the network was built.
    source : str
        The checkpoint path, bundle directory or ``shipped:<name>``.
    card : dict
        The bundle's model card (for a checkpoint: ``{}``).
    """

    net: nn.Module
    threshold: float | None
    spec: dict[str, Any]
    source: str
    card: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- classes
def network_class(target: Any, path: str | os.PathLike | None = None) -> type[nn.Module]:
    """The rtcnn network class named by ``target``, checked before any import.

    Raises
    ------
    RtcnnInputError
        ``target`` is missing, not a string, or not one of :data:`NETWORKS`.
    """
    if target is None:
        raise RtcnnInputError(path, "names no network class (no '_target_' in its net spec)")
    if not isinstance(target, str) or target not in NETWORKS:
        shown = repr(target) if len(repr(target)) <= 80 else repr(target)[:77] + "..."
        raise RtcnnInputError(path, f"names the network class {shown}, which is not one of "
                              f"rtcnn's networks ({', '.join(sorted(set(NETWORKS)))})")
    module, name = NETWORKS[target]
    return getattr(importlib.import_module(module), name)


def build_network(spec: Any, path: str | os.PathLike | None = None,
                  expect: type[nn.Module] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the network of a ``{"_target_": ..., **kwargs}`` spec (untrained weights).

    Parameters
    ----------
    spec : mapping
        The network spec saved in a checkpoint or card.
    path : path-like, optional
        The file named in errors.
    expect : type, optional
        The network must be this class (or a subclass), e.g. ``DenseDetector``.

    Returns
    -------
    net : torch.nn.Module
    spec : dict
        A plain copy of the spec.

    Raises
    ------
    RtcnnInputError
        Not a mapping, a class outside :data:`NETWORKS`, not ``expect``, or keyword
        arguments the class does not take or refuses.
    """
    if not isinstance(spec, Mapping):
        raise RtcnnInputError(path, f"network spec is a {type(spec).__name__}, not a mapping "
                              "with '_target_'")
    spec = dict(spec)
    kwargs = {k: v for k, v in spec.items() if k != "_target_"}
    cls = network_class(spec.get("_target_"), path)
    if expect is not None and not issubclass(cls, expect):
        raise RtcnnInputError(path, f"holds a {cls.__name__}, not a {expect.__name__}")
    if not all(isinstance(k, str) for k in kwargs):
        raise RtcnnInputError(path, "network spec has non-string keys")
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise RtcnnInputError(path, f"bad arguments for {cls.__name__}: {err}") from None
    try:
        net = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, ZeroDivisionError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        raise RtcnnInputError(path, f"bad arguments for {cls.__name__} "
                              f"({type(err).__name__}: {first})") from None
    return net, spec


def _threshold(value: Any, path) -> float | None:
    """A saved threshold as a float in [0, 1] (None stays None)."""
    if value is None:
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise RtcnnInputError(path, f"saved threshold {value!r} is not a number") from None
    if not (math.isfinite(t) and 0.0 <= t <= 1.0):
        raise RtcnnInputError(path, f"saved threshold {t} is not a number in [0, 1]")
    return t


def _load_weights(net: nn.Module, weights: Mapping[str, torch.Tensor], path, target) -> None:
    try:
        net.load_state_dict(dict(weights))
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()
        detail = " ".join(s.strip() for s in first[:2])[:200]
        raise RtcnnInputError(path, f"weights do not fit {target} ({detail})") from None


# --------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``torch.load(weights_only=True)``.

    Returns
    -------
    dict
        The checkpoint (``state_dict``, ``hyper_parameters``, ...).

    Raises
    ------
    RtcnnInputError
        Missing, a directory, empty, unreadable (truncated, pickled code, not a torch
        file), or not a dict with a ``state_dict``.
    """
    path = Path(path)
    if not path.exists():
        raise RtcnnInputError(path, "checkpoint not found")
    if not path.is_file():
        raise RtcnnInputError(path, "checkpoint is not a file")
    if path.stat().st_size == 0:
        raise RtcnnInputError(path, "empty file, not a checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        msg = str(err).strip()
        if "weights_only" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            why = "it holds pickled objects other than weights, which are never unpickled"
        else:
            detail = f"{type(err).__name__}: {msg.splitlines()[0][:120]}" if msg else type(err).__name__
            why = f"truncated or corrupt; {detail}"
        raise RtcnnInputError(path, f"not a readable PyTorch checkpoint ({why})") from None
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), Mapping):
        raise RtcnnInputError(path, "not a Lightning checkpoint (no 'state_dict' dict in it)")
    return state


def _checkpoint_spec(state: Mapping[str, Any], path) -> Any:
    hp = state.get("hyper_parameters")
    if not isinstance(hp, Mapping):
        raise RtcnnInputError(path, "not an rtcnn checkpoint (no hyper_parameters dict)")
    if "net" not in hp:
        raise RtcnnInputError(path, "not an rtcnn checkpoint (no network spec in its "
                              "hyper_parameters)")
    return hp["net"]


def check_checkpoint(path: str | os.PathLike, expect: type[nn.Module] | None = None,
                     key: str | None = None) -> Path:
    """Check a checkpoint before any work is done (``evaluate``, ``train ckpt_path=``).

    Reads it safely (:func:`read_checkpoint`) and checks its network spec
    (:func:`build_network`: an rtcnn class taking those arguments). Nothing is imported
    outside :data:`NETWORKS` and no pickled code runs.

    Parameters
    ----------
    path : path-like
    expect : type, optional
        The network must be of this class.
    key : str, optional
        The config key named in errors (e.g. ``"ckpt_path"``), appended to the problem.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    RtcnnInputError
    """
    try:
        state = read_checkpoint(path)
        build_network(_checkpoint_spec(state, path), path, expect)
    except RtcnnInputError as err:
        if key:
            raise RtcnnInputError(err.path, f"{err.problem} ({key})") from None
        raise
    return Path(path)


def _from_checkpoint(path: Path, expect) -> LoadedModel:
    state = read_checkpoint(path)
    net, spec = build_network(_checkpoint_spec(state, path), path, expect)
    weights = {k[len("net."):].replace("_orig_mod.", ""): v
               for k, v in state["state_dict"].items()
               if isinstance(k, str) and k.startswith("net.")}  # fmt: skip
    if not weights:
        raise RtcnnInputError(path, "holds no network weights ('net.*' in its state_dict)")
    _load_weights(net, weights, path, spec["_target_"])
    threshold = _threshold(state["hyper_parameters"].get("threshold"), path)
    return LoadedModel(net.eval(), threshold, spec, os.fspath(path))


# --------------------------------------------------------------------------- bundles
def _from_bundle(directory: Path, expect, source: str | None = None) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card_path, weights_path = directory / BUNDLE_CARD, directory / BUNDLE_WEIGHTS
    for p in (card_path, weights_path):
        if not p.is_file():
            raise RtcnnInputError(directory, f"not a model bundle (no {p.name} in it)")
    try:
        card = json.loads(card_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RtcnnInputError(card_path, f"not a readable model card ({type(err).__name__})") from None
    if not isinstance(card, dict):
        raise RtcnnInputError(card_path, "model card is not a JSON object")
    net, spec = build_network(card.get("net"), card_path, expect)
    try:
        weights = load_file(weights_path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise RtcnnInputError(weights_path, f"not a readable safetensors file "
                              f"({type(err).__name__})") from None
    _load_weights(net, weights, weights_path, spec["_target_"])
    threshold = _threshold(card.get("threshold"), card_path)
    return LoadedModel(net.eval(), threshold, spec, source or os.fspath(directory), card)


def shipped_models() -> list[str]:
    """Names of the models shipped in the package (bundles under :data:`SHIPPED_DIR`)."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / BUNDLE_CARD).is_file())


def resolve_source(source: str | os.PathLike) -> tuple[str, Path]:
    """What ``source`` names: ``("checkpoint", file)``, ``("bundle", dir)`` or
    ``("shipped", dir)``.

    An existing path wins; otherwise a plain name is looked up among
    :func:`shipped_models`.
    """
    path = Path(source)
    if path.is_file():
        return "checkpoint", path
    if path.is_dir():
        return "bundle", path
    name = os.fspath(source)
    if _NAME.match(name) and name in shipped_models():
        return "shipped", SHIPPED_DIR / name
    shipped = shipped_models()
    hint = f"; shipped models: {', '.join(shipped)}" if shipped else ""
    raise RtcnnInputError(path, f"no such checkpoint file, bundle directory or shipped model{hint}")


def load_model(source: str | os.PathLike, expect: type[nn.Module] | None = None) -> LoadedModel:
    """Load a network from a checkpoint file, a bundle directory or a shipped model name.

    Parameters
    ----------
    source : str or path-like
        A Lightning ``.ckpt`` file, a bundle directory (``model.safetensors`` +
        ``card.json``) or the name of a shipped model.
    expect : type, optional
        The network must be of this class (e.g.
        :class:`rtcnn.models.detector.DenseDetector`).

    Returns
    -------
    LoadedModel

    Raises
    ------
    RtcnnInputError
        Anything wrong with the file(s); see the module docstring.
    """
    kind, path = resolve_source(source)
    if kind == "checkpoint":
        return _from_checkpoint(path, expect)
    return _from_bundle(path, expect, f"shipped:{path.name}" if kind == "shipped" else None)


def export_bundle(ckpt: str | os.PathLike, outdir: str | os.PathLike,
                  card: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the network of a checkpoint (or bundle) as a bundle: weights + model card.

    Parameters
    ----------
    ckpt : path-like
        A training checkpoint (or an existing bundle).
    outdir : path-like
        The bundle directory to create (``model.safetensors``, ``card.json``).
    card : mapping, optional
        Extra card entries (training recipe, data, metrics...); ``net``, ``threshold``,
        ``format`` and ``rtcnn_version`` are filled in from the checkpoint unless given.
    overwrite : bool
        Replace the files of an existing bundle.

    Returns
    -------
    pathlib.Path
        ``outdir``.
    """
    from safetensors.torch import save_file

    model = load_model(ckpt)
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise RtcnnInputError(outdir, "is a file; a bundle is a directory")
    for name in (BUNDLE_WEIGHTS, BUNDLE_CARD):
        if (outdir / name).exists() and not overwrite:
            raise RtcnnInputError(outdir / name, "already exists; pass --overwrite to replace it")
    full = {"format": BUNDLE_FORMAT, "net": model.spec, "threshold": model.threshold,
            "rtcnn_version": __version__, "source": os.fspath(ckpt), **dict(card or {})}
    try:
        text = json.dumps(full, indent=2, sort_keys=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RtcnnInputError(None, f"model card is not plain JSON ({err})") from None
    outdir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.net.state_dict().items()}
    # each file atomically (io.pairdir); the card last: it marks a complete bundle
    atomic_write(outdir / BUNDLE_WEIGHTS, overwrite,
                 lambda tmp: save_file(state, tmp, metadata={"format": BUNDLE_FORMAT}))
    atomic_write(outdir / BUNDLE_CARD, overwrite, lambda tmp: Path(tmp).write_text(text + "\n"))
    return outdir
