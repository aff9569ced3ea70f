"""``python -m rtcnn.sim OUTDIR --pairs N --size S --mode inject|epochs|dither|survey --seed K``.

Writes ``OUTDIR/pair_XXXX/`` (see :mod:`rtcnn.sim.dataset`). A bad value or an
existing pair (without ``--overwrite``) prints one line ``rtcnn: error: ...``
and exits with status 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
import time

from rtcnn.errors import CommandParser, cli_main


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (values are checked by :func:`simulate_dataset`)."""
    p = CommandParser(prog="python -m rtcnn.sim", description=__doc__.splitlines()[0])
    p.add_argument("outdir", help="output directory (created if missing)")
    p.add_argument("--pairs", type=int, default=10, help="number of pairs (default 10)")
    p.add_argument("--size", type=int, default=1024, help="image side in px, 64..4088 "
                   "(default 1024)")
    p.add_argument("--mode", default="inject", help="inject (new = ref + transients, the "
                   "paper's setting), epochs (two independent exposures), dither (two "
                   "exposures at different rolls and pointings) or survey (a north-up coadd "
                   "of --epochs exposures at random rolls against a new exposure); default "
                   "inject")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--band", default="H158", help="Roman filter (default H158)")
    p.add_argument("--bands", default=None,
                   help="draw the band per pair from these: 'all' (every Roman imaging "
                   "filter) or a comma list in either spelling (Y106,J129 or F106,F129); "
                   "overrides --band")
    p.add_argument("--epochs", type=int, default=None,
                   help="survey mode: exposures in the reference coadd (default 6)")
    p.add_argument("--dither", type=float, default=None,
                   help="survey/dither modes: max dither of an exposure, px (default 20)")
    p.add_argument("--sca", type=int, default=None, help="SCA 1..18 (default: random per pair)")
    p.add_argument("--overwrite", action="store_true", help="replace existing pairs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _optional(args: argparse.Namespace) -> dict:
    """The optional scene parameters given on the command line (rtcnn.sim.scene.OPTIONAL)."""
    given = {"bands": args.bands, "n_epochs": args.epochs, "dither_px": args.dither}
    return {k: v for k, v in given.items() if v is not None}


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0 (user mistakes exit 2 via :func:`cli_main`)."""
    args = build_parser().parse_args(argv)
    from rtcnn.sim.dataset import simulate_dataset

    t0 = time.perf_counter()
    dirs = simulate_dataset(
        args.outdir, args.pairs, args.size, args.mode, args.seed, overwrite=args.overwrite,
        progress=not args.no_progress, band=args.band, sca=args.sca, **_optional(args),
    )
    dt = time.perf_counter() - t0
    print(f"wrote {len(dirs)} {args.mode} pair(s) of {args.size}x{args.size} px to "
          f"{args.outdir} in {dt:.1f} s ({dt / len(dirs):.2f} s/pair)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
