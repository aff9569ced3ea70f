"""Command-line pieces shared by the catalog commands (:mod:`rtcnn.detect`, :mod:`rtcnn.baseline`).

Both take ``REF.fits NEW.fits -o CATALOG`` or ``DIR_OR_GLOB -o OUTDIR``, write
``OUTDIR/<pair name>.ecsv`` (and ``.reg`` with ``--regions``) per pair, refuse to replace an
existing output before any work is done, skip an unusable pair of a directory and name it
at the end (``--strict`` stops at the first), and fail only when no pair was usable.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from rtcnn.errors import RtcnnInputError
from rtcnn.io import find_pairs

log = logging.getLogger(__name__)


class PairJob(NamedTuple):
    """One pair to process and where its outputs go."""

    name: str  # pair name (directory name, or the new image's stem)
    ref: Path
    new: Path
    catalog: Path  # .ecsv
    regions: Path | None  # DS9 .reg, or None


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The inputs and output options every catalog command takes."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="REF.fits NEW.fits, or one directory / glob of pair directories "
                        "(ref.fits + new.fits each)")  # fmt: skip
    parser.add_argument("-o", "--output", required=True,
                        help="catalog file (one pair) or output directory (several pairs: "
                        "<pair name>.ecsv each)")  # fmt: skip
    parser.add_argument("--regions", nargs="?", const="", default=None, metavar="REG",
                        help="also write a DS9 region file (one pair: REG, default next to "
                        "the catalog with .reg; several pairs: <name>.reg in the output "
                        "directory)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first unusable pair of a directory (default: skip "
                        "it and name it at the end)")  # fmt: skip


def pair_jobs(inputs: Sequence[str], output: str, regions: str | None = None) -> list[PairJob]:
    """The pairs of a command line and their output paths.

    Parameters
    ----------
    inputs : sequence of str
        ``[REF, NEW]`` (one pair) or ``[DIR_OR_GLOB]`` (:func:`rtcnn.io.find_pairs`).
    output : str
        The catalog (one pair) or the output directory (created if missing).
    regions : str or None
        None: no region files; ``""``: next to each catalog with ``.reg``; a path: that
        file (one pair only; with several pairs ``<name>.reg`` in the output directory).

    Returns
    -------
    list of PairJob
    """
    if len(inputs) == 2:
        ref, new = (Path(p) for p in inputs)
        out = Path(output)
        reg = None if regions is None else (Path(regions) if regions else out.with_suffix(".reg"))
        return [PairJob(new.parent.name or new.stem, ref, new, out, reg)]
    if len(inputs) != 1:
        raise RtcnnInputError(None, "give REF NEW, or one directory / glob of pairs")
    pairs = find_pairs(inputs[0])
    outdir = Path(output)
    if outdir.exists() and not outdir.is_dir():
        raise RtcnnInputError(outdir, "is a file; several pairs need an output directory")
    outdir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for pf in pairs:
        safe = pf.name.replace("/", "_")
        reg = outdir / f"{safe}.reg" if regions is not None else None
        jobs.append(PairJob(pf.name, pf.ref, pf.new, outdir / f"{safe}.ecsv", reg))
    return jobs


def check_outputs(jobs: Sequence[PairJob], overwrite: bool) -> None:
    """Refuse before any work when an output exists (unless ``overwrite``)."""
    if overwrite:
        return
    for job in jobs:
        for path in (job.catalog, job.regions):
            if path is not None and path.exists():
                raise RtcnnInputError(path, "already exists; pass --overwrite to replace it")


def report_skipped(skipped: Sequence[tuple[str, RtcnnInputError]], n_jobs: int,
                   n_written: int) -> None:
    """Name the skipped pairs at the end; an error when none of ``n_jobs`` was usable."""
    if not skipped:
        return
    log.warning("rtcnn: %d of %d pairs skipped as unusable (--strict makes this an error):",
                len(skipped), n_jobs)
    for name, err in skipped:
        log.warning("  %s: %s", name, err)
    if not n_written:
        first = skipped[0][1]
        raise RtcnnInputError(first.path, f"{first.problem} (all {n_jobs} pairs are unusable)")
