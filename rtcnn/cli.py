"""Command-line pieces shared by the catalog commands (:mod:`rtcnn.detect`, :mod:`rtcnn.baseline`).

Both take ``REF.fits NEW.fits -o CATALOG`` or ``DIR_OR_GLOB -o OUTDIR``, write
``OUTDIR/<pair name>.ecsv`` (and ``.reg`` with ``--regions``) per pair, refuse before any
work is done an output that exists (without ``--overwrite``), collides with another output
or is an input, skip an unusable pair of a directory and name it at the end (``--strict``
stops at the first), and fail only when no pair was usable.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import (
    check_output,
    check_output_dir,
    find_pairs,
    make_output_dir,
    output_name,
)

log = logging.getLogger(__name__)


class PairJob(NamedTuple):
    """One pair to process and where its outputs go."""

    name: str  # pair name (directory name, or the new image's stem)
    ref: Path
    new: Path
    catalog: Path  # .ecsv
    regions: Path | None  # DS9 .reg, or None
    outdir: Path | None = None  # directory of pairs: the output directory (made later)


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
    """The pairs of a command line and their output paths; creates nothing.

    Parameters
    ----------
    inputs : sequence of str
        ``[REF, NEW]`` (one pair) or ``[DIR_OR_GLOB]`` (:func:`rtcnn.io.find_pairs`).
    output : str
        The catalog (one pair) or the output directory (several pairs; it is created by
        :func:`make_output_dirs` once the command is ready to write).
    regions : str or None
        None: no region files; ``""``: next to each catalog with ``.reg``; a path: that
        file (one pair only; with several pairs ``<name>.reg`` in the output directory).

    Returns
    -------
    list of PairJob

    Raises
    ------
    RtcnnInputError
        Bad inputs, an output directory that cannot be made, or two pairs whose names
        give the same output file (:func:`rtcnn.io.pairdir.output_name`).
    """
    if len(inputs) == 2:
        ref, new = (Path(p) for p in inputs)
        out = Path(output)
        reg = None if regions is None else (Path(regions) if regions else out.with_suffix(".reg"))
        return [PairJob(new.parent.name or new.stem, ref, new, out, reg)]
    if len(inputs) != 1:
        raise RtcnnInputError(None, "give REF NEW, or one directory / glob of pairs")
    pairs = find_pairs(inputs[0])
    outdir = check_output_dir(output)
    jobs, seen = [], {}
    for pf in pairs:
        stem = output_name(pf.name)
        catalog = outdir / f"{stem}.ecsv"
        if stem in seen:
            raise RtcnnInputError(catalog, f"pairs {seen[stem]} and {pf.name} would write the "
                                  "same output; rename one of their directories")
        seen[stem] = pf.name
        reg = outdir / f"{stem}.reg" if regions is not None else None
        jobs.append(PairJob(pf.name, pf.ref, pf.new, catalog, reg, outdir))
    return jobs


def check_outputs(jobs: Sequence[PairJob], overwrite: bool, make_dirs: bool = True) -> None:
    """Refuse, before any work, every output that cannot or must not be written.

    Refused: two outputs with the same path (e.g. ``-o x.reg --regions``), an output
    that is one of the inputs (any pair's ``ref``/``new``), an existing output without
    ``overwrite``, a directory or special file, a folder that is missing or cannot be
    written (:func:`rtcnn.io.pairdir.check_output`). Then, with ``make_dirs``, the
    output directories are created (:func:`make_output_dirs`).
    """
    inputs = [p for job in jobs for p in (job.ref, job.new) if p is not None]
    owner: dict[str, str] = {}
    for job in jobs:
        for kind, path in (("catalog", job.catalog), ("region file", job.regions)):
            if path is None:
                continue
            key = os.path.abspath(path)
            if key in owner:
                raise RtcnnInputError(path, f"is both the {owner[key]} and the {kind}; give "
                                      "them different names")
            owner[key] = kind if len(jobs) == 1 else f"{kind} of {job.name}"
    probed: set[Path] = set()
    for job in jobs:
        for path in (job.catalog, job.regions):
            if path is None:
                continue
            if path.parent.exists() or job.outdir is None:
                check_output(path, overwrite, inputs, probe=path.parent not in probed)
                probed.add(path.parent)
            # else: the output directory of pairs, still to be made (pair_jobs checked it)
    if make_dirs:
        make_output_dirs(jobs)


def make_output_dirs(jobs: Sequence[PairJob]) -> None:
    """Create the folders of the outputs (after :func:`check_outputs`)."""
    for folder in sorted({p.parent for job in jobs for p in (job.catalog, job.regions)
                          if p is not None}):
        make_output_dir(folder)


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
