"""``python -m rtcnn.survey``: many pairs on a real Dask cluster (2 workers), resumable."""

from __future__ import annotations

import os
import shutil
import signal
import threading

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.table import Table

from rtcnn.detect import main as detect_main
from rtcnn.distribute import (
    CONF_CLUSTER,
    MANIFEST_NAME,
    MERGED_NAME,
    PLUGIN_NAME,
    cluster_config,
    read_manifest,
    run_survey,
    survey_pairs,
)
from rtcnn.errors import RtcnnInputError
from rtcnn.pipeline import PairOptions, files_checksum
from rtcnn.survey import main

LOW = 0.01  # a threshold at which the untrained test detector reports a few candidates
OPTIONS = PairOptions(threshold=LOW)


@pytest.fixture(scope="module")
def sequential(small_pairs, tiny_detector_ckpt, tmp_path_factory):
    """The catalogs of sequential ``rtcnn.detect`` on the six pairs: {pair: Table}."""
    out = tmp_path_factory.mktemp("sequential")
    assert detect_main([str(small_pairs), "--ckpt", str(tiny_detector_ckpt), "-o", str(out),
                        "--threshold", str(LOW), "--no-progress"]) == 0  # fmt: skip
    return {p.stem: Table.read(p, format="ascii.ecsv") for p in sorted(out.glob("*.ecsv"))}


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 single-thread workers in this process (threads: fast start)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as c:  # fmt: skip
        yield c


@pytest.fixture(scope="module")
def forkserver():
    """Worker processes from a fork server that has imported rtcnn (and torch): they start in
    a second instead of importing them again, and, unlike a plain fork of this
    many-threaded process, cannot inherit a lock held by another thread."""
    import dask
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(["distributed", "rtcnn.distribute"])
        yield


def assert_same_catalog(got: Table, want: Table) -> None:
    """Row for row, column for column (values and units), metadata but the timings."""
    assert got.colnames == want.colnames and len(got) == len(want)
    for name in want.colnames:
        a, b = np.asarray(got[name]), np.asarray(want[name])
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        assert got[name].unit == want[name].unit, name
    assert {k: v for k, v in got.meta.items() if "seconds" not in k} == {
        k: v for k, v in want.meta.items() if "seconds" not in k}


def check_complete(out, sequential) -> None:
    """Every pair done in the manifest, with intact outputs equal to sequential detect."""
    rows, _ = read_manifest(out / MANIFEST_NAME)
    assert sorted(rows) == sorted(sequential)
    for name, want in sequential.items():
        row = rows[name]
        assert row["status"] == "done" and row["error"] is None
        assert row["files"] == [str(out / "catalogs" / f"{name}.ecsv")]
        assert files_checksum(row["files"]) == row["checksum"]
        assert row["n_candidates"] == len(want)
        assert_same_catalog(Table.read(row["files"][0], format="ascii.ecsv"), want)


def test_survey_equals_sequential_detect_merges_and_resumes(small_pairs, tiny_detector_ckpt,
                                                            sequential, client, tmp_path):
    pairs = survey_pairs(small_pairs)
    assert [p.name for p in pairs] == sorted(sequential)
    out = tmp_path / "survey"
    summary = run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, progress=False)
    assert (summary.done, summary.skipped, summary.failed) == (6, 0, {})
    check_complete(out, sequential)
    assert sum(len(t) for t in sequential.values()) == summary.candidates > 0
    # the model was loaded once per worker, and both workers worked
    loads = client.run(lambda dask_worker: dask_worker.plugins[PLUGIN_NAME].loads)
    assert sorted(loads.values()) == [1, 1]
    rows, _ = read_manifest(out / MANIFEST_NAME)
    assert len({r["worker"] for r in rows.values()}) == 2

    # the merged Parquet: every candidate, the pair's SCA/band/MJD, the units
    merged = Table.read(out / MERGED_NAME)
    assert merged.colnames[:4] == ["pair", "sca", "band", "mjd"]
    assert len(merged) == summary.candidates and str(merged["mjd"].unit) == "d"
    for name, want in sequential.items():
        part = merged[merged["pair"] == name]
        assert len(part) == len(want)
        assert set(part["sca"]) <= {rows[name]["sca"]} and set(part["band"]) <= {"H158"}
        for col in want.colnames:
            assert part[col].unit == want[col].unit, col
            a, b = np.asarray(part[col]), np.asarray(want[col])
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), col
    assert pq.read_schema(out / MANIFEST_NAME).field("seconds").metadata == {b"unit": b"s"}

    # a rerun does no work: nothing submitted, nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "catalogs").iterdir()}
    transitions = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)
    again = run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, progress=False)
    assert (again.done, again.skipped, again.failed) == (0, 6, {})
    assert {p: p.stat().st_mtime_ns for p in (out / "catalogs").iterdir()} == mtimes
    assert client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.transition_counter) == transitions  # no task
    assert Table.read(out / MERGED_NAME).colnames == merged.colnames

    # a damaged output is redone (its checksum no longer matches), the rest are skipped
    victim = out / "catalogs" / "pair_0003.ecsv"
    victim.write_text(victim.read_text().replace("0.", "9.", 1))
    third = run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, progress=False)
    assert (third.done, third.skipped) == (1, 5)
    check_complete(out, sequential)

    # GPU pair tasks ask for the worker resource GPU=1: a cluster without it is refused
    with pytest.raises(RtcnnInputError, match="none of the 2 Dask workers offers the resource"):
        run_survey(pairs, tmp_path / "gpu", client, tiny_detector_ckpt, OPTIONS, device="cuda",
                   progress=False)  # fmt: skip
    assert not (tmp_path / "gpu").exists()

    # other settings into the same directory are refused (nothing silently mixed)
    with pytest.raises(RtcnnInputError, match="another options; use a new output directory"):
        run_survey(pairs, out, client, tiny_detector_ckpt, PairOptions(threshold=0.5),
                   progress=False)  # fmt: skip


def test_ctrl_c_leaves_a_consistent_manifest(small_pairs, tiny_detector_ckpt, sequential,
                                             client, tmp_path):
    pairs = survey_pairs(small_pairs)
    out = tmp_path / "survey"
    seen = []

    def interrupt(row):
        seen.append(row["pair"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, progress=False,
                   on_result=interrupt)  # fmt: skip
    rows, _ = read_manifest(out / MANIFEST_NAME)
    assert sorted(rows) == sorted(sequential)
    done = [n for n, r in rows.items() if r["status"] == "done"]
    assert set(seen) <= set(done) and {r["status"] for r in rows.values()} <= {"done", "pending"}
    for name in done:  # every pair the manifest calls done has its intact outputs
        assert files_checksum(rows[name]["files"]) == rows[name]["checksum"]
    resumed = run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, progress=False)
    assert resumed.skipped == len(done) and resumed.done == 6 - len(done)
    check_complete(out, sequential)


def test_alerts_and_cutouts_are_outputs_of_the_pair(small_pairs, tiny_detector_ckpt,
                                                   sequential, client, tmp_path):
    pairs = [p for p in survey_pairs(small_pairs) if len(sequential[p.name])][:2]
    out = tmp_path / "survey"
    summary = run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, alerts=True,
                         cutouts=15, progress=False)  # fmt: skip
    assert (summary.done, summary.failed) == (2, {})
    rows, config = read_manifest(out / MANIFEST_NAME)
    assert config["products"] == {"alerts": True, "cutouts": 15}
    for pair in pairs:
        row, n = rows[pair.name], len(sequential[pair.name])
        packets = sorted((out / "alerts" / pair.name).glob("*.avro"))
        stamps = sorted(p for p in (out / "cutouts" / pair.name).iterdir() if p.is_file())
        assert len(packets) == n and stamps
        assert row["files"] == [str(out / "catalogs" / f"{pair.name}.ecsv"),
                                *map(str, packets), *map(str, stamps)]
        assert files_checksum(row["files"]) == row["checksum"]
    packets[0].unlink()  # a lost packet: its pair is redone, the other one skipped
    again = run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, alerts=True,
                       cutouts=15, progress=False)  # fmt: skip
    assert (again.done, again.skipped) == (1, 1) and packets[0].is_file()
    with pytest.raises(RtcnnInputError, match="another products"):
        run_survey(pairs, out, client, tiny_detector_ckpt, OPTIONS, progress=False)


def test_a_broken_pair_is_recorded_and_the_rest_finish(small_pairs, tiny_detector_ckpt,
                                                       sequential, client, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(small_pairs, data)
    broken = data / "pair_0002" / "new.fits"
    broken.write_bytes(broken.read_bytes()[:5000])  # a truncated FITS file
    out = tmp_path / "survey"
    address = client.scheduler.address  # the command reaches a running scheduler
    code = main([str(data), "-o", str(out), "--ckpt", str(tiny_detector_ckpt), "--cluster",
                 address, "--threshold", str(LOW), "--retries", "1", "--no-progress"])
    assert code == 1
    printed = capsys.readouterr().out
    assert "5 done, 0 skipped (already done), 1 failed" in printed
    assert f"pair_0002: {broken}: " in printed.split("failed pairs")[1]
    rows, _ = read_manifest(out / MANIFEST_NAME)
    assert rows["pair_0002"]["status"] == "failed"
    assert str(broken) in rows["pair_0002"]["error"] and "\n" not in rows["pair_0002"]["error"]
    good = {k: v for k, v in sequential.items() if k != "pair_0002"}
    for name, want in good.items():
        got = Table.read(out / "catalogs" / f"{name}.ecsv", format="ascii.ecsv")
        want = want.copy()
        want.meta["ref"] = want.meta["ref"].replace(str(small_pairs), str(data))
        want.meta["new"] = want.meta["new"].replace(str(small_pairs), str(data))
        assert_same_catalog(got, want)
    assert set(Table.read(out / MERGED_NAME)["pair"]) <= set(good)
    assert not (out / "catalogs" / "pair_0002.ecsv").exists()


def test_a_worker_killed_mid_run_loses_nothing(small_pairs, tiny_detector_ckpt, sequential,
                                               tmp_path, forkserver):
    """Worker processes (the kill needs one): SIGKILL a worker while it holds pair tasks.

    The worker processes come from the ``forkserver`` fixture; their torch runs on one thread.
    """
    from distributed import Client, LocalCluster

    pairs = survey_pairs(small_pairs)
    out = tmp_path / "survey"
    killed = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as c:  # fmt: skip
        lock = threading.Lock()

        def kill(row):
            with lock:
                if killed:
                    return
                busy = {w: ts for w, ts in c.processing().items() if ts}
                if not busy:
                    return
                worker = min(busy)
                pid = c.run(os.getpid, workers=[worker])[worker]
                killed.update(worker=worker, pid=pid, tasks=busy[worker])
                os.kill(pid, signal.SIGKILL)

        summary = run_survey(pairs, out, c, tiny_detector_ckpt, OPTIONS, progress=False,
                             threads=1, on_result=kill)  # fmt: skip
    assert killed and killed["tasks"], "no worker was busy when the first pair finished"
    assert (summary.done, summary.failed) == (6, {})
    check_complete(out, sequential)
    assert not list((out / "catalogs").glob(".*.tmp"))  # no partial output left behind


def test_pair_lists_and_cluster_configs(small_pairs, tmp_path):
    from rtcnn.io.openuniverse import write_pair_list

    listed = Table({"name": ["a", "b"],
                    "ref": [str(small_pairs / "pair_0000" / "ref.fits"), "p1/ref.fits"],
                    "new": [str(small_pairs / "pair_0000" / "new.fits"), "p1/new.fits"]})
    for suffix in ("ecsv", "csv"):
        path = write_pair_list(listed, tmp_path / f"pairs.{suffix}")
        pairs = survey_pairs(path)
        assert [p.name for p in pairs] == ["a", "b"]
        assert pairs[0].new == small_pairs / "pair_0000" / "new.fits"
        assert pairs[1].ref == tmp_path / "p1" / "ref.fits"  # relative to the list
    bad = write_pair_list(Table({"new": ["x.fits"]}), tmp_path / "bad.ecsv")
    with pytest.raises(RtcnnInputError, match="needs columns ref and new"):
        survey_pairs(bad)
    assert [p.name for p in survey_pairs(str(small_pairs / "pair_000[12]"))] == [
        "pair_0001", "pair_0002"]

    # the SLURM configurations build real dask-jobqueue job scripts
    from dask_jobqueue import SLURMCluster

    assert {p.stem for p in CONF_CLUSTER.glob("*.yaml")} >= {"local", "slurm",
                                                              "slurm_gpu_example"}
    for name, expect in (("slurm", ["#SBATCH -p regular", "#SBATCH -t 02:00:00",
                                    "#SBATCH --cpus-per-task=8", "--nthreads 1"]),
                         ("slurm_gpu_example", ["#SBATCH --constraint=gpu",
                                                "#SBATCH --gpus-per-task=1",
                                                "#SBATCH --cpus-per-task=16", "--nthreads 1",
                                                "module load pytorch", "--resources GPU=1"])):
        cfg = cluster_config(name)
        assert cfg["kind"] == "slurm" and cfg["workers"] >= 1
        # the site's network interface (the GPU example's hsn0) does not exist here
        with SLURMCluster(**{**cfg["cluster"], "interface": None}) as cluster:
            script = cluster.job_script()
        for line in expect:
            assert line in script, (name, line)
    assert cluster_config("local")["kind"] == "local"
    assert cluster_config("tcp://127.0.0.1:8786") is None


def test_user_mistakes_exit_2(small_pairs, tiny_detector_ckpt, tmp_path, capsys):
    cases = [
        (["--ckpt", str(tmp_path / "none.ckpt")], "none.ckpt: no such checkpoint file"),
        (["--ckpt", str(tiny_detector_ckpt), "--workers", "0"], "--workers must be >= 1"),
        (["--ckpt", str(tiny_detector_ckpt), "--threshold", "2"], "--threshold must lie in"),
        (["--ckpt", str(tiny_detector_ckpt), "--cluster", str(tmp_path / "c.yaml")],
         "c.yaml: no such cluster configuration"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_:
            main([str(small_pairs), "-o", str(tmp_path / "o"), *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("rtcnn: error: ") and message in err, err
    assert not (tmp_path / "o").exists()


def test_bench_survey_case_records_rates_and_overhead(small_pairs, tiny_detector_ckpt,
                                                      tmp_path, forkserver):
    """``python -m rtcnn.bench survey`` on 3 copies of a 96 px pair, 1 worker."""
    import json

    from rtcnn.bench import main as bench_main

    bench_main(["survey", "--data", str(small_pairs / "pair_0000"), "--survey-sizes", "96",
                "--survey-pairs", "3", "--survey-workers", "1", "--ckpt",
                str(tiny_detector_ckpt), "--threads", "1", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench-survey.json").read_text())
    runs = saved["survey"]["sizes"]["96"]["runs"]
    assert set(runs) == {"sequential", "survey_1w"}
    assert runs["sequential"]["pairs_per_hour"] > 0 and runs["survey_1w"]["failed"] == 0
    one = runs["survey_1w"]
    assert one["pairs_per_hour"] > 0 and one["task_s_median"] > 0
    # the task stream was read: a pair task's compute span holds the pair's own work
    assert 0 <= one["task_compute_minus_pair_s"] < 0.5 * one["task_s_median"]
    assert np.isfinite(one["task_overhead_s"]) and np.isfinite(one["overhead_fraction"])


def test_the_shipped_detector_is_the_default_model(small_pairs, client, tmp_path, capsys):
    out = tmp_path / "survey"
    address = client.scheduler.address
    args = [str(small_pairs), "-o", str(out), "--cluster", address, "--no-progress"]
    assert main(args) == 0
    rows, config = read_manifest(out / MANIFEST_NAME)
    assert {r["status"] for r in rows.values()} == {"done"} and len(rows) == 6
    assert config["ckpt"].endswith(os.path.join("weights", "dense"))
    assert main(args) == 0  # a rerun with the same shipped model does no work
    assert "0 done, 6 skipped (already done)" in capsys.readouterr().out
