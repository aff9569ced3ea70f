"""``make demo``: simulate the default data set (if absent), train attn5 on CPU, evaluate it,
then detect transients on a fresh simulated pair with the shipped detector.

Runs the real commands one after another, printing each, so a user can copy them::

    python -m rtcnn.train experiment=demo hydra.run.dir=outputs/demo/<time>
    python -m rtcnn.evaluate ckpt_path=outputs/demo/<time>/checkpoints/<best>.ckpt
    python -m rtcnn.sim outputs/demo/<time>/detect --pairs 1 --size 1024 --mode epochs --seed 4245
    python -m rtcnn.detect <pair>/ref.fits <pair>/new.fits -o <detect>/candidates.ecsv --regions ...
    python -m rtcnn.score <detect>/candidates.ecsv --truth <pair>/truth.ecsv --json ...

and writes ``<detect>/candidates.png`` (the new image, candidates circled, true transients
in squares).

Extra ``key=value`` arguments are passed to the training command. The run directory is
under ``$PROJECT_ROOT/outputs/demo/`` (the checkout when ``PROJECT_ROOT`` is unset), as for
``paths.root_dir``. A failing step ends the demo with that step's exit status.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the commands run here
DETECT_SEED = 4245  # the demo's fresh epochs pair: no model was trained on this sim seed
DETECT_SIZE = 1024  # px, its side


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
        raise SystemExit(rc)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run (``checkpoints/epoch_*.ckpt``), else ``last.ckpt``."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return ckpts[-1] if ckpts else run_dir / "checkpoints" / "last.ckpt"


def candidates_png(pair: Path, catalog: Path, png: Path) -> Path:
    """Draw the pair's new image with the catalog's candidates and the true transients."""
    from astropy.table import Table

    from rtcnn.io import read_image, read_truth
    from rtcnn.plots import fig_candidates, save_figure

    cat = Table.read(catalog, format="ascii.ecsv")
    truth = read_truth(pair / "truth.ecsv")
    truth = truth[np.asarray(truth["kind"]).astype(str) == "transient"]
    fig = fig_candidates(read_image(pair / "new.fits").data,
                         np.column_stack([cat["x"], cat["y"]]),
                         np.column_stack([truth["x"], truth["y"]]),
                         title=f"{pair.name}: {len(cat)} candidates ({catalog.name})")
    save_figure(fig, png)
    return png


def detection(out: Path) -> dict[str, Path]:
    """The shipped detector on a fresh simulated pair: catalog, regions, PNG, score."""
    py = sys.executable
    _run([py, "-m", "rtcnn.sim", str(out), "--pairs", "1", "--size", str(DETECT_SIZE),
          "--mode", "epochs", "--seed", str(DETECT_SEED), "--no-progress"])
    pair = out / "pair_0000"
    files = {"catalog": out / "candidates.ecsv", "regions": out / "candidates.reg",
             "png": out / "candidates.png", "score": out / "score.json"}
    _run([py, "-m", "rtcnn.detect", str(pair / "ref.fits"), str(pair / "new.fits"),
          "-o", str(files["catalog"]), "--regions", str(files["regions"]), "--no-progress"])
    candidates_png(pair, files["catalog"], files["png"])
    _run([py, "-m", "rtcnn.score", str(files["catalog"]), "--truth", str(pair / "truth.ecsv"),
          "--json", str(files["score"])])
    return files


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    project = Path(os.environ.get("PROJECT_ROOT") or ROOT)
    run_dir = project / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    t0 = time.time()
    _run([sys.executable, "-m", "rtcnn.train", "experiment=demo", f"hydra.run.dir={run_dir}", *argv])
    ckpt = best_checkpoint(run_dir)
    _run([sys.executable, "-m", "rtcnn.evaluate", f"ckpt_path={ckpt}"])
    evals = sorted((run_dir / "eval").glob("*"))
    found = detection(run_dir / "detect")
    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    print(f"  run directory : {run_dir}")
    print(f"  checkpoint    : {ckpt}")
    if evals:
        print(f"  report        : {evals[-1]}  (metrics.json, predictions.ecsv, *.png)")
    tensorboard = Path(sys.executable).with_name("tensorboard")  # the environment's, as printed
    print(f"  TensorBoard   : {tensorboard} --logdir {run_dir / 'tensorboard'}")
    print(f"  detection     : {found['catalog']} (shipped detector: {sys.executable} -m rtcnn.models)")
    print(f"                  {found['regions']} (DS9), {found['png']}, {found['score']}")


if __name__ == "__main__":
    main()
