"""``python -m rtcnn.detect REF.fits NEW.fits -o candidates.ecsv``: pair → catalog.

Runs the dense detector (``model=dense``, :mod:`rtcnn.inference`) on a reference/new
pair: the shipped one (``python -m rtcnn.models`` prints its card) unless
``--model NAME|PATH`` names another shipped model, a bundle directory
(``python -m rtcnn.export``) or a training checkpoint (``--ckpt`` is the same option);
it writes the candidate catalog (:mod:`rtcnn.catalog`: ``x``, ``y`` 0-based px,
``ra``, ``dec`` deg from the new image's WCS, ``dmag`` mag, ``brightened``, ``score``,
with the inputs, the model and the threshold in the metadata), and on request a DS9
region file. ``--cutouts [N]`` and ``--alerts DIR`` also write cutouts and LSST Avro alert
packets (:mod:`rtcnn.alerts`; an existing directory needs ``--overwrite``).

Also ``python -m rtcnn.detect DIR_OR_GLOB -o OUTDIR``: every pair found
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
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rtcnn.alerts import DEFAULT_CUTOUT_SIZE, check_alert_dir
from rtcnn.checkpoint import DEFAULT_DETECTOR
from rtcnn.cli import (
    add_pair_arguments,
    check_outputs,
    make_output_dirs,
    pair_jobs,
    report_skipped,
)
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.inference import MODES, resolve_device
from rtcnn.measure import DMAG_SOURCES
from rtcnn.pipeline import (
    PRECISIONS,
    PairOptions,
    PairOutputs,
    load_model,
    load_pair,
    process_pair,
)

log = logging.getLogger(__name__)



def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="python -m rtcnn.detect",
        description="Detect transients in a reference/new image pair (or a directory / glob "
        "of pairs) with the dense detector and write candidate catalogs (ECSV).",
    )
    add_pair_arguments(p)
    p.add_argument("--model", "--ckpt", dest="ckpt", default=DEFAULT_DETECTOR, metavar="NAME|PATH",
                   help=f"a shipped detector (default: {DEFAULT_DETECTOR}; python -m rtcnn.models "
                   "lists them), a bundle directory or a training checkpoint (.ckpt)")
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
    p.add_argument("--cutouts", type=int, nargs="?", const=DEFAULT_CUTOUT_SIZE, default=None,
                   metavar="N", help="write N px ref/new/diff cutouts with WCS and variance "
                   "per candidate (default N = 63) to <catalog>_cutouts/ (rtcnn.alerts)")
    p.add_argument("--alerts", default=None, metavar="DIR",
                   help="write one LSST Avro alert packet per candidate to DIR (several "
                   "pairs: DIR/<pair name>/)")  # fmt: skip
    return p


def pair_outputs(args: argparse.Namespace, job) -> PairOutputs:
    """Where a job's catalog, regions, alerts and cutouts go."""
    alerts = None
    if args.alerts is not None:
        alerts = Path(args.alerts) if len(args.inputs) == 2 else Path(args.alerts) / job.name
    cutouts = (job.catalog.with_name(job.catalog.stem + "_cutouts")
               if args.cutouts is not None else None)  # fmt: skip
    return PairOutputs(job.catalog, job.regions, alerts=alerts, cutouts=cutouts,
                       cutout_size=args.cutouts or DEFAULT_CUTOUT_SIZE)


def _check_args(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise RtcnnInputError(None, f"--threads must be >= 1, got {args.threads}")
    if args.cutouts is not None and args.cutouts < 3:
        raise RtcnnInputError(None, f"--cutouts must be >= 3 px, got {args.cutouts}")


def pair_options(args: argparse.Namespace) -> PairOptions:
    """The per-pair options of a parsed command line (checked)."""
    options = PairOptions(threshold=args.threshold, mode=args.mode, batch_size=args.batch_size,
                          precision=args.precision, refine=not args.no_refine,
                          dmag=args.dmag, tta=args.tta, overwrite=args.overwrite)  # fmt: skip
    options.check()
    return options


def run(args: argparse.Namespace) -> list[Path]:
    """Process every pair of ``args``; returns the catalog paths written."""
    options = pair_options(args)
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    jobs = pair_jobs(args.inputs, args.output, args.regions)
    check_outputs(jobs, args.overwrite, make_dirs=False)
    for job in jobs:  # an existing --alerts / cutout directory is refused before any work
        out = pair_outputs(args, job)
        for d in (out.alerts, out.cutouts):
            if d is not None:
                check_alert_dir(d, args.overwrite)
    model = load_model(args.ckpt, device)
    make_output_dirs(jobs)  # only now: a bad checkpoint leaves no empty output tree
    dense = args.mode == "dense" or (args.mode == "auto" and model.device.type == "cuda")
    written, skipped = [], []
    show = not args.no_progress
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load_pair, jobs[0].ref, jobs[0].new)
        outer = tqdm(jobs, desc="pairs", unit="pair", disable=not show or len(jobs) == 1)
        for i, job in enumerate(outer):
            loaded = pending
            if i + 1 < len(jobs):  # read the next pair while this one runs
                pending = pool.submit(load_pair, jobs[i + 1].ref, jobs[i + 1].new)
            try:
                with tqdm(desc=job.name, unit="tile" if dense else "stamp", disable=not show,
                          leave=len(jobs) == 1) as bar:
                    result = process_pair(job.ref, job.new, model, options,
                                          pair_outputs(args, job), name=job.name,
                                          images=loaded.result(), progress=bar)  # fmt: skip
            except RtcnnInputError as err:  # one unusable pair of many: skip it, name it
                outputs = [str(p) for p in (job.catalog, job.regions) if p is not None]
                if args.strict or len(jobs) == 1 or err.path in outputs:  # outputs: stop
                    raise
                log.warning("%s: skipped: %s", job.name, err)
                skipped.append((job.name, err))
                continue
            written.append(result.catalog)
    report_skipped(skipped, len(jobs), len(written))
    return written


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
