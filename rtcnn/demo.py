"""``make demo``: simulate the default data set (if absent), train attn5 on CPU, evaluate it.

Runs the real commands one after another, printing each, so a user can copy them::

    python -m rtcnn.train experiment=demo hydra.run.dir=outputs/demo/<time>
    python -m rtcnn.evaluate ckpt_path=outputs/demo/<time>/checkpoints/<best>.ckpt

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

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the commands run here


def _run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc:
        raise SystemExit(rc)


def best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint of a run (``checkpoints/epoch_*.ckpt``), else ``last.ckpt``."""
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return ckpts[-1] if ckpts else run_dir / "checkpoints" / "last.ckpt"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    project = Path(os.environ.get("PROJECT_ROOT") or ROOT)
    run_dir = project / "outputs" / "demo" / time.strftime("%Y-%m-%d_%H-%M-%S")
    t0 = time.time()
    _run([sys.executable, "-m", "rtcnn.train", "experiment=demo", f"hydra.run.dir={run_dir}", *argv])
    ckpt = best_checkpoint(run_dir)
    _run([sys.executable, "-m", "rtcnn.evaluate", f"ckpt_path={ckpt}"])
    evals = sorted((run_dir / "eval").glob("*"))
    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    print(f"  run directory : {run_dir}")
    print(f"  checkpoint    : {ckpt}")
    if evals:
        print(f"  report        : {evals[-1]}  (metrics.json, predictions.ecsv, *.png)")
    print(f"  TensorBoard   : tensorboard --logdir {run_dir / 'tensorboard'}")


if __name__ == "__main__":
    main()
