"""Score candidate catalogs against the truth: completeness, m50, false positives per SCA.

``python -m rtcnn.score CATALOG [CATALOG ...] --truth TRUTH.ecsv`` scores catalogs of one
pair (several catalogs = several methods compared);
``python -m rtcnn.score CATALOG TRUTH [CATALOG TRUTH ...]`` scores one method over the
given (catalog, truth) pairs; and
``python -m rtcnn.score NAME [NAME ...] --data DIR`` scores every pair directory found under
``DIR`` (or a glob): ``NAME`` is the catalog's file name inside each pair directory
(``baseline.ecsv``), or a template with ``{pair}`` for catalogs kept elsewhere
(``runs/det/{pair}.ecsv``); the truth is each pair's ``truth.ecsv``. Options:
``--radius 2`` (px), ``--budget 10`` (false positives per SCA), ``--label``,
``--threshold`` (an extra score cut), ``--plot completeness.png``, ``--json score.json``.

The definitions (matching, completeness, m50, false positives, budget) are those of
:mod:`rtcnn.scoring`, the library this command is a thin layer over.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

import numpy as np

from rtcnn.catalog import atomic_write
from rtcnn.io.pairdir import check_output
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.roman import SCA_AREA
from rtcnn.scoring import (  # noqa: F401 - the library's names, re-exported for callers
    FP_BUDGET,
    MAG_BIN,
    MATCH_RADIUS,
    ORACLE_SNR,
    SNR_MIN,
    PairScore,
    ScoreInputWarning,
    change_magnitude,
    evaluate,
    fit_m50,
    format_table,
    load_pairs,
    m50_binned,
    match,
    oracle_m50,
    pair_score,
    sweep,
    write_json,
)

NOISE_PEAK_FIELDS = 4  # 4088^2 white-noise fields averaged by --noise-peaks


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    p = CommandParser(prog="python -m rtcnn.score", description=__doc__.splitlines()[0])
    p.add_argument("catalogs", nargs="+", metavar="CATALOG",
                   help="candidate catalogs (one per method); with --data a file name inside "
                   "each pair directory or a path template with {pair}; without --truth "
                   "or --data, CATALOG TRUTH pairs of one method")  # fmt: skip
    p.add_argument("--truth", nargs="+", default=None, help="truth table of the one pair")
    p.add_argument("--data", default=None, help="directory / glob of pair directories")
    p.add_argument("--label", nargs="+", default=None, help="method names (default: file stems)")
    p.add_argument("--radius", type=float, default=MATCH_RADIUS,
                   help=f"matching radius in px (default {MATCH_RADIUS:g})")
    p.add_argument("--budget", type=float, default=FP_BUDGET,
                   help=f"false positives per 4088x4088 SCA for the sweep (default {FP_BUDGET:g})")
    p.add_argument("--threshold", type=float, nargs="+", default=None,
                   help="score cut(s) applied before scoring, one per catalog or one for all "
                   "(default: every row)")  # fmt: skip
    p.add_argument("--snr-min", type=float, default=SNR_MIN,
                   help=f"truth S/N of 'completeness at S/N >= N' (default {SNR_MIN:g})")
    p.add_argument("--shape", type=int, nargs=2, default=None, metavar=("NY", "NX"),
                   help="image shape when neither the catalog nor a FITS header gives it")
    p.add_argument("--dmag-truth", choices=("photometry", "catalog"), default="photometry",
                   help="truth dmag: paper eq. 1-2 photometry on the pair's images (the "
                   "data layer's definition; needs ref.fits/new.fits beside the truth) or "
                   "|mag_ref - mag_new| from the truth table (default photometry)")
    p.add_argument("--noise-peaks", action="store_true",
                   help="also count the |S/N| peaks that pure white noise gives per 4088x4088 "
                   "SCA at the oracle's S/N levels (the false-positive floor; ~8 s)")
    p.add_argument("--fwhm", type=float, default=None,
                   help="PSF FWHM in px for --noise-peaks (default: Roman H158)")
    p.add_argument("--plot", default=None, help="completeness-vs-magnitude PNG")
    p.add_argument("--json", default=None, help="write all numbers as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --plot/--json")
    return p


def run(args) -> dict:
    """Score as the command line asks; returns the JSON-able result dict."""
    if args.radius <= 0:
        raise RtcnnInputError(None, f"--radius must be > 0 px, got {args.radius}")
    positional = args.truth is None and args.data is None
    methods = args.catalogs[:1] if positional else args.catalogs
    labels = args.label or [Path(c.replace("{pair}", "pair")).stem for c in methods]
    if len(labels) != len(methods):
        raise RtcnnInputError(None, f"{len(labels)} labels for {len(methods)} catalogs")
    if len(set(labels)) != len(labels):
        labels = [f"{lab}#{i}" for i, lab in enumerate(labels)]
    thr = args.threshold or [None]
    if len(thr) not in (1, len(methods)):
        raise RtcnnInputError(None, "--threshold takes one value or one per catalog")
    thr = thr * len(methods) if len(thr) == 1 else thr
    inputs = [p for p in (*args.catalogs, *(args.truth or [])) if "{pair}" not in p]
    for path in (args.plot, args.json):  # refused before any work; never an input
        if path is not None:
            check_output(path, args.overwrite, inputs)
    pairs = load_pairs(args.catalogs, args.truth, args.data, args.shape,
                       photometry=args.dmag_truth == "photometry")
    results = {}
    bins = None
    all_mag = np.concatenate([p.truth["mag"][p.truth["transient"]]
                              for p in next(iter(pairs.values()))])  # fmt: skip
    finite = all_mag[np.isfinite(all_mag)]
    if finite.size:  # one binning for every method
        lo = math.floor(finite.min() / MAG_BIN) * MAG_BIN
        hi = math.ceil(finite.max() / MAG_BIN) * MAG_BIN
        bins = np.arange(lo, max(hi, lo + MAG_BIN) + MAG_BIN / 2, MAG_BIN)
    for label, name, t in zip(labels, methods, thr):
        ps = pairs[name]
        results[label] = {
            "catalog": name,
            "at_threshold": evaluate(ps, args.radius, t, bins, args.snr_min),
            "budget": sweep(ps, args.radius, args.budget, snr_min=args.snr_min)
            if t is None else sweep([_cut(p, t) for p in ps], args.radius, args.budget,
                                    snr_min=args.snr_min),
        }  # fmt: skip
    oracle = oracle_m50(next(iter(pairs.values())))
    out = {"radius_px": args.radius, "budget_fp_per_sca": args.budget, "snr_min": args.snr_min,
           "sca_area_px": SCA_AREA, "methods": results, "oracle_m50": oracle}  # fmt: skip
    print(format_table(results))
    if any(np.isfinite(v) for v in oracle.values()):
        print("noise-limit oracle (reports exactly the transients with true S/N >= X): m50 "
              + ", ".join(f"{k}: {v:.2f}" for k, v in oracle.items()))
    if args.noise_peaks:
        from rtcnn.difference import noise_peak_counts
        from rtcnn.roman import DEFAULT_BAND, band_fwhm

        fwhm = band_fwhm(DEFAULT_BAND) if args.fwhm is None else args.fwhm
        runs = [noise_peak_counts(fwhm, ORACLE_SNR, seed=s) for s in range(NOISE_PEAK_FIELDS)]
        out["noise_peaks_per_sca"] = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        print(f"pure-noise |S/N| peaks per SCA (FWHM {fwhm:g} px, mean of "
              f"{NOISE_PEAK_FIELDS} fields): "
              + ", ".join(f">= {k}: {v:g}" for k, v in out["noise_peaks_per_sca"].items()))
    if args.plot:
        from rtcnn.plots import FIG_DPI, fig_completeness

        curves = {lab: r["at_threshold"]["curve"] for lab, r in results.items()}
        m50 = {lab: r["at_threshold"]["m50"] for lab, r in results.items()}
        fig = fig_completeness(curves, m50, title=f"match radius {args.radius:g} px")
        atomic_write(Path(args.plot), args.overwrite,
                     lambda tmp: fig.savefig(tmp, format="png", dpi=FIG_DPI, bbox_inches="tight"))
        print(f"plot: {args.plot}")
    if args.json:
        write_json(out, args.json, overwrite=args.overwrite)
        print(f"json: {args.json}")
    return out


def _cut(p: PairScore, t: float) -> PairScore:
    keep = p.score >= t
    return PairScore(p.name, p.area, p.truth, p.det_xy[keep], p.score[keep], p.dmag[keep],
                     p.brightened[keep])  # fmt: skip


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"rtcnn: warning: {message}", file=sys.stderr if file is None else file)


@cli_main
def main(argv: list[str] | None = None) -> int:
    """Run the command; returns 0. Rows left out of the score are one warning line each."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", ScoreInputWarning)
        show, warnings.showwarning = warnings.showwarning, _one_line_warning
        try:
            run(build_parser().parse_args(argv))
        finally:
            warnings.showwarning = show
    return 0


if __name__ == "__main__":
    sys.exit(main())
