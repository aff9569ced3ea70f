"""Benchmarks on this machine: ``python -m rtcnn.bench {data,train,infer,all} [options]``.

Each benchmark is a function ``bench_<name>(args) -> dict`` registered in :data:`BENCHES`
with its own argument group (:data:`ARGUMENTS`); ``all`` runs every registered one. Results
are printed and written as JSON (``--out``) together with a description of the machine.
To add one: write ``bench_x(args)``, register it with ``@register("x", add_args)``.

``data``
    Tiles/s streamed from FITS through :class:`rtcnn.data.FitsDataModule` (shuffled
    tiles, minmax normalisation, D4 augmentation, batch 256) for each worker count: the
    median wall-clock rate of ``--repeats`` epochs after a warm-up epoch, and the CPU time
    per tile summed over the main process and the workers (robust to other load on the
    machine); and the peak resident memory (VmHWM) of a fresh process that streams every
    tile of one full 4088 x 4088 Roman SCA pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rtcnn.errors import cli_main

SCA_SIZE = 4088  # px, side of a Roman SCA
BENCH_BATCH = 256  # tiles per batch for the data benchmark
MIB = 2**20  # bytes

BENCHES: dict[str, Callable[[argparse.Namespace], dict]] = {}
ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def register(name: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None):
    """Register ``bench_<name>`` (decorator) with a function adding its arguments."""

    def deco(func):
        BENCHES[name] = func
        ARGUMENTS[name] = add_args or (lambda parser: None)
        return func

    return deco


def machine() -> dict:
    """What this machine is: CPU, cores, memory, GPU and library versions."""
    import numpy as np
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(), "memory_gib": None if mem is None else round(mem, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "torch": torch.__version__,
    }


def _proc_status_mib(key: str) -> float | None:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``...) in MiB, or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    Linux: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which a child started by
    ``subprocess`` inherits from its parent); elsewhere ``ru_maxrss``.
    """
    hwm = _proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, else KiB
    return rss / MIB if sys.platform == "darwin" else rss / 1024.0


def _current_rss_mib() -> float:
    """Resident set size of this process now, MiB (Linux ``VmRSS``; else the peak)."""
    rss = _proc_status_mib("VmRSS")
    return _peak_rss_mib() if rss is None else rss


def _cpu_seconds(pids) -> float:
    """User + system CPU seconds used so far by the processes ``pids`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


# --------------------------------------------------------------------------- data
def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="DataLoader worker counts to time (default: 0 1 2)")
    g.add_argument("--batch-size", type=int, default=BENCH_BATCH, help="tiles per batch")
    g.add_argument("--repeats", type=int, default=5, help="timed epochs per worker count")
    g.add_argument("--size", type=int, default=SCA_SIZE,
                   help="side (px) of the simulated pair (default: a full SCA, 4088)")
    g.add_argument("--data", default=None,
                   help="folder of pairs to use (default: simulate one pair in a temp "
                        "folder; kept there if --data names an empty/new folder)")


def _stream_all(root: str, batch_size: int) -> dict:
    """Stream every tile of the pairs under ``root`` once (in order, augmented, no workers).

    Run in a fresh process so that its peak RSS is this alone.
    """
    import numpy as np

    from rtcnn.data import FitsDataModule  # imports torch, lightning, astropy

    base = _current_rss_mib()
    with tempfile.TemporaryDirectory(prefix="rtcnn-index-") as cache:
        dm = FitsDataModule(root, samples="all", batch_size=batch_size, val_fraction=0,
                            test_fraction=0, num_workers=0, drop_last=False, progress=False,
                            cache_dir=cache)
        dm.setup()  # builds the index in this process: its memory counts too
    after_index = _current_rss_mib()
    index_peak = _peak_rss_mib()
    loader = dm.train_dataloader()
    loader.sampler.shuffle = False
    n, checksum = 0, 0.0
    t0 = time.perf_counter()
    for batch in loader:
        n += batch["image"].shape[0]
        checksum += float(batch["image"][:, :, 0, 0].sum())
    dt = time.perf_counter() - t0
    shape = [int(v) for v in dm.index.pairs["shape"][0]]
    return {"tiles": n, "seconds": round(dt, 3), "tiles_per_s": round(n / dt, 1),
            "image_shape": shape, "after_import_rss_mib": round(base, 1),
            "after_setup_rss_mib": round(after_index, 1),
            "index_build_peak_rss_mib": round(index_peak, 1),
            "peak_rss_mib": round(_peak_rss_mib(), 1),
            "end_rss_mib": round(_current_rss_mib(), 1),
            "checksum_finite": bool(np.isfinite(checksum))}


def _throughput(root: str, workers: int, batch_size: int, repeats: int) -> dict:
    """Wall-clock tiles/s per epoch, and CPU seconds (main process + workers) per tile."""
    from rtcnn.data import FitsDataModule

    dm = FitsDataModule(root, samples="all", batch_size=batch_size, val_fraction=0,
                        test_fraction=0, augment=True, num_workers=workers,
                        persistent_workers=workers > 0, prefetch_factor=4, progress=False)
    dm.setup()
    loader = dm.train_dataloader()
    rates, cpu_per_tile = [], []
    for epoch in range(repeats + 1):  # epoch 0 warms up (worker start, page cache)
        loader.sampler.set_epoch(epoch)
        it = iter(loader)
        pids = [w.pid for w in getattr(loader._iterator, "_workers", [])] if workers else []
        n = 0
        c0 = time.process_time() + _cpu_seconds(pids)
        t0 = time.perf_counter()
        for batch in it:
            n += batch["image"].shape[0]
        wall = time.perf_counter() - t0
        cpu = time.process_time() + _cpu_seconds(pids) - c0
        if epoch:
            rates.append(n / wall)
            cpu_per_tile.append(cpu / n)
    del it, loader
    cpu_us = statistics.median(cpu_per_tile) * 1e6
    return {"workers": workers, "tiles_per_epoch": n, "batch_size": batch_size,
            "tiles_per_s_median": round(statistics.median(rates), 1),
            "tiles_per_s": [round(r, 1) for r in rates],
            "cpu_us_per_tile": round(cpu_us, 1),
            "tiles_per_cpu_s": round(1e6 / cpu_us, 1)}


def _make_pair(folder: Path, size: int) -> None:
    from rtcnn.sim import simulate_dataset

    print(f"simulating one {size} x {size} px pair in {folder} ...", flush=True)
    simulate_dataset(folder, 1, size, "inject", 0, overwrite=False, progress=True)


@register("data", _data_args)
def bench_data(args: argparse.Namespace) -> dict:
    """Streaming throughput per worker count, index build time and peak memory."""
    from rtcnn.data import FitsDataModule

    tmp = None
    if args.data and Path(args.data).exists() and any(Path(args.data).iterdir()):
        root = Path(args.data)
    else:
        root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="rtcnn-bench-"))
        tmp = None if args.data else root
        t0 = time.perf_counter()
        _make_pair(root, args.size)
        print(f"  simulated in {time.perf_counter() - t0:.1f} s")
    try:
        t0 = time.perf_counter()
        dm = FitsDataModule(str(root), samples="all", val_fraction=0, test_fraction=0,
                            progress=False, cache_dir=str(root / ".bench-index"))
        dm.setup()
        index_s = time.perf_counter() - t0
        shutil.rmtree(root / ".bench-index", ignore_errors=True)
        res = {"data": str(root), "pairs": dm.index.n_pairs,
               "image_shape": [int(v) for v in dm.index.pairs["shape"][0]],
               "tiles": dm.index.n_tiles, "changes": int(len(dm.index.changes["x"])),
               "index_build_s": round(index_s, 2), "throughput": []}
        print(f"index: {res['tiles']} tiles, {res['changes']} changes, built in "
              f"{index_s:.2f} s")
        for w in args.workers:
            r = _throughput(str(root), w, args.batch_size, args.repeats)
            res["throughput"].append(r)
            print(f"  workers={w}: {r['tiles_per_s_median']:>8.0f} tiles/s wall (median of "
                  f"{args.repeats} epochs of {r['tiles_per_epoch']} tiles), "
                  f"{r['cpu_us_per_tile']:.1f} us CPU/tile in all processes = "
                  f"{r['tiles_per_cpu_s']:.0f} tiles per CPU-second", flush=True)
        cmd = [sys.executable, "-m", "rtcnn.bench", "_stream", str(root),
               "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1])
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        res["memory"] = mem
        print(f"memory: streaming all {mem['tiles']} tiles of the {mem['image_shape'][1]} x "
              f"{mem['image_shape'][0]} px pair: peak RSS {mem['peak_rss_mib']:.0f} MiB, of "
              f"which {mem['after_import_rss_mib']:.0f} MiB is python + torch + lightning + "
              f"astropy after import; building the index peaked at "
              f"{mem['index_build_peak_rss_mib']:.0f} MiB ({mem['tiles_per_s']:.0f} tiles/s "
              "in order, 0 workers)")
        best = max(r["tiles_per_s_median"] for r in res["throughput"])
        res["targets"] = {"tiles_per_s>=20000": best >= 20000,
                          "peak_rss<1GiB": mem["peak_rss_mib"] < 1024}
        return res
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rtcnn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name in [*BENCHES, "all"]:
        p = sub.add_parser(name, help=f"run the {name} benchmark" if name != "all"
                           else "run every benchmark")
        p.add_argument("--out", default="outputs/bench",
                       help="folder for the JSON results (default: outputs/bench)")
        for add in (ARGUMENTS.values() if name == "all" else [ARGUMENTS[name]]):
            add(p)
    stream = sub.add_parser("_stream", help=argparse.SUPPRESS)
    stream.add_argument("root")
    stream.add_argument("--batch-size", type=int, default=BENCH_BATCH)
    return parser


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.bench == "_stream":
        print(json.dumps(_stream_all(args.root, args.batch_size)))
        return {}
    info = machine()
    info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
          f"GPU {info['gpu'] or 'none'}; python {info['python']}, torch {info['torch']}; "
          f"load average {info['load_average_start'][0]:.1f}")
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    results = {"machine": info}
    for name in names:
        print(f"== {name}")
        results[name] = BENCHES[name](args)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if max(info["load_average_start"][0], info["load_average_end"][0]) > info["cores"]:
        print(f"note: the load average exceeded the {info['cores']} cores: other processes "
              "shared the CPUs, so wall-clock rates are low; CPU time per tile is not affected")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{args.bench}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {path}")
    return results


if __name__ == "__main__":
    main()
