"""One pair from disk to its outputs: the per-pair step of :mod:`rtcnn.detect` and :mod:`rtcnn.survey`.

:func:`load_model` loads the detector once (per process, or per Dask worker);
:func:`process_pair` then runs one pair through the detection path — read
(:mod:`rtcnn.io`), detect and measure (:func:`rtcnn.inference.detect_images`), write the
catalog and, when asked, the DS9 regions (:mod:`rtcnn.catalog`, atomic writes) — and
returns a :class:`PairResult` (outputs, number of candidates, seconds, checksum of the
outputs). It is a small orchestrator: a further per-pair output (alerts, cutouts) is one
more field of :class:`PairOutputs` and one more step of :func:`write_outputs`.

No command-line parsing here; the commands (:mod:`rtcnn.detect`, :mod:`rtcnn.survey`)
build a :class:`PairOptions` and :class:`PairOutputs` from their arguments.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from rtcnn.catalog import write_catalog, write_ds9_regions
from rtcnn.errors import RtcnnInputError
from rtcnn.inference import (
    DMAG_SOURCES,
    MODES,
    detect_images,
    load_detector,
    native_bf16,
    resolve_device,
)
from rtcnn.io import read_pair

__all__ = [
    "DEFAULT_THRESHOLD",
    "PRECISIONS",
    "Model",
    "PairOptions",
    "PairOutputs",
    "PairResult",
    "files_checksum",
    "load_model",
    "load_pair",
    "process_pair",
    "write_outputs",
]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # network score, when the checkpoint names none
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class PairOptions:
    """How a pair is detected and written (the same for every pair of a run).

    Attributes
    ----------
    threshold : float or None
        Minimum network score; None = the checkpoint's, else :data:`DEFAULT_THRESHOLD`.
    mode : {"auto", "stamps", "dense"}
        See :func:`rtcnn.inference.detect_images`.
    batch_size : int or None
        Stamps or dense tiles per forward pass (None: the inference default).
    precision : {"auto", "bf16", "fp32"}
        Network arithmetic; auto = bf16 where the device has native bfloat16.
    refine : bool
        PSF-fit refinement of the positions.
    dmag : {"photometry", "network"}
        Source of the catalog's dmag.
    tta : bool
        Stamps mode: D4 test-time augmentation.
    overwrite : bool
        Replace existing outputs (otherwise an existing output is an error).
    """

    threshold: float | None = None
    mode: str = "auto"
    batch_size: int | None = None
    precision: str = "auto"
    refine: bool = True
    dmag: str = "photometry"
    tta: bool = False
    overwrite: bool = False

    def check(self) -> None:
        """Raise :class:`RtcnnInputError` (one line) for an option out of range."""
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise RtcnnInputError(None, f"--threshold must lie in [0, 1], got {self.threshold}")
        if self.batch_size is not None and self.batch_size < 1:
            raise RtcnnInputError(None, f"--batch-size must be >= 1, got {self.batch_size}")
        if self.mode not in MODES:
            raise RtcnnInputError(None, f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise RtcnnInputError(None, f"--precision must be one of {PRECISIONS}, "
                                  f"got {self.precision!r}")  # fmt: skip
        if self.dmag not in DMAG_SOURCES:
            raise RtcnnInputError(None, f"--dmag must be one of {DMAG_SOURCES}, got {self.dmag!r}")


@dataclass(frozen=True)
class PairOutputs:
    """Where one pair's outputs go: the catalog (ECSV) and, optionally, DS9 regions."""

    catalog: Path
    regions: Path | None = None

    def paths(self) -> list[Path]:
        """The output files, catalog first (the order of :attr:`PairResult.checksum`)."""
        return [p for p in (self.catalog, self.regions) if p is not None]


@dataclass(frozen=True)
class PairResult:
    """What :func:`process_pair` did for one pair.

    Attributes
    ----------
    catalog : Path
        The catalog written.
    files : tuple of Path
        Every file written, catalog first.
    n_candidates : int
        Rows of the catalog.
    seconds : float
        Wall time of the pair: read, detect, write (s).
    checksum : str
        SHA-256 (hex) over the written files' bytes, in ``files`` order
        (:func:`files_checksum`).
    """

    catalog: Path
    files: tuple[Path, ...]
    n_candidates: int
    seconds: float
    checksum: str


@dataclass
class Model:
    """A detector ready on its device, loaded once and used for many pairs.

    Attributes
    ----------
    net : rtcnn.models.detector.DenseDetector
        In eval mode on ``device`` (:func:`rtcnn.inference.load_detector`).
    device : torch.device
    ckpt : str
        The checkpoint it came from (catalog metadata).
    saved_threshold : float or None
        The score threshold stored in the checkpoint.
    """

    net: torch.nn.Module
    device: torch.device
    ckpt: str
    saved_threshold: float | None = None

    def threshold(self, options: PairOptions) -> float:
        """The threshold ``options`` asks for, else the checkpoint's, else the default."""
        if options.threshold is not None:
            return float(options.threshold)
        return DEFAULT_THRESHOLD if self.saved_threshold is None else self.saved_threshold

    def bf16(self, options: PairOptions) -> bool:
        """Whether ``options.precision`` means bfloat16 autocast on this device."""
        return options.precision == "bf16" or (
            options.precision == "auto" and native_bf16(self.device)
        )


def load_model(ckpt: str | os.PathLike, device: str | torch.device = "auto") -> Model:
    """Load a detector checkpoint (safely, :func:`rtcnn.inference.load_detector`) on ``device``.

    Parameters
    ----------
    ckpt : path-like
        A :class:`rtcnn.tasks.detection.DetectionTask` checkpoint.
    device : str or torch.device
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Raises
    ------
    RtcnnInputError
        Unreadable or wrong checkpoint, unknown or unavailable device.
    """
    dev = device if isinstance(device, torch.device) else resolve_device(str(device))
    net = load_detector(ckpt, dev)
    return Model(net=net, device=dev, ckpt=os.fspath(ckpt),
                 saved_threshold=getattr(net, "saved_threshold", None))  # fmt: skip


def load_pair(ref: str | os.PathLike, new: str | os.PathLike):
    """Read a pair and pull the pixels into memory (float32, NaN where masked).

    Returns
    -------
    tuple of rtcnn.io.Image
        ``(ref, new)``.
    """
    ref_img, new_img = read_pair(ref, new)
    for img in (ref_img, new_img):
        img.data = img.filled(float("nan"))  # native float32 in RAM; NaN stays masked
    return ref_img, new_img


def files_checksum(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 (hex) over the bytes of ``paths``, in order; each file is framed by its size."""
    h = hashlib.sha256()
    for path in paths:
        data = Path(path).read_bytes()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def write_outputs(table, outputs: PairOutputs, overwrite: bool = False) -> tuple[Path, ...]:
    """Write a pair's catalog and its optional products, each atomically; returns the paths."""
    written = [write_catalog(table, outputs.catalog, overwrite=overwrite)]
    if outputs.regions is not None:
        written.append(write_ds9_regions(table, outputs.regions, overwrite=overwrite))
    return tuple(written)


def process_pair(
    ref: str | os.PathLike,
    new: str | os.PathLike,
    model: Model,
    options: PairOptions,
    outputs: PairOutputs,
    *,
    name: str | None = None,
    images=None,
    progress=None,
) -> PairResult:
    """Run one pair from its files to its written outputs.

    Parameters
    ----------
    ref, new : path-like
        Reference and new image (FITS, :func:`rtcnn.io.read_pair`).
    model : Model
        From :func:`load_model`.
    options : PairOptions
    outputs : PairOutputs
    name : str, optional
        The pair's name in log lines (default: the new image's directory name).
    images : tuple of rtcnn.io.Image, optional
        ``(ref, new)`` already read with :func:`load_pair` (a prefetching caller).
    progress : tqdm-like, optional
        Per-pair progress bar (see :func:`rtcnn.inference.detect_images`).

    Returns
    -------
    PairResult

    Raises
    ------
    RtcnnInputError
        An unusable pair (unreadable image, shape mismatch, no WCS...) or an output that
        exists without ``options.overwrite``.
    """
    t0 = time.perf_counter()
    name = name or Path(new).parent.name or Path(new).stem
    ref_img, new_img = images if images is not None else load_pair(ref, new)
    _report_masked(name, ref_img, new_img)
    bf16 = model.bf16(options)
    meta = {"model": model.ckpt, "model_name": "dense", "device": str(model.device),
            "precision": "bf16" if bf16 else "fp32"}  # fmt: skip
    table = detect_images(model.net, ref_img, new_img, model.threshold(options),
                          mode=options.mode, batch_size=options.batch_size,
                          device=model.device, bf16=bf16, refine=options.refine,
                          dmag=options.dmag, tta=options.tta, progress=progress,
                          meta=meta)  # fmt: skip
    table.meta["ref"], table.meta["new"] = os.fspath(ref), os.fspath(new)
    files = write_outputs(table, outputs, overwrite=options.overwrite)
    seconds = time.perf_counter() - t0
    log.info("%s: %d candidates -> %s (%.2f s)", name, len(table), outputs.catalog,
             table.meta["seconds"])
    return PairResult(catalog=files[0], files=files, n_candidates=len(table),
                      seconds=seconds, checksum=files_checksum(files))  # fmt: skip


def _report_masked(name: str, ref, new) -> None:
    """Log the fraction of NaN/inf (masked) pixels of a pair, when there are any."""
    fractions = [img.masked_fraction for img in (ref, new)]
    if any(fractions):
        log.info("%s: masked NaN/inf pixels: ref %.3g%%, new %.3g%% (excluded from the "
                 "candidates and set to 0 for the network)", name, *(100 * f for f in fractions))
