"""``data=openuniverse data.root=s3://...`` against a real S3 server on localhost.

The server is moto in server mode (werkzeug, moto's own request handler and backends),
run in a thread on 127.0.0.1 with a WSGI wrapper that records every request, so the
tests see exactly what the real ``s3fs`` client asks for. The bucket is public-read,
like the archive, and is read anonymously (the default); it holds the RomanTDS tree
that ``tests/ou_layout.py`` writes for the OpenUniverse tests, under the archive's key
prefix. Nothing of the client is mocked.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
from astropy.io import fits
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from numpy.testing import assert_allclose, assert_array_equal
from werkzeug.serving import make_server

import ou_layout
from rtcnn.errors import RtcnnInputError
from rtcnn.io import openuniverse as ou
from rtcnn.io import read_truth
from rtcnn.io.remote import HEADER_CHUNK, META_DIR, RemoteTree, is_url, mirror_path

BUCKET = "irsa-sim-test"
PREFIX = "openuniverse2024/roman/preview/RomanTDS"
URL = f"s3://{BUCKET}/{PREFIX}"
FAST = {"connect_timeout": 1, "read_timeout": 2, "retries": {"max_attempts": 1}}


class _Recorder:
    """WSGI wrapper: (method, path, query, Range header) of every request."""

    def __init__(self, app):
        self.app, self.log, self.lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        with self.lock:
            self.log.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                             environ.get("QUERY_STRING", ""), environ.get("HTTP_RANGE")))
        return self.app(environ, start_response)

    def since(self, mark: int) -> list:
        with self.lock:
            return list(self.log[mark:])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free localhost port: (endpoint URL, request recorder)."""
    rec = _Recorder(DomainDispatcherApplication(create_backend_app))
    httpd = make_server("127.0.0.1", 0, rec, True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", rec
    httpd.shutdown()
    thread.join(5)


@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory):
    """The OpenUniverse test tree, on disk and uploaded (public-read) under ``URL``."""
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("local") / "RomanTDS"
    scene = ou_layout.make_ou_directory(root, size=96, n_stars=12, n_galaxies=2,
                                        n_transients=3, seed=3)
    # the uploader needs credentials (any, for moto); the readers below use none
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket=BUCKET, ACL="public-read")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for p in files:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{p.relative_to(root).as_posix()}",
                          Body=p.read_bytes(), ACL="public-read")
    return root, scene, [p.relative_to(root).as_posix() for p in files]


def _options(endpoint: str) -> dict:
    return {"endpoint_url": endpoint, "config_kwargs": FAST}


def _datamodule(endpoint, tmp: Path, url=URL, **kw):
    from rtcnn.data.openuniverse import OpenUniverseDataModule

    return OpenUniverseDataModule(url, download_dir=str(tmp / "remote"),
                                  storage_options=_options(endpoint), progress=False,
                                  num_workers=0, batch_size=4, **kw)


def _same_pairs(local_dirs, remote_dirs):
    """The pair directories hold the same images and truth."""
    assert [d.name for d in remote_dirs] == [d.name for d in local_dirs]
    for a, b in zip(local_dirs, remote_dirs):
        for name in ("ref.fits", "new.fits"):
            assert_array_equal(fits.getdata(a / name), fits.getdata(b / name))
        ta, tb = read_truth(a / "truth.ecsv"), read_truth(b / "truth.ecsv")
        assert len(ta) > 0 and list(ta["id"]) == list(tb["id"])
        for col in ("x", "y", "mag_new", "snr"):
            assert_allclose(np.asarray(ta[col]), np.asarray(tb[col]))


def _object_gets(log, key_part: str = "") -> list:
    return [r for r in log if r[0] == "GET" and r[1].startswith(f"/{BUCKET}/{PREFIX}/")
            and key_part in r[1]]


def test_urls_and_mirror_paths(tmp_path):
    assert is_url(URL) and is_url("https://example.org/RomanTDS")
    assert not is_url("/data/RomanTDS") and not is_url("file:///data/RomanTDS")
    assert mirror_path(URL, tmp_path) == tmp_path / "s3" / BUCKET / Path(PREFIX)
    with pytest.raises(RtcnnInputError, match="names no bucket"):
        mirror_path("s3://", tmp_path)


def test_automatic_pairing_reads_headers_and_fetches_only_the_pairs(s3, bucket, tmp_path):
    """data=openuniverse data.root=s3://... (Hydra config) gives the pairs of the local tree,
    reading headers + truth of the candidates and downloading the chosen images only."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    endpoint, rec = s3
    root, _, _ = bucket
    local = ou.prepare_pairs(root, tmp_path / "local-pairs", bands=["H158"])
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=openuniverse", f"data.root={URL}", "data.bands=[F158]",  # L2 spelling
            f"+data.storage_options.endpoint_url={endpoint}", "data.num_workers=0",
            "data.persistent_workers=false", "data.progress=false",
            f"paths.data_dir={tmp_path}"])
    assert cfg.data.download_dir == f"{tmp_path}/remote"
    dm = instantiate(cfg.data)
    mark = len(rec.log)
    dm.prepare_data()
    mirror = tmp_path / "remote" / "s3" / BUCKET / PREFIX
    assert dm.ou_root == mirror and dm.source == URL
    pairs_dir = Path(dm.root[0])
    assert pairs_dir == mirror.parent / "RomanTDS-rtcnn-pairs"
    remote = [pairs_dir / d.name for d in local]
    _same_pairs(local, remote)
    a, b = ou.read_pair_list(tmp_path / "local-pairs" / "pairs.ecsv"), ou.read_pair_list(
        pairs_dir / "pairs.ecsv")
    assert list(a["name"]) == list(b["name"]) == ["H158_1_3_ref0_3", "H158_2_3_ref0_3"]
    assert_allclose(a["overlap"], b["overlap"])
    assert all(Path(p).is_relative_to(mirror) for p in b["ref"])

    # read: the H158 listing, the obseq, three truth tables, three headers, three images
    h158 = [f"images/simple_model/H158/{p}/Roman_TDS_simple_model_H158_{p}_3.fits.gz"
            for p in (0, 1, 2)]
    truths = [f"truth/H158/{p}/Roman_TDS_index_H158_{p}_3.txt" for p in (0, 1, 2)]
    assert sorted(dm.tree.downloaded) == sorted(h158 + truths + ["Roman_TDS_obseq_test.fits"])
    assert dm.tree.header_reads == 3
    in_mirror = sorted(p.relative_to(mirror).as_posix() for p in mirror.rglob("*")
                       if p.is_file() and META_DIR not in p.parts)
    assert in_mirror == sorted(dm.tree.downloaded)  # no J129 file, nothing else
    log = rec.since(mark)
    assert not any("J129" in r[1] for r in log)
    gets = _object_gets(log, "images/")
    ranged = [r for r in gets if r[3]]
    assert len(ranged) == 3 and len(gets) == 6  # three header reads, three downloads
    sizes = {rel: (root / rel).stat().st_size for rel in h158}
    for r in ranged:  # the header read asks for the first HEADER_CHUNK bytes only
        end = int(r[3].split("-")[1])
        assert end + 1 <= HEADER_CHUNK < sizes[r[1].split(f"{PREFIX}/")[1]]

    # a rerun reads the mirror: it works with the endpoint unreachable, and asks nothing
    again = instantiate(cfg.data, storage_options={
        "endpoint_url": f"http://127.0.0.1:{_closed_port()}", "config_kwargs": FAST})
    mark = len(rec.log)
    again.prepare_data()
    assert again.tree.downloaded == [] and again.tree.header_reads == 0
    assert rec.since(mark) == []
    _same_pairs(local, remote)
    again.setup()
    batch = next(iter(again.train_dataloader()))
    assert tuple(batch["image"].shape[1:]) == (2, 64, 64)


def test_pair_list_fetches_exactly_its_files(s3, bucket, tmp_path):
    """With data.pair_list only the listed images and truth tables are downloaded."""
    endpoint, rec = s3
    root, _, _ = bucket
    mine = tmp_path / "mine.csv"
    # entries may be URLs, bare file names or mirror paths: only the file name counts
    from astropy.table import Table

    Table({"ref": [f"{URL}/images/simple_model/J129/3/Roman_TDS_simple_model_J129_3_3.fits.gz"],
           "new": ["Roman_TDS_simple_model_J129_4_3.fits.gz"]}).write(mine)
    local_list = tmp_path / "local.csv"
    Table({"ref": [str(ou.ou_image_path(root, ou.OUKey("J129", 3, 3)))],
           "new": [str(ou.ou_image_path(root, ou.OUKey("J129", 4, 3)))]}).write(local_list)
    local = ou.prepare_pairs(root, tmp_path / "local-pairs", pair_list=local_list)
    dm = _datamodule(endpoint, tmp_path, pair_list=str(mine),
                     pairs_dir=str(tmp_path / "s3-pairs"))
    mark = len(rec.log)
    dm.prepare_data()
    want = ["images/simple_model/J129/3/Roman_TDS_simple_model_J129_3_3.fits.gz",
            "images/simple_model/J129/4/Roman_TDS_simple_model_J129_4_3.fits.gz",
            "truth/J129/3/Roman_TDS_index_J129_3_3.txt",
            "truth/J129/4/Roman_TDS_index_J129_4_3.txt"]
    assert sorted(dm.tree.downloaded) == want and dm.tree.header_reads == 0
    log = rec.since(mark)
    assert sorted(r[1].split(f"{PREFIX}/")[1] for r in _object_gets(log)) == want
    assert not any(r[0] == "GET" and "list-type" in r[2] for r in log)  # no listing
    _same_pairs(local, [tmp_path / "s3-pairs" / d.name for d in local])

    mark = len(rec.log)
    again = _datamodule(endpoint, tmp_path, pair_list=str(mine),
                        pairs_dir=str(tmp_path / "s3-pairs"))
    again.prepare_data()
    assert again.tree.downloaded == [] and rec.since(mark) == []


def test_remote_header_equals_the_local_header(s3, bucket, tmp_path):
    endpoint, _ = s3
    root, _, _ = bucket
    tree = RemoteTree(URL, tmp_path, _options(endpoint), progress=False)
    rel = "images/simple_model/J129/4/Roman_TDS_simple_model_J129_4_3.fits.gz"
    got = tree.read_header(rel)
    want = ou.read_ou_header(root / rel)
    assert list(got.keys()) == list(want.keys())
    assert all(got[k] == want[k] for k in want if k not in ("COMMENT", "HISTORY"))
    assert tree.header_reads == 1 and not tree.local_path(rel).exists()  # pixels not fetched
    assert tree.read_header(rel) == got and tree.header_reads == 1  # cached


def test_unreachable_or_missing_archive_is_one_line_naming_the_url(s3, bucket, tmp_path):
    endpoint, _ = s3
    # a bucket that does not exist on the server
    dm = _datamodule(endpoint, tmp_path, url="s3://no-such-bucket/RomanTDS", bands=["H158"])
    with pytest.raises(RtcnnInputError, match=r"^s3://no-such-bucket/RomanTDS/images/"
                       r"simple_model/H158: not found \(no such bucket") as err:
        dm.prepare_data()
    assert "\n" not in str(err.value)
    # a prefix with no images in an existing bucket
    with pytest.raises(RtcnnInputError, match="no OpenUniverse images found"):
        from rtcnn.io.remote import fetch_openuniverse

        fetch_openuniverse(RemoteTree(f"s3://{BUCKET}/elsewhere", tmp_path,
                                      _options(endpoint), progress=False), tmp_path / "p")
    # too many candidates for automatic pairing
    with pytest.raises(RtcnnInputError, match="5 candidate images > data.max_candidates=2"):
        _datamodule(endpoint, tmp_path, max_candidates=2,
                    pairs_dir=str(tmp_path / "x")).prepare_data()
    # no server at all (no network): fails fast, names the URL
    from rtcnn.data.openuniverse import OpenUniverseDataModule

    dead = OpenUniverseDataModule(
        URL, download_dir=str(tmp_path / "dead"), progress=False, pairs_dir=str(tmp_path / "d"),
        storage_options={"endpoint_url": f"http://127.0.0.1:{_closed_port()}",
                         "config_kwargs": FAST})
    t0 = time.perf_counter()
    with pytest.raises(RtcnnInputError, match=rf"^{URL}/images/simple_model: cannot be read "
                       r"\(EndpointConnectionError") as err:
        dead.prepare_data()
    assert time.perf_counter() - t0 < 10 and "\n" not in str(err.value)
    # a pair list naming an image the archive lacks: the error names its URL, and the
    # mirror keeps no partial or temporary file
    from astropy.table import Table

    bad = tmp_path / "bad.csv"
    Table({"ref": ["Roman_TDS_simple_model_H158_0_3.fits.gz"],
           "new": ["Roman_TDS_simple_model_H158_9_3.fits.gz"]}).write(bad)
    dm = _datamodule(endpoint, tmp_path / "bad", pair_list=str(bad),
                     pairs_dir=str(tmp_path / "bad-pairs"))
    with pytest.raises(RtcnnInputError, match=rf"^{URL}/images/simple_model/H158/9/"
                       r"Roman_TDS_simple_model_H158_9_3.fits.gz: not found"):
        dm.prepare_data()
    left = sorted(p.name for p in dm.ou_root.rglob("*") if p.is_file())
    assert left == ["Roman_TDS_simple_model_H158_0_3.fits.gz"]
    # pointings / scas are for URL roots only
    with pytest.raises(RtcnnInputError, match="data.pointings / data.scas"):
        OpenUniverseDataModule(str(tmp_path), pointings=[1])
