"""Benchmarks on this machine: ``python -m rtcnn.bench {data,train,infer,survey,all} [options]``.

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

``train``
    Training tiles/s of ``attn5`` (``conf/model/attn5.yaml``) and of the dense detector
    (``conf/model/dense.yaml``): each step is the task's own ``training_step`` (forward,
    the real loss, the training metrics) + backward + optimizer step, on a fixed batch of
    synthetic tiles (:func:`rtcnn.data.synthetic.synthetic_tiles`: sky noise, PSF-like
    sources, one transient in the new image; minmax-normalised for attn5 as the data layer
    does, raw e-/s for the detector), so the figure is the model's compute alone, not the
    data loading (that is ``data``). For every model, batch (32 and the largest that fits:
    doubled until it no longer fits in half the free memory on a CPU (capped at 1024) or
    until CUDA runs out of memory), precision (fp32, bf16 autocast) and mode (eager,
    ``torch.compile``): ``--repeats`` timed runs of N steps after warm-up steps
    (compilation included there and reported as ``warmup_s``); median, min and max
    tiles/s. A compile failure is recorded as its error message.

``infer``
    Seconds for one 4088 x 4088 pair (``--size``) -> catalog, each method in a fresh
    process (its peak resident memory is the VmHWM of that process): the dense detector
    through ``rtcnn.detect`` exactly as the command runs (checkpoint ``--ckpt``; without one
    a freshly initialised, untrained detector: the network and candidate pass cost the
    same, but it detects almost nothing, so the per-detection measurements cost less than
    a trained model's), the classical baseline ``rtcnn.baseline`` on the same pair, and the
    ``attn5`` grid scan of every 64 x 64 tile (stride 54). One warm-up run per process,
    then ``--repeats`` timed runs; each from reading the FITS files to the catalog written.
    ``--cases survey`` (default with ``same-grid``) repeats it with the pair's reference put
    on a north-up coadd grid of the SCA's diagonal (5784 px for 4088; ``rtcnn.coadd``), the
    survey's case: every method then reads a reference of another grid and aligns it
    (``rtcnn.align``) inside the timed run; target ``detector_s<=3``.

``survey``
    Pairs per hour through ``rtcnn.survey`` on a local Dask cluster (``--survey-workers``,
    default 1 and 2; one per GPU with ``--device cuda``) and through sequential
    ``rtcnn.detect`` on the same ``--survey-pairs`` pairs (links to one pair's files) of each
    ``--survey-sizes`` (default 1024 and 4088 px): end to end (the cluster start apart) and
    steady (between the first and the last pair finished); with one worker, the per-task
    overhead (from Dask's task stream: a pair task's compute time beyond the pair's own read
    + detect + write, plus the idle gap before the next task), whose target is <= 5 % of a
    4088 px pair.

Torch CPU threads: ``--threads`` (default torch's choice, one per core); the count is
recorded. With other processes on the machine torch's OpenMP threads spin and a step can
get an order of magnitude slower: give it the free cores only.
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

import numpy as np

from rtcnn.errors import RtcnnInputError, cli_main
from rtcnn.io.pairdir import atomic_write, check_output, check_output_dir, make_output_dir
from rtcnn.roman import SCA_NPIX

BENCH_BATCH = 256  # tiles per batch for the data benchmark
MIB = 2**20  # bytes
REPO = Path(__file__).resolve().parents[1]  # the checkout: conf/ and `python -m rtcnn` work here
DEFAULT_REPEATS = {"data": 5, "train": 5, "infer": 3}  # timed repeats per benchmark

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


# --------------------------------------------------------------------------- options
def _common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (default: data 5 epochs, train 5, infer 3 runs)")
    g.add_argument("--size", type=int, default=SCA_NPIX,
                   help="side (px) of the simulated pair (default: a full SCA, 4088)")
    g.add_argument("--data", default=None,
                   help="folder of pairs to use (default: simulate one pair in a temp "
                        "folder; kept there if --data names an empty/new folder)")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda")


def _repeats(args: argparse.Namespace, name: str) -> int:
    n = DEFAULT_REPEATS[name] if args.repeats is None else int(args.repeats)
    if n < 1:
        raise RtcnnInputError(None, f"--repeats must be >= 1, got {n}")
    return n


def _device(args: argparse.Namespace):
    from rtcnn.inference import resolve_device

    return resolve_device(args.device)


def _pair_root(args: argparse.Namespace, mode: str) -> tuple[Path, Path | None]:
    """The folder of pairs to use, and the temp folder to delete afterwards (or None).

    ``--data`` naming a non-empty folder: used as it is; else one ``--size`` pair is
    simulated (``mode``) into ``--data`` or, without it, into a temp folder.
    """
    if args.data and Path(args.data).exists() and any(Path(args.data).iterdir()):
        return Path(args.data), None
    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="rtcnn-bench-"))
    t0 = time.perf_counter()
    _make_pair(root, args.size, mode)
    print(f"  simulated in {time.perf_counter() - t0:.1f} s")
    return root, None if args.data else root


# --------------------------------------------------------------------------- data
def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                   help="DataLoader worker counts to time (default: 0 1 2)")
    g.add_argument("--batch-size", type=int, default=BENCH_BATCH, help="tiles per batch")
    g.add_argument("--no-augment", dest="augment", action="store_false",
                   help="time the loader without its D4 augmentation (e.g. for "
                        "model.gpu_augment, which moves it onto the GPU)")


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


def _throughput(root: str, workers: int, batch_size: int, repeats: int,
                augment: bool = True) -> dict:
    """Wall-clock tiles/s per epoch, and CPU seconds (main process + workers) per tile."""
    from rtcnn.data import FitsDataModule

    dm = FitsDataModule(root, samples="all", batch_size=batch_size, val_fraction=0,
                        test_fraction=0, augment=augment, num_workers=workers,
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


def _make_pair(folder: Path, size: int, mode: str = "inject") -> None:
    from rtcnn.sim import simulate_dataset

    print(f"simulating one {size} x {size} px {mode} pair in {folder} ...", flush=True)
    simulate_dataset(folder, 1, size, mode, 0, overwrite=False, progress=True)


@register("data", _data_args)
def bench_data(args: argparse.Namespace) -> dict:
    """Streaming throughput per worker count, index build time and peak memory."""
    from rtcnn.data import FitsDataModule

    repeats = _repeats(args, "data")
    root, tmp = _pair_root(args, "inject")
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
               "index_build_s": round(index_s, 2), "augment": bool(args.augment),
               "throughput": []}
        print(f"index: {res['tiles']} tiles, {res['changes']} changes, built in "
              f"{index_s:.2f} s")
        for w in args.workers:
            r = _throughput(str(root), w, args.batch_size, repeats, args.augment)
            res["throughput"].append(r)
            print(f"  workers={w}: {r['tiles_per_s_median']:>8.0f} tiles/s wall (median of "
                  f"{repeats} epochs of {r['tiles_per_epoch']} tiles), "
                  f"{r['cpu_us_per_tile']:.1f} us CPU/tile in all processes = "
                  f"{r['tiles_per_cpu_s']:.0f} tiles per CPU-second", flush=True)
        cmd = [sys.executable, "-m", "rtcnn.bench", "_stream", str(root),
               "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
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


# --------------------------------------------------------------------------- train
TRAIN_MODELS = ("attn5", "dense")  # conf/model/<name>.yaml
TRAIN_PRECISIONS = ("fp32", "bf16")  # bf16 = torch.autocast bfloat16, as Lightning's bf16-mixed
TRAIN_BATCH = 32  # tiles, the paper's batch
CPU_MAX_BATCH = 1024  # tiles, cap of the largest-batch search on a CPU
GPU_MAX_BATCH = 65536  # tiles, cap of the largest-batch search on a GPU (it stops at OOM first)
CPU_MEMORY_FRACTION = 0.5  # the largest CPU batch may use at most this fraction of MemAvailable
TRAIN_WARMUP = 3  # untimed steps before timing (compilation, allocator, oneDNN primitives)
REPEAT_SECONDS = 2.0  # without --steps, each timed repeat runs about this long


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("train")
    g.add_argument("--models", nargs="+", choices=TRAIN_MODELS, default=list(TRAIN_MODELS))
    g.add_argument("--precisions", nargs="+", choices=TRAIN_PRECISIONS,
                   default=list(TRAIN_PRECISIONS))
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.compile (default); --no-compile: eager only")
    g.add_argument("--channels-last", action="store_true",
                   help="channels-last layout (model.channels_last=true) in every run")
    g.add_argument("--batch", type=int, default=TRAIN_BATCH,
                   help=f"the fixed batch (default {TRAIN_BATCH}, the paper's)")
    g.add_argument("--max-batch", type=int, default=None,
                   help=f"cap of the largest-batch search (default {CPU_MAX_BATCH} on a CPU, "
                        f"{GPU_MAX_BATCH} on a GPU); <= --batch: no search")
    g.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps per timed repeat (default: ~{REPEAT_SECONDS:g} s worth)")
    g.add_argument("--warmup", type=int, default=TRAIN_WARMUP, help="untimed steps first")


class _Steps:
    """One task, one fixed batch, its optimizer: ``step()`` = forward, loss, backward, update."""

    def __init__(self, model: str, batch_size: int, device, precision: str, compile: bool,
                 channels_last: bool):
        import torch

        self.torch = torch
        self.device = device
        from rtcnn.data.synthetic import synthetic_batch
        from rtcnn.tasks import build_task

        self.task = build_task(model, compile=compile, channels_last=channels_last).to(device)
        self.task.setup("fit")  # torch.compile and the memory layout, as in training
        self.task.train()
        opt = self.task.configure_optimizers()
        self.opt = opt["optimizer"] if isinstance(opt, dict) else opt
        batch = {k: v.to(device) for k, v in synthetic_batch(model, batch_size).items()}
        self.batch = self.task.on_after_batch_transfer(batch, 0)
        self.bf16 = precision == "bf16"
        self.n = 0

    def step(self) -> float:
        import warnings

        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # self.log() without a Trainer: a no-op that warns
            warnings.simplefilter("ignore")
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.task.training_step(self.batch, self.n)
        loss.backward()
        self.opt.step()
        self.n += 1
        return loss

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def reset_metrics(self) -> None:
        from torchmetrics import Metric

        for m in self.task.modules():
            if isinstance(m, Metric):
                m.reset()

    def close(self) -> None:
        del self.task, self.opt, self.batch
        self.torch._dynamo.reset()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()


def _error(err: BaseException) -> str:
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def _is_oom(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def _mem_available_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux ``clear_refs``); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _step_memory(model: str, batch: int, device, channels_last: bool) -> dict:
    """Two fp32 eager steps at ``batch``: the memory they need (MiB) or the OOM error."""
    import torch

    res: dict = {"batch": batch}
    runner = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = _current_rss_mib()
        runner = _Steps(model, batch, device, "fp32", False, channels_last)
        reset = _reset_peak_rss()
        for _ in range(2):  # the first allocates the optimizer state
            runner.step()
        runner.sync()
        if device.type == "cuda":
            res["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
        else:
            peak = _peak_rss_mib() if reset else _current_rss_mib()
            res["peak_mib"] = round(peak - rss0, 1)  # above the process before the task
    except Exception as err:  # noqa: BLE001 - an OOM ends the search; anything else is reported
        if not _is_oom(err):
            raise
        res["error"] = _error(err)
    finally:
        if runner is not None:
            runner.close()
        elif device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def largest_batch(model: str, start: int, cap: int, device, channels_last: bool = False,
                  log=print) -> tuple[int, list[dict]]:
    """Double the batch from ``start`` while it fits; returns it and the search trail.

    GPU: until CUDA runs out of memory (then the last batch that fitted). CPU: while the
    next doubling would stay within :data:`CPU_MEMORY_FRACTION` of the memory available
    at the start (projected from the last step's peak, which grows about linearly).
    Never beyond ``cap``.
    """
    budget = None if device.type == "cuda" else (_mem_available_mib() or 0) * CPU_MEMORY_FRACTION
    best, trail, b = start, [], start
    while b <= cap:
        res = _step_memory(model, b, device, channels_last)
        trail.append(res)
        if "error" in res:
            log(f"    batch {b}: does not fit ({res['error']})")
            break
        best = b
        log(f"    batch {b}: fits, {res['peak_mib']:.0f} MiB")
        if budget is not None and 2 * res["peak_mib"] > budget:
            break
        b *= 2
    return best, trail


def time_training(model: str, batch: int, device, precision: str, compile: bool,
                  repeats: int, steps: int | None = None, warmup: int = TRAIN_WARMUP,
                  channels_last: bool = False) -> dict:
    """Training tiles/s of one configuration: median, min, max over ``repeats``."""
    import torch

    res = {"model": model, "batch": batch, "precision": precision,
           "mode": "compile" if compile else "eager", "channels_last": channels_last}
    runner = None
    try:
        runner = _Steps(model, batch, device, precision, compile, channels_last)
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            loss = runner.step()
        runner.sync()
        res["warmup_s"] = round(time.perf_counter() - t0, 3)
        if steps is None:  # calibrate: one more step, then ~REPEAT_SECONDS per repeat
            t0 = time.perf_counter()
            runner.step()
            runner.sync()
            steps = max(2, int(REPEAT_SECONDS / max(time.perf_counter() - t0, 1e-6)))
        rates, cpu = [], []
        for _ in range(repeats):
            runner.reset_metrics()  # the task's epoch metrics would grow over the run
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                loss = runner.step()
            runner.sync()
            rates.append(batch * steps / (time.perf_counter() - t0))
            cpu.append((time.process_time() - c0) / (batch * steps))
        res.update({
            "steps": steps, "repeats": repeats,
            "tiles_per_s_median": round(statistics.median(rates), 1),
            "tiles_per_s_min": round(min(rates), 1), "tiles_per_s_max": round(max(rates), 1),
            "tiles_per_s": [round(r, 1) for r in rates],
            "cpu_ms_per_tile": round(statistics.median(cpu) * 1e3, 3),
            "loss_finite": bool(np.isfinite(float(loss.detach()))),
        })
        if device.type == "cuda":
            res["peak_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 1)
    except Exception as err:  # noqa: BLE001 - e.g. torch.compile without a compiler: record it
        res["error"] = _error(err)
    finally:
        if runner is not None:
            runner.close()
    return res


@register("train", _train_args)
def bench_train(args: argparse.Namespace) -> dict:
    """Training tiles/s per model, batch, precision and eager/compile (module docstring)."""
    import torch

    from rtcnn.data.synthetic import SKY_NOISE, SYN_SOURCES
    from rtcnn.inference import native_bf16

    device = _device(args)
    repeats = _repeats(args, "train")
    if args.batch < 1 or (args.steps is not None and args.steps < 1):
        raise RtcnnInputError(None, "--batch and --steps must be >= 1")
    cap = args.max_batch or (GPU_MAX_BATCH if device.type == "cuda" else CPU_MAX_BATCH)
    res = {"device": str(device), "torch_threads": torch.get_num_threads(),
           "native_bf16": native_bf16(device),
           "input": "synthetic tiles (rtcnn.data.synthetic.synthetic_tiles): sky noise "
                    f"{SKY_NOISE} e-/s, {SYN_SOURCES} PSF sources, one transient; attn5 "
                    "minmax-normalised, dense raw e-/s; one fixed batch (no data loading)",
           "step": "task.training_step (forward, loss, metrics) + backward + optimizer step",
           "largest_batch": {}, "runs": []}
    modes = [False, True] if args.compile else [False]
    for model in args.models:
        batches = [args.batch]
        if cap > args.batch:
            print(f"  {model}: largest batch (x2 from {args.batch}, cap {cap}) ...", flush=True)
            big, trail = largest_batch(model, args.batch, cap, device, args.channels_last)
            res["largest_batch"][model] = {"batch": big, "cap": cap, "search": trail}
            if big > args.batch:
                batches.append(big)
        for batch in batches:
            for precision in args.precisions:
                for compile in modes:
                    r = time_training(model, batch, device, precision, compile, repeats,
                                      args.steps, args.warmup, args.channels_last)
                    res["runs"].append(r)
                    name = f"  {model:5s} batch {batch:5d} {precision} {r['mode']:7s}"
                    if "error" in r:
                        print(f"{name}: failed: {r['error']}", flush=True)
                    else:
                        print(f"{name}: {r['tiles_per_s_median']:9.1f} tiles/s (min "
                              f"{r['tiles_per_s_min']:.1f}, max {r['tiles_per_s_max']:.1f}; "
                              f"{r['repeats']} x {r['steps']} steps; warm-up "
                              f"{r['warmup_s']:.1f} s; {r['cpu_ms_per_tile']:.2f} ms CPU/tile)",
                              flush=True)
    return res


# --------------------------------------------------------------------------- infer
INFER_METHODS = ("detector", "baseline", "attn5_scan")
#: same-grid: the simulated pair as it is; survey: its reference first put on a north-up
#: coadd grid of the SCA's diagonal (rtcnn.coadd), so that every method also aligns it
#: (rtcnn.align: WCS map, astrometric check, cubic-spline resampling) -- a survey's case.
INFER_CASES = ("same-grid", "survey")


def _infer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("infer")
    g.add_argument("--ckpt", default=None,
                   help="detector checkpoint (default: a freshly initialised, untrained "
                        "conf/model/dense.yaml detector; its network time is real)")
    g.add_argument("--attn5-ckpt", default=None,
                   help="attn5 checkpoint for the grid scan (default: freshly initialised)")
    g.add_argument("--methods", nargs="+", choices=INFER_METHODS, default=list(INFER_METHODS))
    g.add_argument("--scan-batch", type=int, default=None,
                   help="tiles per forward pass of the attn5 grid scan "
                   "(default rtcnn.inference.SCAN_BATCH)")
    g.add_argument("--cases", nargs="+", choices=INFER_CASES, default=list(INFER_CASES),
                   help="same-grid (the pair as simulated) and/or survey (its reference on "
                   "a north-up coadd grid: every method aligns it first); default both")


def _survey_reference(ref_path: Path, work: Path) -> Path:
    """The pair's reference on a north-up grid of its diagonal (a one-exposure rtcnn.coadd)."""
    from rtcnn.coadd import coadd_images, north_up_grid, write_coadd
    from rtcnn.io import read_image

    ref = read_image(ref_path)
    grid, shape = north_up_grid(ref)
    return write_coadd(coadd_images([ref], grid, shape, workdir=work), work / "coadd_ref.fits")


def _infer_child_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("method", choices=INFER_METHODS)
    p.add_argument("ref")
    p.add_argument("new")
    p.add_argument("--workdir", required=True)
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS["infer"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--attn5-ckpt", default=None)
    p.add_argument("--scan-batch", type=int, default=None)


def _fresh_detector_ckpt(path: Path) -> Path:
    """Save an untrained ``conf/model/dense.yaml`` detector as an ``rtcnn.detect`` checkpoint."""
    import torch

    from rtcnn.tasks import build_task

    task = build_task("dense")
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams)}, path)
    return path


def _infer_child(args: argparse.Namespace) -> dict:
    """One method, warm-up + ``repeats`` timed runs, in this (fresh) process."""
    import contextlib

    import torch

    from rtcnn.inference import native_bf16, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    base = _current_rss_mib()
    work = Path(args.workdir)
    info: dict = {"method": args.method, "device": str(device),
                  "torch_threads": torch.get_num_threads()}
    if args.method == "detector":
        from rtcnn import detect

        ckpt = args.ckpt or _fresh_detector_ckpt(work / "untrained-dense.ckpt")
        info["model"] = str(args.ckpt) if args.ckpt else "untrained (freshly initialised)"
        out = work / "detector.ecsv"
        argv = [args.ref, args.new, "--ckpt", str(ckpt), "-o", str(out), "--overwrite",
                "--no-progress", "--device", str(device)]
        if args.threads:
            argv += ["--threads", str(args.threads)]

        def run():
            detect.main(argv)
    elif args.method == "baseline":
        from rtcnn import baseline

        out = work / "baseline.ecsv"
        argv = [args.ref, args.new, "-o", str(out), "--overwrite"]

        def run():
            baseline.main(argv)
    else:
        from rtcnn.align import read_aligned_pair
        from rtcnn.checkpoint import load_model
        from rtcnn.inference import SCAN_BATCH, scan_attn5
        from rtcnn.models.attn5 import Attn5
        from rtcnn.tasks import build_task

        if args.attn5_ckpt:  # read safely (weights_only), an rtcnn network only
            net = load_model(args.attn5_ckpt, expect=Attn5).net
        else:
            net = build_task("attn5").net
        net = net.eval().to(device)
        bf16 = native_bf16(device)
        info.update(model=str(args.attn5_ckpt or "untrained (freshly initialised)"),
                    precision="bf16" if bf16 else "fp32", batch=args.scan_batch or SCAN_BATCH)
        out = work / "attn5_scan.npy"

        def run():
            ref, new, _ = read_aligned_pair(args.ref, args.new)
            xy = scan_attn5(net, ref.filled(float("nan")), new.filled(float("nan")),
                            args.scan_batch or SCAN_BATCH, device, bf16)
            np.save(out, xy)
    times = []
    for i in range(args.repeats + 1):  # run 0 warms up (imports, page cache, primitives)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON result
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i:
            times.append(dt)
        else:
            info["warmup_s"] = round(dt, 3)
    info.update({
        "repeats": args.repeats, "seconds_median": round(statistics.median(times), 3),
        "seconds_min": round(min(times), 3), "seconds_max": round(max(times), 3),
        "seconds": [round(t, 3) for t in times],
        "peak_rss_mib": round(_peak_rss_mib(), 1), "after_import_rss_mib": round(base, 1),
    })
    if out.suffix == ".ecsv":
        from astropy.table import Table

        cat = Table.read(out)
        info["rows"] = len(cat)
        for key in ("n_candidates", "mode", "precision", "seconds"):
            if key in cat.meta:
                info[f"catalog_{key}"] = cat.meta[key]
    else:
        info["rows"] = int(np.load(out).shape[0])  # tiles scanned
    return info


def _infer_case(args: argparse.Namespace, ref: Path, new: Path, work: str, repeats: int,
                runs: dict) -> None:
    """Every method on one ``(ref, new)`` pair, each in a fresh process; fills ``runs``."""
    for method in args.methods:
        cmd = [sys.executable, "-m", "rtcnn.bench", "_infer", method, str(ref),
               str(new), "--workdir", work, "--repeats", str(repeats),
               "--device", args.device]
        for opt, value in (("--threads", args.threads), ("--ckpt", args.ckpt),
                           ("--attn5-ckpt", args.attn5_ckpt), ("--scan-batch", args.scan_batch)):
            if value:
                cmd += [opt, str(value)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-5:]
            runs[method] = {"error": " | ".join(tail)}
            print(f"  {method}: failed: {runs[method]['error']}", flush=True)
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["process_wall_s"] = round(wall, 2)
        runs[method] = r
        print(f"  {method:10s}: {r['seconds_median']:7.2f} s median (min "
              f"{r['seconds_min']:.2f}, max {r['seconds_max']:.2f}), peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB, {r['rows']} "
              f"{'tiles' if method == 'attn5_scan' else 'rows'}; "
              f"{r.get('model', 'classical')}", flush=True)


@register("infer", _infer_args)
def bench_infer(args: argparse.Namespace) -> dict:
    """Pair -> catalog seconds and peak memory: detector, baseline, attn5 grid scan, on the
    pair as simulated and (``--cases survey``) with its reference on a coadd grid."""
    from rtcnn.io import find_pairs

    repeats = _repeats(args, "infer")
    root, tmp = _pair_root(args, "epochs")
    try:
        pair = find_pairs(root)[0]
        shape = _image_shape(pair.ref)
        res = {"pair": str(pair.ref.parent), "image_shape": shape, "runs": {}}
        print(f"pair {pair.ref.parent} ({shape[1]} x {shape[0]} px), {repeats} timed runs "
              "after one warm-up, each method in a fresh process", flush=True)
        with tempfile.TemporaryDirectory(prefix="rtcnn-infer-") as work:
            for case in args.cases:
                if case == "same-grid":
                    ref, runs = pair.ref, res["runs"]
                else:
                    ref = _survey_reference(pair.ref, Path(work))
                    res["survey"] = {"reference": "the pair's reference on a north-up coadd "
                                     f"grid, {_image_shape(ref)[1]} px", "runs": {}}
                    runs = res["survey"]["runs"]
                    print(f"survey case: reference on a north-up {_image_shape(ref)[1]} px "
                          "coadd grid, aligned by every method", flush=True)
                _infer_case(args, ref, pair.new, work, repeats, runs)
        survey_det = res.get("survey", {}).get("runs", {}).get("detector", {})
        if "seconds_median" in survey_det:  # the budget: a 4088^2 survey pair in 3 s
            res["survey"]["targets"] = {"detector_s<=3": survey_det["seconds_median"] <= 3.0}
        det, base = res["runs"].get("detector", {}), res["runs"].get("baseline", {})
        if "seconds_median" in det and "seconds_median" in base:
            res["targets"] = {"detector_s<=baseline_s":
                              det["seconds_median"] <= base["seconds_median"]}
            print(f"  detector / baseline time: "
                  f"{det['seconds_median'] / base['seconds_median']:.2f}")
        return res
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _image_shape(path: Path) -> list[int]:
    from rtcnn.io import read_image

    return [int(v) for v in read_image(path).shape]


# --------------------------------------------------------------------------- command
# --------------------------------------------------------------------------- survey
SURVEY_SIZES = (1024, SCA_NPIX)  # px, sides of the pairs of the survey benchmark
SURVEY_PAIRS = 4  # pairs per size (links to one pair's files)
SURVEY_WORKERS = (1, 2)  # local Dask workers per run
OVERHEAD_LIMIT = 0.05  # per-task survey overhead, fraction of a 4088 px pair's time


def _survey_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("survey")
    g.add_argument("--survey-sizes", nargs="+", type=int, default=list(SURVEY_SIZES),
                   help="pair sides (px); a pair of each comes from --data when it holds "
                   "one of that size, else it is simulated")
    g.add_argument("--survey-pairs", type=int, default=SURVEY_PAIRS,
                   help="pairs per size (copies linking one pair's files)")
    g.add_argument("--survey-workers", nargs="+", type=int, default=list(SURVEY_WORKERS),
                   help="local Dask worker counts to run (one per GPU with --device cuda)")
    if not any("--ckpt" in a.option_strings for a in p._actions):  # shared with infer
        g.add_argument("--ckpt", default=None, help="detector checkpoint (default: untrained)")


def _survey_source(args: argparse.Namespace, size: int, work: Path) -> Path:
    """A pair directory of ``size`` px: the first one in ``--data`` with that shape, else
    one simulated (epochs mode) into ``work``."""
    from rtcnn.io import find_pairs

    if args.data and Path(args.data).exists():
        for pair in find_pairs(args.data):
            if pair.ref.is_file() and _image_shape(pair.ref) == [size, size]:
                return pair.ref.parent
    root = work / f"sim{size}"
    _make_pair(root, size, "epochs")
    return find_pairs(root)[0].ref.parent


def _linked_pairs(source: Path, folder: Path, n: int) -> Path:
    """``folder/pair_XXXX`` × ``n``, each linking ``source``'s ref.fits and new.fits."""
    for i in range(n):
        d = folder / f"pair_{i:04d}"
        d.mkdir(parents=True)
        for name in ("ref.fits", "new.fits"):
            (d / name).symlink_to((source / name).resolve())
    return folder


@register("survey", _survey_args)
def bench_survey(args: argparse.Namespace) -> dict:
    """Pairs per hour through ``rtcnn.survey`` (local Dask cluster, 1 and 2 workers) and
    through sequential ``rtcnn.detect`` on the same pairs; the per-task overhead."""
    import contextlib
    import io

    from distributed import get_task_stream

    from rtcnn import detect
    from rtcnn.distribute import open_cluster, run_survey, survey_pairs
    from rtcnn.pipeline import PairOptions

    device = str(_device(args))
    cores = os.cpu_count() or 1
    n = int(args.survey_pairs)
    if n < 2:
        raise RtcnnInputError(None, f"--survey-pairs must be >= 2, got {n}")
    res: dict = {"pairs_per_size": n, "device": device, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="rtcnn-survey-bench-") as tmp:
        work = Path(tmp)
        ckpt = args.ckpt or _fresh_detector_ckpt(work / "untrained-dense.ckpt")
        res["model"] = str(args.ckpt) if args.ckpt else "untrained (freshly initialised)"
        for size in args.survey_sizes:
            source = _survey_source(args, size, work)
            pairs_dir = _linked_pairs(source, work / f"pairs{size}", n)
            entry: dict = {"source": str(source), "runs": {}}
            print(f"{n} pairs of {size} x {size} px (links to {source})", flush=True)
            threads = args.threads or cores
            argv = [str(pairs_dir), "--ckpt", str(ckpt), "-o", str(work / f"seq{size}"),
                    "--no-progress", "--device", device, "--threads", str(threads)]
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # the catalog paths it prints
                detect.main(argv)
            wall = time.perf_counter() - t0
            entry["runs"]["sequential"] = {"wall_s": round(wall, 2), "torch_threads": threads,
                                           "s_per_pair": round(wall / n, 3),
                                           "pairs_per_hour": round(3600 * n / wall, 1)}
            print(f"  sequential rtcnn.detect: {wall / n:7.2f} s/pair, "
                  f"{3600 * n / wall:8.1f} pairs/h ({threads} threads)", flush=True)
            for workers in args.survey_workers:
                t0 = time.perf_counter()
                client, cluster, wthreads = open_cluster("local", workers, device,
                                                         max(1, threads // workers))
                startup = time.perf_counter() - t0
                done_at: list[float] = []
                try:
                    t1 = time.perf_counter()
                    with get_task_stream(client) as stream:
                        summary = run_survey(survey_pairs(pairs_dir),
                                             work / f"survey{size}-{workers}", client, ckpt,
                                             PairOptions(), threads=wthreads, device=device,
                                             progress=False,
                                             on_result=lambda row, ts=done_at: ts.append(
                                                 time.perf_counter()))  # fmt: skip
                    wall = time.perf_counter() - t1
                finally:
                    client.close()
                    cluster.close()
                rows = _manifest_rows(work / f"survey{size}-{workers}")
                secs = sorted(r["seconds"] for r in rows)
                steady = (done_at[-1] - done_at[0]) / (len(done_at) - 1)
                run = {"workers": workers, "torch_threads": wthreads,
                       "cluster_start_s": round(startup, 2), "wall_s": round(wall, 2),
                       "pairs_per_hour": round(3600 * n / wall, 1),
                       "steady_s_between_pairs": round(steady, 3),
                       "steady_pairs_per_hour": round(3600 / steady, 1),
                       "task_s_median": round(statistics.median(secs), 3),
                       "failed": len(summary.failed)}
                if workers == 1:  # one task at a time: the worker's time beyond the pairs' work
                    over = _task_overhead(stream.data, rows)
                    later = statistics.median(secs[:-1]) if len(secs) > 2 else secs[0]
                    run.update(over, overhead_s_per_task=over["task_overhead_s"],
                               overhead_fraction=round(over["task_overhead_s"] / later, 4),
                               client_steady_minus_pair_s=round(steady - later, 3))
                entry["runs"][f"survey_{workers}w"] = run
                print(f"  rtcnn.survey {workers} worker(s): {wall / n:7.2f} s/pair, "
                      f"{run['pairs_per_hour']:8.1f} pairs/h end to end (cluster start "
                      f"{startup:.1f} s apart), steady {run['steady_pairs_per_hour']:.1f} "
                      f"pairs/h" + (f"; per-task overhead {run['overhead_s_per_task']:.3f} s "
                                    f"({100 * run['overhead_fraction']:.1f} % of a pair)"
                                    if workers == 1 else ""), flush=True)
            res["sizes"][str(size)] = entry
    one = res["sizes"].get(str(SCA_NPIX), {}).get("runs", {}).get("survey_1w", {})
    if "overhead_fraction" in one:
        res["targets"] = {f"overhead<={OVERHEAD_LIMIT:.0%}_of_4088_pair":
                          one["overhead_fraction"] <= OVERHEAD_LIMIT}
    return res


def _task_overhead(stream: list[dict], rows: list[dict]) -> dict:
    """Per-task survey overhead on one worker from Dask's task stream: the compute time of
    each pair task beyond its pair's own seconds (``process_pair``: read, detect, write), and
    the idle gap between one task's end and the next one's start (medians, s)."""
    import itertools

    seconds = {r["pair"]: r["seconds"] for r in rows}
    spans = []
    for task in stream:
        pair = next((p for p in seconds if str(task["key"]).startswith(f"rtcnn-pair-{p}-")), None)
        for ss in task.get("startstops", ()):
            if ss["action"] == "compute" and pair is not None:
                spans.append((ss["start"], ss["stop"], pair))
    spans.sort()
    extra = [stop - start - seconds[pair] for start, stop, pair in spans]
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    extra_s = statistics.median(extra) if extra else float("nan")
    gap_s = statistics.median(gaps) if gaps else 0.0
    return {"task_compute_minus_pair_s": round(extra_s, 4), "task_gap_s": round(gap_s, 4),
            "task_overhead_s": round(extra_s + gap_s, 4)}


def _manifest_rows(outdir: Path) -> list[dict]:
    from rtcnn.distribute import MANIFEST_NAME, read_manifest

    rows, _ = read_manifest(outdir / MANIFEST_NAME)
    return [r for r in rows.values() if r["status"] == "done"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rtcnn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    for name in [*BENCHES, "all"]:
        p = sub.add_parser(name, help=f"run the {name} benchmark" if name != "all"
                           else "run every benchmark")
        p.add_argument("--out", default="outputs/bench",
                       help="folder for the JSON results (default: outputs/bench)")
        p.add_argument("--overwrite", action="store_true",
                       help="replace an existing OUT/bench-NAME.json")
        _common_args(p)
        for add in (ARGUMENTS.values() if name == "all" else [ARGUMENTS[name]]):
            add(p)
    stream = sub.add_parser("_stream", help=argparse.SUPPRESS)
    stream.add_argument("root")
    stream.add_argument("--batch-size", type=int, default=BENCH_BATCH)
    _infer_child_args(sub.add_parser("_infer", help=argparse.SUPPRESS))
    return parser


@cli_main
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.bench == "_stream":
        print(json.dumps(_stream_all(args.root, args.batch_size)))
        return {}
    if args.bench == "_infer":
        print(json.dumps(_infer_child(args)))
        return {}
    path = Path(args.out) / f"bench-{args.bench}.json"
    if path.parent.exists():  # refused before any work: existing results, unwritable folder
        check_output(path, args.overwrite, probe=True)
    else:
        check_output_dir(path.parent)
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise RtcnnInputError(None, f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    info = machine()
    info["torch_threads"] = torch.get_num_threads()
    info["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
          f"GPU {info['gpu'] or 'none'}; python {info['python']}, torch {info['torch']} "
          f"({info['torch_threads']} threads); load average "
          f"{info['load_average_start'][0]:.1f}")
    names = list(BENCHES) if args.bench == "all" else [args.bench]
    results = {"machine": info, "argv": sys.argv[1:] if argv is None else list(argv)}
    for name in names:
        print(f"== {name}")
        results[name] = BENCHES[name](args)
    info["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    if max(info["load_average_start"][0], info["load_average_end"][0]) > info["cores"]:
        print(f"note: the load average exceeded the {info['cores']} cores: other processes "
              "shared the CPUs, so wall-clock rates are low (with more than one torch thread "
              "much lower: OpenMP threads spin while they wait for a core)")
    make_output_dir(path.parent)
    write_results(results, path, args.overwrite)
    print(f"results written to {path}")
    return results


def write_results(results: dict, path: Path, overwrite: bool = False) -> Path:
    """Write the results as JSON, atomically (:func:`rtcnn.io.pairdir.atomic_write`): a crash
    leaves the previous file whole; an existing file is replaced only with ``overwrite``."""

    def writer(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=2)
            fh.write("\n")

    return atomic_write(path, overwrite, writer)


if __name__ == "__main__":
    main()
