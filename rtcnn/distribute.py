"""Many pairs on a Dask cluster: the engine of ``python -m rtcnn.survey``.

Every pair is one Dask task (:func:`run_pair`) that runs :func:`rtcnn.pipeline.process_pair`
on a worker with the detector that :class:`ModelPlugin` loaded once per worker.
:func:`run_survey` submits the pairs (:func:`survey_pairs`: a directory, a glob or a pair
list), keeps the Parquet manifest (:func:`write_manifest`, :func:`read_manifest`) up to
date, skips pairs whose outputs are intact, and merges the catalogs
(:func:`merge_catalogs`); :func:`open_cluster` starts or reaches the cluster
(``conf/cluster/*.yaml``, ``distributed.LocalCluster``, ``dask_jobqueue.SLURMCluster``, a
scheduler address). See :mod:`rtcnn.survey` for the command and the layout of OUTDIR.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rtcnn import __version__
from rtcnn.alerts import DEFAULT_CUTOUT_SIZE
from rtcnn.checkpoint import resolve_source
from rtcnn.errors import RtcnnInputError
from rtcnn.io import find_pairs
from rtcnn.io.pairdir import atomic_write
from rtcnn.pipeline import (
    Model,
    PairOptions,
    PairOutputs,
    PairResult,
    files_checksum,
    load_model,
    load_pair,
    process_pair,
)

__all__ = [
    "ModelPlugin",
    "SurveyPair",
    "SurveySummary",
    "cluster_config",
    "merge_catalogs",
    "open_cluster",
    "read_manifest",
    "run_pair",
    "run_survey",
    "survey_config",
    "survey_pairs",
    "write_manifest",
]

log = logging.getLogger(__name__)

CONF_CLUSTER = Path(__file__).resolve().parents[1] / "conf" / "cluster"
CATALOG_DIR = "catalogs"
ALERTS_DIR = "alerts"
CUTOUTS_DIR = "cutouts"
MANIFEST_NAME = "manifest.parquet"
MERGED_NAME = "survey.parquet"
SUMMARY_NAME = "summary.json"
DEFAULT_RETRIES = 2  # extra attempts of a failed pair task
MANIFEST_INTERVAL = 1.0  # s, shortest time between two manifest writes during a run
CORES_PER_CPU_WORKER = 4  # default local CPU workers: one per this many cores
PLUGIN_NAME = "rtcnn-model"
#: Manifest columns (pyarrow types are in :func:`manifest_schema`).
MANIFEST_COLUMNS = ("pair", "ref", "new", "status", "files", "checksum", "n_candidates",
                    "seconds", "band", "sca", "mjd", "worker", "finished", "error")
STATUSES = ("done", "failed", "pending")


# --------------------------------------------------------------------------- inputs
@dataclasses.dataclass(frozen=True)
class SurveyPair:
    """One pair of a survey: a unique name and its two images."""

    name: str
    ref: Path
    new: Path

    @property
    def stem(self) -> str:
        """File stem of the pair's outputs (``/`` of nested names → ``_``)."""
        return self.name.replace("/", "_")


def survey_pairs(spec: str | os.PathLike) -> list[SurveyPair]:
    """The pairs of ``PAIRS``: a pair list (``.ecsv``/``.csv``), a directory or a glob.

    Raises
    ------
    RtcnnInputError
        Nothing found, a list without ``ref``/``new`` columns, or two pairs whose outputs
        would share a name.
    """
    path = Path(spec)
    if path.is_file():
        pairs = _read_pair_list(path)
    else:
        pairs = [SurveyPair(p.name, Path(p.ref), Path(p.new)) for p in find_pairs(spec)]
    seen: dict[str, str] = {}
    for p in pairs:
        if p.stem in seen:
            raise RtcnnInputError(spec, f"pairs {seen[p.stem]!r} and {p.name!r} would write "
                                  f"the same catalog {p.stem}.ecsv; give them distinct names")
        seen[p.stem] = p.name
    return pairs


def _read_pair_list(path: Path) -> list[SurveyPair]:
    from rtcnn.io.catalogs import read_table

    table = read_table(path)
    missing = [c for c in ("ref", "new") if c not in table.colnames]
    if missing:
        raise RtcnnInputError(path, f"a pair list needs columns ref and new (found: "
                              f"{', '.join(table.colnames) or 'none'})")
    if len(table) == 0:
        raise RtcnnInputError(path, "the pair list is empty")

    def where(value) -> Path:
        p = Path(str(value)).expanduser()
        return p if p.is_absolute() else path.parent / p

    pairs = []
    for i, row in enumerate(table):
        ref, new = where(row["ref"]), where(row["new"])
        if "name" in table.colnames and str(row["name"]).strip():
            name = str(row["name"]).strip()
        else:
            name = f"{i:05d}_{_image_stem(new)}"
        pairs.append(SurveyPair(name, ref, new))
    return pairs


def _image_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".fz", ".fits", ".fit", ".asdf"):
        name = name.removesuffix(suffix)
    return name


# --------------------------------------------------------------------------- the worker side
try:  # the plugin base class; distributed is a dependency, but keep import errors readable
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover
    WorkerPlugin = object  # type: ignore[misc,assignment]


class ModelPlugin(WorkerPlugin):
    """Loads the detector once per Dask worker (at worker start) for the pair tasks.

    Parameters
    ----------
    ckpt : str
        Detector checkpoint.
    device : str
        ``cpu``, ``cuda`` (a worker named by an integer ``i`` takes GPU ``i`` modulo the
        GPUs it sees; otherwise the current GPU) or ``cuda:N``.
    threads : int, optional
        torch CPU threads of the worker (Dask's nanny sets ``OMP_NUM_THREADS=1``).
    """

    name = PLUGIN_NAME

    def __init__(self, ckpt: str, device: str = "cpu", threads: int | None = None):
        self.ckpt, self.device, self.threads = ckpt, device, threads
        self.model: Model | None = None
        self.error: str | None = None
        self.loads = 0  # times the model was loaded on this worker (tests: once)
        self.lock = threading.Lock()  # one detection at a time; reads overlap it

    def __getstate__(self):  # sent to the workers without the (unpicklable) lock
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def setup(self, worker) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        device = self.device
        if device == "cuda" and torch.cuda.is_available():
            index = _int_or_none(worker.name)
            if index is not None:
                device = f"cuda:{index % torch.cuda.device_count()}"
        try:
            self.model = load_model(self.ckpt, device)
            self.loads += 1
        except Exception as err:  # noqa: BLE001 - reported by every task of this worker
            self.error = _one_line(err)
            log.error("%s: cannot load the detector: %s", worker.name, self.error)


def _int_or_none(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _worker_plugin() -> tuple[ModelPlugin, str]:
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise RuntimeError("the rtcnn model plugin is not registered on this worker")
    if plugin.model is None:
        raise RuntimeError(f"the worker could not load the detector: {plugin.error}")
    return plugin, str(worker.name)


def run_pair(pair: SurveyPair, options: PairOptions, outputs: PairOutputs) -> dict:
    """The Dask task of one pair: :func:`rtcnn.pipeline.process_pair` with the worker's model.

    The pair is read (and aligned) first, then detected under the worker's lock: with two
    Dask threads per worker (``threads_per_worker`` / ``cores`` in ``conf/cluster/*.yaml``;
    the default is one) one task reads its pair while the other one's detection runs, as
    ``rtcnn.detect`` prefetches the next pair.

    Returns
    -------
    dict
        The manifest row of the pair (status ``done``; ``seconds`` = read + detect + write,
        without the wait for the lock) and, under ``table``, its catalog.
    """
    plugin, worker = _worker_plugin()
    t0 = time.perf_counter()
    images = load_pair(pair.ref, pair.new)
    read_s = time.perf_counter() - t0
    with plugin.lock:
        result = process_pair(pair.ref, pair.new, plugin.model, options, outputs,
                              name=pair.name, images=images)  # fmt: skip
    result = dataclasses.replace(result, seconds=result.seconds + read_s)
    files = [*result.files, *_product_files(outputs)]
    checksum = result.checksum if len(files) == len(result.files) else files_checksum(files)
    return {**_done_row(pair, result, worker, files, checksum), "table": result.table}


def _product_files(outputs: PairOutputs) -> list[Path]:
    """The alert packets and cutout files of a pair (sorted), for its checksum."""
    found = []
    for folder in (outputs.alerts, outputs.cutouts):
        if folder is not None and Path(folder).is_dir():
            found += sorted(p for p in Path(folder).iterdir()
                            if p.is_file() and not p.name.startswith("."))  # fmt: skip
    return found


def _done_row(pair: SurveyPair, result: PairResult, worker: str, files, checksum: str) -> dict:
    return {"pair": pair.name, "ref": str(pair.ref), "new": str(pair.new), "status": "done",
            "files": [str(f) for f in files], "checksum": checksum,
            "n_candidates": int(result.n_candidates), "seconds": float(result.seconds),
            "band": result.band, "sca": result.sca, "mjd": result.mjd, "worker": worker,
            "finished": _now(), "error": None}  # fmt: skip


def _row(pair: SurveyPair, status: str, error: str | None = None) -> dict:
    row = dict.fromkeys(MANIFEST_COLUMNS)
    row.update(pair=pair.name, ref=str(pair.ref), new=str(pair.new), status=status, files=[],
               error=error, finished=_now() if status == "failed" else None)
    return row


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _one_line(err: BaseException) -> str:
    """``Type: message`` on one line (an :class:`RtcnnInputError` as ``file: problem``)."""
    text = " ".join(str(err).split()) or repr(err)
    return text if isinstance(err, RtcnnInputError) else f"{type(err).__name__}: {text}"


# --------------------------------------------------------------------------- manifest
def manifest_schema(config: dict | None = None):
    """The manifest's :class:`pyarrow.Schema`; ``config`` goes to its metadata (JSON)."""
    import pyarrow as pa

    def unit(u):
        return {b"unit": u.encode()}

    fields = [
        pa.field("pair", pa.string(), nullable=False),
        pa.field("ref", pa.string()), pa.field("new", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # done | failed | pending
        pa.field("files", pa.list_(pa.string())),  # outputs, catalog first
        pa.field("checksum", pa.string()),  # SHA-256 of the outputs (pipeline.files_checksum)
        pa.field("n_candidates", pa.int64()),
        pa.field("seconds", pa.float64(), metadata=unit("s")),  # read + detect + write
        pa.field("band", pa.string()), pa.field("sca", pa.int64()),
        pa.field("mjd", pa.float64(), metadata=unit("d")),
        pa.field("worker", pa.string()),
        pa.field("finished", pa.timestamp("s", tz="UTC")),
        pa.field("error", pa.string()),  # one line, for failed pairs
    ]
    meta = {b"rtcnn_survey": json.dumps(config or {}, sort_keys=True).encode()}
    return pa.schema(fields, metadata=meta)


def write_manifest(path: str | os.PathLike, rows: Sequence[dict], config: dict) -> Path:
    """Write the manifest (Parquet) atomically: one row per pair, ``config`` in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = manifest_schema(config)
    table = pa.Table.from_pylist([{k: r.get(k) for k in MANIFEST_COLUMNS} for r in rows],
                                 schema=schema)  # fmt: skip
    return atomic_write(Path(path), True, lambda tmp: pq.write_table(table, tmp))


def read_manifest(path: str | os.PathLike) -> tuple[dict[str, dict], dict]:
    """Read a manifest: ``({pair: row}, config)``.

    Raises
    ------
    RtcnnInputError
        Not a readable rtcnn survey manifest.
    """
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = table.schema.metadata or {}
        config = json.loads(meta[b"rtcnn_survey"])
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise RtcnnInputError(path, f"not a readable survey manifest ({_one_line(err)})") from None
    return {row["pair"]: row for row in table.to_pylist()}, config


def _intact(row: dict | None, pair: SurveyPair) -> bool:
    """Whether the manifest says ``pair`` is done and its outputs still have their checksum."""
    if row is None or row.get("status") != "done":
        return False
    if row.get("ref") != str(pair.ref) or row.get("new") != str(pair.new):
        return False
    files = row.get("files") or []
    if not files or not all(os.path.isfile(f) for f in files):
        return False
    try:
        return files_checksum(files) == row.get("checksum")
    except OSError:
        return False


# --------------------------------------------------------------------------- the client side
@dataclasses.dataclass
class SurveySummary:
    """What a survey run did (also written as ``summary.json``)."""

    pairs: int
    done: int  # processed in this run
    skipped: int  # already done with intact outputs
    failed: dict[str, str]  # pair -> one-line error
    candidates: int  # in the merged catalog
    seconds_median: float | None  # per pair (read + detect + write), all done pairs
    seconds_p95: float | None
    wall_seconds: float
    manifest: str
    catalog: str | None

    def lines(self) -> list[str]:
        """The human summary printed at the end of a run."""
        per = ("" if self.seconds_median is None else
               f"; per pair {self.seconds_median:.2f} s median, {self.seconds_p95:.2f} s p95")
        out = [(f"rtcnn.survey: {self.pairs} pairs: {self.done} done, {self.skipped} skipped "
                f"(already done), {len(self.failed)} failed; "
                f"{self.candidates} candidates{per}; {self.wall_seconds:.1f} s")]
        if self.catalog:
            out.append(f"  catalog: {self.catalog}")
        out.append(f"  manifest: {self.manifest}")
        if self.failed:
            out.append(f"  failed pairs ({len(self.failed)}; a rerun retries them):")
            out += [f"    {name}: {err}" for name, err in self.failed.items()]
        return out


def survey_config(ckpt: str | os.PathLike, options: PairOptions, regions: bool,
                  alerts: bool = False, cutouts: int | None = None) -> dict:
    """The settings that make a survey's outputs what they are (compared on a rerun)."""
    opts = dataclasses.asdict(options)
    opts.pop("overwrite")
    path = Path(ckpt)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    sha = hashlib.sha256()
    for f in files:  # a checkpoint file, or a bundle's weights and card
        sha.update(f.read_bytes())
    digest = sha.hexdigest()
    return {"ckpt": os.path.abspath(ckpt), "ckpt_sha256": digest, "options": opts,
            "regions": bool(regions), "products": {"alerts": bool(alerts), "cutouts": cutouts},
            "rtcnn": __version__}  # fmt: skip


def _check_config(old: dict, new: dict, manifest: Path) -> None:
    keys = [k for k in ("ckpt_sha256", "options", "regions", "products")
            if old.get(k) != new.get(k)]
    if keys:
        what = ", ".join({"ckpt_sha256": "checkpoint"}.get(k, k) for k in keys)
        raise RtcnnInputError(manifest, f"this survey was run with another {what}; use a new "
                              "output directory, or --overwrite to redo every pair")


def run_survey(
    pairs: Sequence[SurveyPair],
    outdir: str | os.PathLike,
    client,
    ckpt: str | os.PathLike,
    options: PairOptions | None = None,
    *,
    regions: bool = False,
    alerts: bool = False,
    cutouts: int | None = None,
    retries: int = DEFAULT_RETRIES,
    overwrite: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    progress: bool = True,
    on_result: Callable[[dict], None] | None = None,
) -> SurveySummary:
    """Run every pair as a Dask task on ``client``'s cluster; resumable (see the module doc).

    Parameters
    ----------
    pairs : sequence of SurveyPair
    outdir : path-like
        Output directory (created).
    client : distributed.Client
    ckpt : path-like
        Detector checkpoint, loaded once per worker (:class:`ModelPlugin`).
    options : PairOptions, optional
        Detection settings (default :class:`PairOptions`); ``overwrite`` is ignored (see
        ``overwrite``).
    regions : bool
        Also write DS9 region files.
    alerts : bool
        Also write LSST Avro alert packets, ``OUTDIR/alerts/<pair>/`` (:mod:`rtcnn.alerts`).
    cutouts : int, optional
        Also write ref/new/difference cutouts of this size (px), ``OUTDIR/cutouts/<pair>/``.
    retries : int
        Extra attempts of a failed pair task (Dask ``retries``).
    overwrite : bool
        Ignore an existing manifest and redo every pair, replacing its outputs.
    threads : int, optional
        torch CPU threads per worker.
    device : str
        Device of the workers: ``cpu``, ``cuda`` or ``cuda:N``; with CUDA every task asks
        for half of the worker resource ``GPU=1`` (the worker lock serialises detections).
    progress : bool
        tqdm progress bar.
    on_result : callable, optional
        Called with each finished manifest row (done or failed) on the client.

    Returns
    -------
    SurveySummary

    Raises
    ------
    KeyboardInterrupt
        After the manifest was written (pairs not finished are ``pending``).
    RtcnnInputError
        Bad checkpoint, existing outputs not made by this survey, or a rerun with other
        settings (without ``overwrite``).
    """
    from distributed import as_completed

    t0 = time.perf_counter()
    options = PairOptions() if options is None else options
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise RtcnnInputError(outdir, "exists and is not a directory")
    catdir = outdir / CATALOG_DIR
    manifest_path = outdir / MANIFEST_NAME
    load_model(ckpt, "cpu")  # a bad checkpoint is one line here, not a failure per pair
    ckpt = resolve_source(ckpt)[1]  # a shipped name -> its bundle directory (workers load it)
    if device.startswith("cuda"):
        _check_gpu_workers(client)
    config = survey_config(ckpt, options, regions, alerts, cutouts)
    old: dict[str, dict] = {}
    if manifest_path.exists() and not overwrite:
        old, old_config = read_manifest(manifest_path)
        _check_config(old_config, config, manifest_path)
    options = dataclasses.replace(options, overwrite=True)  # see below: outputs are ours

    def outputs_of(pair: SurveyPair) -> PairOutputs:
        return PairOutputs(catdir / f"{pair.stem}.ecsv",
                           catdir / f"{pair.stem}.reg" if regions else None,
                           alerts=outdir / ALERTS_DIR / pair.stem if alerts else None,
                           cutouts=outdir / CUTOUTS_DIR / pair.stem if cutouts else None,
                           cutout_size=cutouts or DEFAULT_CUTOUT_SIZE)  # fmt: skip

    rows: dict[str, dict] = {name: row for name, row in old.items()}  # other pairs kept
    todo, skipped = [], []
    for pair in pairs:
        if _intact(old.get(pair.name), pair):
            skipped.append(pair)
        else:
            todo.append(pair)
            rows[pair.name] = _row(pair, "pending")
            if not overwrite and pair.name not in old:
                out = outputs_of(pair)  # never replace what we did not write
                for path in [*out.paths(), *(p for p in (out.alerts, out.cutouts) if p)]:
                    if path.exists():
                        raise RtcnnInputError(path, "already exists and is not in the survey "
                                              "manifest; pass --overwrite to replace it")
    catdir.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest_path, list(rows.values()), config)

    tables: dict[str, object] = {}
    failed: dict[str, str] = {}
    interrupted = False
    if todo:
        # half a GPU: two tasks per GPU worker, one reading while the other detects (lock)
        resources = {"GPU": 0.5} if device.startswith("cuda") else None
        plugin = ModelPlugin(os.path.abspath(ckpt), device, threads)
        _register(client, plugin)
        futures = {}
        for pair in todo:
            fut = client.submit(run_pair, pair, options, outputs_of(pair), pure=False,
                                retries=retries, resources=resources,
                                key=f"rtcnn-pair-{pair.stem}-{os.urandom(4).hex()}")  # fmt: skip
            futures[fut] = pair
        bar = tqdm(total=len(todo), desc="pairs", unit="pair", disable=not progress,
                   dynamic_ncols=True)
        last_write = time.monotonic()
        done_futures = set()
        try:
            for fut in as_completed(list(futures)):
                pair = futures[fut]
                done_futures.add(fut)
                if fut.status == "finished":
                    row = fut.result()
                    tables[pair.name] = row.pop("table")
                else:  # error (after the retries) or cancelled (e.g. the scheduler went away)
                    err = fut.exception() if fut.status == "error" else None
                    row = _row(pair, "failed", _one_line(err) if err else f"task {fut.status}")
                    failed[pair.name] = row["error"]
                    log.warning("%s: failed: %s", pair.name, row["error"])
                rows[pair.name] = row
                fut.release()
                bar.update(1)
                if on_result is not None:
                    on_result(row)
                if time.monotonic() - last_write >= MANIFEST_INTERVAL:
                    write_manifest(manifest_path, list(rows.values()), config)
                    last_write = time.monotonic()
        except KeyboardInterrupt:
            interrupted = True
            client.cancel([f for f in futures if f not in done_futures])
            raise
        finally:
            bar.close()
            write_manifest(manifest_path, list(rows.values()), config)
            if interrupted:
                n_done = sum(r["status"] == "done" for r in rows.values())
                print(f"rtcnn.survey: interrupted; the manifest {manifest_path} records "
                      f"{n_done} pairs done; run the same command again to resume",
                      file=sys.stderr)

    names = [p.name for p in pairs]
    done_rows = [rows[n] for n in names if rows[n]["status"] == "done"]
    merged = merge_catalogs(done_rows, outdir / MERGED_NAME, config, tables) if done_rows else None
    if merged is None and (outdir / MERGED_NAME).is_file():
        (outdir / MERGED_NAME).unlink()  # no pair done now: no stale survey catalog
    seconds = np.array([r["seconds"] for r in done_rows], float)
    summary = SurveySummary(
        pairs=len(pairs), done=len(todo) - len(failed), skipped=len(skipped), failed=failed,
        candidates=int(sum(r["n_candidates"] for r in done_rows)),
        seconds_median=float(np.median(seconds)) if len(seconds) else None,
        seconds_p95=float(np.percentile(seconds, 95)) if len(seconds) else None,
        wall_seconds=time.perf_counter() - t0, manifest=str(manifest_path),
        catalog=None if merged is None else str(merged),
    )
    text = json.dumps(dataclasses.asdict(summary), indent=2) + "\n"
    atomic_write(outdir / SUMMARY_NAME, True, lambda tmp: Path(tmp).write_text(text))
    return summary


def _register(client, plugin: ModelPlugin) -> None:
    """Register the model plugin on every worker (and on the workers that join later)."""
    client.register_plugin(plugin, name=PLUGIN_NAME)


def _check_gpu_workers(client) -> None:
    """With CUDA every task asks for the resource ``GPU``: refuse a cluster whose workers offer none
    (the tasks would wait for ever). Workers still to come (SLURM jobs in the queue) pass."""
    workers = client.scheduler_info().get("workers", {})
    if workers and not any((w.get("resources") or {}).get("GPU") for w in workers.values()):
        raise RtcnnInputError(None, f"--device cuda: none of the {len(workers)} Dask workers "
                              "offers the resource GPU (start them with --resources GPU=1, "
                              "as conf/cluster/slurm_gpu_example.yaml does)")


def merge_catalogs(rows: Sequence[dict], path: str | os.PathLike, config: dict,
                   tables: dict | None = None) -> Path:
    """Write every candidate of the done pairs ``rows`` to one Parquet file, atomically.

    Each pair's catalog (from ``tables`` when given, else read from its ECSV file) gets
    the columns ``pair``, ``sca``, ``band`` and ``mjd`` (d) in front; the units of every
    column are in the file's metadata (astropy's Parquet writer), read back by
    ``Table.read(path)``.
    """
    import astropy.units as u
    from astropy.table import Table, vstack

    from rtcnn.catalog import read_catalog

    parts = []
    for row in rows:
        table = (tables or {}).get(row["pair"])
        table = read_catalog(row["files"][0]) if table is None else Table(table, copy=False)
        n = len(table)
        head = Table({
            "pair": np.full(n, row["pair"], dtype=object).astype(str),
            "sca": np.full(n, -1 if row["sca"] is None else row["sca"], dtype=np.int16),
            "band": np.full(n, row["band"] or "", dtype=object).astype(str),
            "mjd": np.full(n, np.nan if row["mjd"] is None else row["mjd"]) * u.d,
        })
        parts.append((head, table))
    merged = vstack([_hstack(h, t) for h, t in parts], metadata_conflicts="silent",
                    join_type="outer")
    merged.meta = {"survey": config, "pairs": len(rows), "rtcnn": __version__,
                   "columns": "pair, sca (-1: unknown), band, mjd (NaN: unknown), then the "
                   "per-pair catalog columns (rtcnn.catalog)"}
    return atomic_write(Path(path), True,
                        lambda tmp: merged.write(tmp, format="parquet", overwrite=True))


def _hstack(head, table):
    from astropy.table import hstack

    table = table.copy(copy_data=False)
    table.meta = {}
    return hstack([head, table], metadata_conflicts="silent")


# --------------------------------------------------------------------------- clusters
def cluster_config(name: str) -> dict | None:
    """The YAML of ``--cluster NAME`` (``conf/cluster/NAME.yaml`` or a path), else None."""
    from omegaconf import OmegaConf

    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONF_CLUSTER / f"{name}.yaml"
        if not re.fullmatch(r"[\w.-]+", name) or not path.is_file():
            return None
    if not path.is_file():
        raise RtcnnInputError(path, "no such cluster configuration")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # noqa: BLE001 - yaml/omegaconf raise many types
        raise RtcnnInputError(path, f"not a readable YAML file ({_one_line(err)})") from None
    if not isinstance(cfg, dict) or cfg.get("kind") not in ("local", "slurm"):
        raise RtcnnInputError(path, "a cluster configuration needs kind: local or slurm")
    cfg.setdefault("cluster", {})
    return cfg


def open_cluster(spec: str = "local", workers: int | None = None, device: str = "cpu",
                 threads: int | None = None):
    """Start or reach a Dask cluster; returns ``(client, cluster or None, threads)``.

    Parameters
    ----------
    spec : str
        ``local``, ``slurm``, another ``conf/cluster/<name>.yaml`` or a YAML path, a
        scheduler address (``tcp://host:8786``) or a scheduler JSON file.
    workers : int, optional
        Workers to start (local: processes; SLURM: jobs); default from the YAML.
    device : str
        With ``cuda`` a local cluster starts one worker per GPU, each with the resource
        ``GPU=1``.
    threads : int, optional
        torch threads per worker; default from the YAML, else the cores shared out.
    """
    from distributed import Client

    if workers is not None and workers < 1:
        raise RtcnnInputError(None, f"--workers must be >= 1, got {workers}")
    cfg = cluster_config(spec)
    if cfg is None:  # a running scheduler
        if os.path.isfile(spec):
            return Client(scheduler_file=spec), None, threads
        try:
            return Client(spec, timeout="20s"), None, threads
        except (OSError, ValueError, TypeError) as err:
            raise RtcnnInputError(None, f"--cluster {spec}: not local, slurm, a "
                                  f"conf/cluster/*.yaml name or a reachable scheduler "
                                  f"address ({_one_line(err)})") from None
    kwargs = dict(cfg["cluster"])
    n = workers or cfg.get("workers")
    threads = threads or cfg.get("threads")
    if cfg["kind"] == "local":
        from distributed import LocalCluster

        gpu = device.startswith("cuda")
        if n is None:
            if gpu:
                import torch

                n = max(1, torch.cuda.device_count()) if device == "cuda" else 1
            else:
                n = max(1, (os.cpu_count() or 1) // CORES_PER_CPU_WORKER)
        if gpu:
            kwargs["resources"] = {"GPU": 1}
        threads = threads or max(1, (os.cpu_count() or 1) // n)
        cluster = LocalCluster(n_workers=n, **kwargs)
    else:
        from dask_jobqueue import SLURMCluster

        cores = int(kwargs.get("job_cpu") or kwargs.get("cores") or 1)
        threads = threads or max(1, cores // int(kwargs.get("processes") or 1))
        cluster = SLURMCluster(**kwargs)
        cluster.scale(n=n or 1)
    return Client(cluster), cluster, threads
