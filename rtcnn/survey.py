"""``python -m rtcnn.survey PAIRS -o OUTDIR [--model NAME|PATH]``: detection over many pairs on Dask.

Every pair is one Dask task (:mod:`distributed`) that runs :func:`rtcnn.pipeline.process_pair`
(read, align, detect, measure, write the catalog) on a worker; the detector is loaded once
per worker by a worker plugin. The engine is :mod:`rtcnn.distribute`; this module is the
command line.

``PAIRS``
    A directory or glob of pair directories (:func:`rtcnn.io.find_pairs`), or a pair list:
    an ECSV/CSV table with ``ref`` and ``new`` columns (optional ``name``; relative paths
    are relative to the list's folder), e.g. the one
    :func:`rtcnn.io.openuniverse.write_pair_list` writes.
``--cluster``
    ``local`` (default: a :class:`distributed.LocalCluster`, ``conf/cluster/local.yaml``),
    ``slurm`` (``dask-jobqueue``, ``conf/cluster/slurm.yaml``), any other
    ``conf/cluster/<name>.yaml`` or path to such a file, or the address of a running
    scheduler (``tcp://host:8786``, or a scheduler JSON file).
``--device cuda``
    One worker per GPU: workers carry the Dask resource ``GPU=1`` and every pair task asks
    for half of it (two tasks per worker: one reads its pair while the other detects;
    detections never overlap on a GPU).

``OUTDIR`` holds::

    catalogs/<pair>.ecsv     one catalog per pair (and <pair>.reg with --regions)
    alerts/<pair>/           LSST Avro alert packets (--alerts), cutouts/<pair>/ (--cutouts)
    manifest.parquet         one row per pair: status, seconds, candidates, checksum, error
    survey.parquet           every candidate of the done pairs, with pair, sca, band, mjd
    summary.json             pairs done / failed / skipped, candidates, s per pair

Resumable and lossless: the manifest is rewritten atomically as results arrive (at most
once a second) and at the end, also on Ctrl-C; a rerun of the same command skips the pairs
whose outputs are intact (checksum) and redoes the others. Outputs are written atomically,
so a worker killed mid-pair leaves no partial file, and Dask runs its task again elsewhere.
A pair that fails is retried ``--retries`` times, then recorded with its one-line error and
named at the end; it never stops the others (exit status 1 when any pair failed, 130 on
Ctrl-C). A rerun with other detection settings into the same OUTDIR is refused unless
``--overwrite`` (which redoes every pair).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from rtcnn.alerts import DEFAULT_CUTOUT_SIZE
from rtcnn.checkpoint import DEFAULT_DETECTOR, resolve_source
from rtcnn.distribute import DEFAULT_RETRIES, open_cluster, run_survey, survey_pairs
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.pipeline import DMAG_SOURCES, MODES, PRECISIONS, PairOptions

__all__ = ["build_parser", "main"]


# --------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(
        prog="python -m rtcnn.survey",
        description="Run the detector over many pairs on a Dask cluster (local, SLURM or a "
        "running scheduler): one task per pair, resumable, one merged Parquet catalog.",
    )
    p.add_argument("pairs", metavar="PAIRS",
                   help="directory or glob of pair directories, or a pair list (ECSV/CSV "
                   "with ref and new columns)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory")
    p.add_argument("--model", "--ckpt", dest="ckpt", default=DEFAULT_DETECTOR, metavar="NAME|PATH",
                   help=f"a shipped detector (default: {DEFAULT_DETECTOR}), a bundle directory or "
                   "a training checkpoint (.ckpt)")
    p.add_argument("--cluster", default="local",
                   help="local (default), slurm, a conf/cluster/<name>.yaml name or YAML "
                   "path, or a scheduler address / scheduler JSON file")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="Dask workers (local: one per GPU with --device cuda, else one per 4 "
                   "cores; slurm: jobs)")  # fmt: skip
    p.add_argument("--device", default="auto",
                   help="auto | cpu | cuda | cuda:N (auto: cuda when this machine has a GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker")
    p.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                   help=f"extra attempts of a failed pair (default {DEFAULT_RETRIES})")
    p.add_argument("--threshold", type=float, default=None,
                   help="minimum score (default: the checkpoint's, else 0.5)")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="stamps (CPU default) or dense tiles (GPU default)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="stamps (or dense tiles) per forward pass")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="bf16 | fp32 | auto")
    p.add_argument("--dmag", choices=DMAG_SOURCES, default="photometry",
                   help="catalog dmag from aperture photometry (default) or the network")
    p.add_argument("--tta", action="store_true", help="stamps mode: D4 test-time augmentation")
    p.add_argument("--no-refine", action="store_true", help="no PSF refit of the positions")
    p.add_argument("--regions", action="store_true", help="also write DS9 region files")
    p.add_argument("--alerts", action="store_true",
                   help="also write LSST Avro alert packets to OUTDIR/alerts/<pair>/")
    p.add_argument("--cutouts", type=int, nargs="?", const=DEFAULT_CUTOUT_SIZE, default=None,
                   metavar="N", help="also write N px ref/new/diff cutouts (default N = "
                   f"{DEFAULT_CUTOUT_SIZE}) to OUTDIR/cutouts/<pair>/")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="ignore the manifest of OUTDIR and redo every pair")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _device(name: str) -> str:
    from rtcnn.inference import resolve_device

    return str(resolve_device(name))  # checks that a requested GPU exists


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.survey``; 0 all done, 1 some failed, 130 Ctrl-C."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    options = PairOptions(threshold=args.threshold, mode=args.mode, batch_size=args.batch_size,
                          precision=args.precision, refine=not args.no_refine,
                          dmag=args.dmag, tta=args.tta)  # fmt: skip
    options.check()
    if args.cutouts is not None and args.cutouts < 1:
        raise RtcnnInputError(None, f"--cutouts must be >= 1, got {args.cutouts}")
    if args.retries < 0:
        raise RtcnnInputError(None, f"--retries must be >= 0, got {args.retries}")
    if args.threads is not None and args.threads < 1:
        raise RtcnnInputError(None, f"--threads must be >= 1, got {args.threads}")
    resolve_source(args.ckpt)  # a missing model is one line before any cluster starts
    pairs = survey_pairs(args.pairs)
    device = _device(args.device)
    client, cluster, threads = open_cluster(args.cluster, args.workers, device, args.threads)
    try:
        print(f"rtcnn.survey: {len(pairs)} pairs; Dask dashboard: {client.dashboard_link}",
              file=sys.stderr)
        summary = run_survey(pairs, args.output, client, args.ckpt, options,
                             regions=args.regions, alerts=args.alerts, cutouts=args.cutouts,
                             retries=args.retries,
                             overwrite=args.overwrite, threads=threads, device=device,
                             progress=not args.no_progress)  # fmt: skip
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    for line in summary.lines():
        print(line)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
