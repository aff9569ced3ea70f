"""``python -m rtcnn.detect REF.fits NEW.fits --ckpt CKPT -o candidates.ecsv``: pair → catalog.

Runs the dense detector (``model=dense``, :mod:`rtcnn.inference`) on a reference/new
pair and writes the candidate catalog (:mod:`rtcnn.catalog`: ``x``, ``y`` 0-based px,
``ra``, ``dec`` deg from the new image's WCS, ``dmag`` mag, ``brightened``, ``score``,
with the inputs, the model and the threshold in the metadata), and on request a DS9
region file.

Also ``python -m rtcnn.detect DIR_OR_GLOB --ckpt CKPT -o OUTDIR``: every pair found
(:func:`rtcnn.io.find_pairs`) gives ``OUTDIR/<pair name>.ecsv`` (and ``.reg`` with
``--regions``); the next pair is read while the current one is processed.

Options: ``--threshold`` (default: the checkpoint's, else 0.5), ``--mode``
(auto | stamps | dense; auto = stamps on CPU, dense on GPU), ``--batch-size``,
``--device`` (auto | cpu | cuda[:N]), ``--precision`` (auto | bf16 | fp32; auto = bf16
where the device has native bfloat16), ``--no-refine`` (no PSF fit of the
positions), ``--dmag`` (photometry | network), ``--threads``, ``--overwrite``,
``--no-progress``. Existing outputs are never replaced without ``--overwrite``; a user
mistake prints ``rtcnn: error: <file>: <problem>`` and exits 2. In a directory of pairs an
unusable pair (unreadable image, shape mismatch, no WCS...) is skipped and named at the
end (exit 0 if any pair was processed); ``--strict`` makes it an error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rtcnn.catalog import write_catalog, write_ds9_regions
from rtcnn.cli import add_pair_arguments, check_outputs, pair_jobs, report_skipped
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.inference import (
    DMAG_SOURCES,
    MODES,
    detect_images,
    load_detector,
    native_bf16,
    resolve_device,
)
from rtcnn.io import read_pair

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # network score, when the checkpoint names none
PRECISIONS = ("auto", "bf16", "fp32")



def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="python -m rtcnn.detect",
        description="Detect transients in a reference/new image pair (or a directory / glob "
        "of pairs) with the dense detector and write candidate catalogs (ECSV).",
    )
    add_pair_arguments(p)
    p.add_argument("--ckpt", required=True, help="detector checkpoint (.ckpt)")
    p.add_argument("--threshold", type=float, default=None,
                   help="minimum score (default: the checkpoint's, else 0.5)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="stamps around difference-image candidates (CPU default) or dense "
                   "tiles over the whole image (GPU default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="stamps (or dense tiles) per forward pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="network arithmetic: bf16 autocast, fp32, or auto = bf16 where the "
                   "device has native bfloat16 (AVX512-BF16/AMX CPUs, Ampere+ GPUs)")
    p.add_argument("--dmag", choices=DMAG_SOURCES, default="photometry",
                   help="catalog dmag from aperture photometry at the detections (default) "
                   "or from the network's dmag head")
    p.add_argument("--tta", action="store_true",
                   help="stamps mode: average the network over the 8 D4 views of each stamp")
    p.add_argument("--no-refine", action="store_true",
                   help="keep the network's positions (no PSF fit to the difference image)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise RtcnnInputError(None, f"--threshold must lie in [0, 1], got {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        raise RtcnnInputError(None, f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None and args.threads < 1:
        raise RtcnnInputError(None, f"--threads must be >= 1, got {args.threads}")


def _load(ref: Path, new: Path):
    """Read a pair and pull the pixels into memory (runs in the prefetch thread)."""
    ref_img, new_img = read_pair(ref, new)
    for img in (ref_img, new_img):
        img.data = img.filled(float("nan"))  # native float32 in RAM; NaN stays masked
    return ref_img, new_img


def run(args: argparse.Namespace) -> list[Path]:
    """Process every pair of ``args``; returns the catalog paths written."""
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    jobs = pair_jobs(args.inputs, args.output, args.regions)
    check_outputs(jobs, args.overwrite)
    net = load_detector(args.ckpt, device)
    threshold = args.threshold
    if threshold is None:
        threshold = DEFAULT_THRESHOLD if net.saved_threshold is None else net.saved_threshold
    bf16 = args.precision == "bf16" or (args.precision == "auto" and native_bf16(device))
    meta = {"model": os.fspath(args.ckpt), "model_name": "dense", "device": str(device),
            "precision": "bf16" if bf16 else "fp32"}  # fmt: skip
    written, skipped = [], []
    show = not args.no_progress
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(_load, jobs[0][1], jobs[0][2])
        outer = tqdm(jobs, desc="pairs", unit="pair", disable=not show or len(jobs) == 1)
        for i, (name, ref, new, cat_path, reg_path) in enumerate(outer):
            loaded = pending
            if i + 1 < len(jobs):  # read the next pair while this one runs
                pending = pool.submit(_load, jobs[i + 1][1], jobs[i + 1][2])
            try:
                ref_img, new_img = loaded.result()
                _report_masked(name, ref_img, new_img)
                dense = args.mode == "dense" or (args.mode == "auto" and device.type == "cuda")
                with tqdm(desc=name, unit="tile" if dense else "stamp", disable=not show,
                          leave=len(jobs) == 1) as bar:
                    table = detect_images(net, ref_img, new_img, threshold, mode=args.mode,
                                          batch_size=args.batch_size, device=device,
                                          bf16=bf16, refine=not args.no_refine,
                                          dmag=args.dmag, tta=args.tta, progress=bar,
                                          meta=meta)  # fmt: skip
            except RtcnnInputError as err:  # one unusable pair of many: skip it, name it
                if args.strict or len(jobs) == 1:
                    raise
                log.warning("%s: skipped: %s", name, err)
                skipped.append((name, err))
                continue
            table.meta["ref"], table.meta["new"] = os.fspath(ref), os.fspath(new)
            write_catalog(table, cat_path, overwrite=args.overwrite)
            if reg_path is not None:
                write_ds9_regions(table, reg_path, overwrite=args.overwrite)
            log.info("%s: %d candidates -> %s (%.2f s)", name, len(table), cat_path,
                     table.meta["seconds"])
            written.append(cat_path)
    report_skipped(skipped, len(jobs), len(written))
    return written


def _report_masked(name: str, ref, new) -> None:
    """Log the fraction of NaN/inf (masked) pixels of a pair, when there are any."""
    fractions = [img.masked_fraction for img in (ref, new)]
    if any(fractions):
        log.info("%s: masked NaN/inf pixels: ref %.3g%%, new %.3g%% (excluded from the "
                 "candidates and set to 0 for the network)", name, *(100 * f for f in fractions))


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.detect``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    written = run(args)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
