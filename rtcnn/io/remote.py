"""Remote archives through fsspec: list, read headers, fetch only what the pairs need.

The OpenUniverse 2024 Roman TDS files are public on S3 (anonymous access)::

    s3://nasa-irsa-simulations/openuniverse2024/roman/preview/RomanTDS/   (and .../full/...)
        images/simple_model/{band}/{pointing}/Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz
        truth/{band}/{pointing}/Roman_TDS_index_{band}_{pointing}_{sca}.txt
        Roman_TDS_obseq_11_6_23.fits

:class:`RemoteTree` mirrors such a tree file by file into a local cache
(``<download_dir>/<protocol>/<bucket>/<key prefix>``, the same layout), so that the local
readers of :mod:`rtcnn.io.openuniverse` run unchanged on the mirror. Every download goes
to a temporary name and is renamed when complete (:func:`rtcnn.io.pairdir.atomic_write`);
a file already in the cache is never fetched again, nor is a listing or a header read
before, so a rerun makes no request at all (delete the cache folder to fetch anew).

:func:`fetch_openuniverse` decides what is read (see its docstring):

* with a pair list: the images and truth tables of the listed pairs, nothing else;
* automatic pairing: the listing of the candidate folders, the obseq table, the truth
  table of every candidate, the two headers at the start of every candidate image
  (range requests of :data:`HEADER_CHUNK` bytes of the gzip stream, not the pixels), and
  then only the images of the chosen pairs.

Any failure to reach or read a URL (no network, no such bucket or key, access denied)
is one :class:`~rtcnn.errors.RtcnnInputError` naming the URL.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath

from astropy.io import fits
from astropy.table import Table
from fsspec.callbacks import Callback

from rtcnn.errors import RtcnnInputError
from rtcnn.io.catalogs import read_table
from rtcnn.io.openuniverse.layout import (
    IMAGE_DIR,
    IMAGE_RE,
    OBSEQ_GLOB,
    SCI_HDU,
    TRUTH_DIR,
    ou_image_path,
    ou_truth_path,
    parse_ou_name,
)
from rtcnn.io.openuniverse.pairing import MIN_OVERLAP, scan_ou, select_pairs, write_pair_list
from rtcnn.io.openuniverse.prepare import PAIR_LIST_NAME
from rtcnn.io.openuniverse.readers import merged_header
from rtcnn.io.pairdir import atomic_write

log = logging.getLogger(__name__)

OPENUNIVERSE_URL = "s3://nasa-irsa-simulations/openuniverse2024/roman/preview/RomanTDS"
HEADER_CHUNK = 32 * 1024  # bytes per range request while inflating the headers of a .fits.gz
MAX_CANDIDATES = 500  # automatic pairing on more candidate images than this is refused
META_DIR = ".rtcnn"  # under the mirror root: cached listings (listing.json), headers/
ANON_PROTOCOLS = ("s3", "s3a")  # anonymous access by default (the archive is public)
_URL_RE = re.compile(r"^(?P<protocol>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$")


def is_url(path: str | os.PathLike | None) -> bool:
    """True for an fsspec URL (``s3://...``, ``gs://...``, ``https://...``), not ``file://``."""
    if path is None or not isinstance(path, str):
        return False
    m = _URL_RE.match(path)
    return m is not None and m["protocol"].lower() not in ("file", "local")


def mirror_path(url: str, download_dir: str | os.PathLike) -> Path:
    """Local folder that mirrors ``url``: ``download_dir/<protocol>/<bucket>/<prefix>``.

    Pure (no request): ``mirror_path('s3://b/x/RomanTDS', 'c')`` is ``c/s3/b/x/RomanTDS``.
    """
    m = _URL_RE.match(url)
    if m is None:
        raise RtcnnInputError(url, "not a URL (expected protocol://bucket/path)")
    rest = PurePosixPath(m["rest"].split("?", 1)[0].strip("/"))
    if not rest.parts or ".." in rest.parts:
        raise RtcnnInputError(url, "the URL names no bucket/path")
    return Path(download_dir) / m["protocol"].lower() / Path(*rest.parts)


@contextlib.contextmanager
def remote_errors(url: str):
    """Turn any failure of a remote operation into one :class:`RtcnnInputError` line."""
    try:
        yield
    except RtcnnInputError:
        raise
    except ImportError as err:
        protocol = url.split("://", 1)[0]
        raise RtcnnInputError(url, f"reading {protocol}:// URLs needs the {err.name or err} "
                              f"package (pip install {err.name or 'fsspec[full]'})") from None
    except FileNotFoundError as err:
        raise RtcnnInputError(url, f"not found (no such bucket or key: {_why(err)})") from None
    except PermissionError as err:
        raise RtcnnInputError(url, f"access denied ({_why(err)}); the OpenUniverse archive is "
                              "public: keep the default anonymous access") from None
    except Exception as err:  # botocore, aiohttp, timeouts: the URL cannot be reached
        log.debug("remote failure on %s", url, exc_info=True)
        raise RtcnnInputError(url, f"cannot be read ({type(err).__name__}: {_why(err)}); "
                              "check the network and data.storage_options") from None


def _why(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def _plain(value):
    """Mappings / sequences (OmegaConf containers too) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (
            isinstance(value, Sequence) and not isinstance(value, (str, bytes))):
        return [_plain(v) for v in value]
    return value


class _Inflate(io.RawIOBase):
    """Forward-only reader of a gzip stream that pulls ``chunk`` compressed bytes at a time."""

    def __init__(self, raw, chunk: int = HEADER_CHUNK):
        self._raw, self._chunk = raw, chunk
        self._z = zlib.decompressobj(zlib.MAX_WBITS | 16)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            data = self._raw.read(self._chunk)
            if not data:
                break
            self._buf += self._z.decompress(data)
        n = len(self._buf) if n < 0 else n
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _data_bytes(header: fits.Header) -> int:
    """Bytes of the data unit that follows ``header`` (padded to 2880)."""
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    n = 1
    for i in range(1, naxis + 1):
        n *= int(header.get(f"NAXIS{i}", 0))
    size = abs(int(header["BITPIX"])) // 8 * int(header.get("GCOUNT", 1)) * (
        int(header.get("PCOUNT", 0)) + n)
    return -(-size // 2880) * 2880


class _Progress(Callback):
    """An fsspec callback that feeds a tqdm byte bar (growing its total if unknown)."""

    def __init__(self, bar, grow: bool):
        super().__init__()
        self.bar, self.grow = bar, grow

    def set_size(self, size):
        if self.grow and size:
            self.bar.total = (self.bar.total or 0) + int(size)
            self.bar.refresh()

    def relative_update(self, inc=1):
        self.bar.update(inc)


class RemoteTree:
    """A remote folder mirrored file by file into a local cache.

    Parameters
    ----------
    url : str
        The remote root, e.g. :data:`OPENUNIVERSE_URL`.
    download_dir : path
        Cache folder; the mirror is :func:`mirror_path` ``(url, download_dir)``.
    storage_options : mapping, optional
        Passed to the fsspec file system (``s3fs.S3FileSystem`` for ``s3://``): e.g.
        ``endpoint_url`` for another S3 server, ``anon`` (default True for ``s3://``),
        ``config_kwargs`` (botocore timeouts, retries).
    progress : bool
        tqdm bars for header reads and downloads.

    Attributes
    ----------
    local : pathlib.Path
        The mirror root.
    downloaded : list of str
        Files fetched by this object (paths relative to the root), in order.
    header_reads : int
        Headers read remotely by this object (not from the cache).
    """

    def __init__(self, url: str, download_dir: str | os.PathLike,
                 storage_options: Mapping | None = None, progress: bool = True):
        self.url = url.rstrip("/")
        self.download_dir = Path(download_dir)
        self.local = mirror_path(self.url, download_dir)
        opts = _plain(dict(storage_options or {}))
        self.storage_options = dict(opts)
        protocol = self.url.split("://", 1)[0].lower()
        if protocol in ANON_PROTOCOLS:
            opts.setdefault("anon", True)
        import fsspec

        with remote_errors(self.url):
            self.fs, base = fsspec.core.url_to_fs(self.url, **opts)
        self.base = base.rstrip("/")
        self.progress = progress
        self.downloaded: list[str] = []
        self.header_reads = 0

    # -- names ------------------------------------------------------------------------
    def remote(self, rel: str) -> str:
        """fsspec path of ``rel`` (a '/'-separated path under the root)."""
        return f"{self.base}/{rel}" if rel else self.base

    def url_of(self, rel: str) -> str:
        """Full URL of ``rel`` (named in errors)."""
        return f"{self.url}/{rel}" if rel else self.url

    def local_path(self, rel: str) -> Path:
        """Where ``rel`` lives in the mirror."""
        return self.local.joinpath(*PurePosixPath(rel).parts)

    def _rel(self, path: str) -> str:
        path = self.fs._strip_protocol(path).rstrip("/")
        base = self.fs._strip_protocol(self.base).rstrip("/")
        if path == base:
            return ""
        if not path.startswith(base + "/"):
            raise RtcnnInputError(self.url, f"listed {path}, outside the root")
        return path[len(base) + 1:]

    # -- listings (cached) --------------------------------------------------------------
    def _listing_file(self) -> Path:
        return self.local / META_DIR / "listing.json"

    def _cached(self, key: str, lister) -> dict[str, int]:
        path = self._listing_file()
        data = json.loads(path.read_text()) if path.is_file() else {}
        if key in data:
            return data[key]
        found = lister()
        if found:  # an empty answer is not cached (a typo fixed later is then seen)
            data[key] = found
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, True, lambda tmp: Path(tmp).write_text(json.dumps(data)),
                         fsync=False)
        return found

    def find(self, prefix: str) -> dict[str, int]:
        """Every file under ``prefix`` (relative path -> size in bytes); cached."""
        def lister():
            with remote_errors(self.url_of(prefix)):
                found = self.fs.find(self.remote(prefix), detail=True)
            return {self._rel(p): int(info.get("size") or 0) for p, info in found.items()
                    if info.get("type", "file") == "file"}
        return self._cached(f"find:{prefix}", lister)

    def glob(self, pattern: str) -> dict[str, int]:
        """Files matching ``pattern`` (relative to the root) -> size in bytes; cached."""
        def lister():
            with remote_errors(self.url_of(pattern)):
                found = self.fs.glob(self.remote(pattern), detail=True)
            return {self._rel(p): int(info.get("size") or 0) for p, info in found.items()}
        return self._cached(f"glob:{pattern}", lister)

    # -- headers (cached) ---------------------------------------------------------------
    def read_header(self, rel: str, size: int | None = None) -> fits.Header:
        """The ``SCI`` header merged with HDU 0 (:func:`~rtcnn.io.openuniverse.merged_header`)
        of a remote OpenUniverse image, read off the start of the file; cached.

        For ``.fits.gz`` the gzip stream is inflated only as far as the end of the HDU 1
        header: range requests of :data:`HEADER_CHUNK` bytes (one or two for a
        roman_imsim file), the pixels are never read.
        """
        cached = self.local / META_DIR / "headers" / (rel + ".hdr")
        if cached.is_file():
            return fits.Header.fromfile(cached)
        url = self.url_of(rel)
        kw = {"size": int(size)} if size else {}
        with remote_errors(url):
            gz = rel.endswith(".gz")
            with self.fs.open(self.remote(rel), "rb", block_size=HEADER_CHUNK,
                              cache_type="none" if gz else "readahead", **kw) as raw:
                stream = _Inflate(raw) if gz else raw
                primary = fits.Header.fromfile(stream)
                skip = _data_bytes(primary)
                while skip > 0:
                    got = len(stream.read(min(skip, 1 << 20)))
                    if not got:
                        break
                    skip -= got
                sci = fits.Header.fromfile(stream)
        if str(sci.get("EXTNAME", SCI_HDU)).strip().upper() != SCI_HDU:
            raise RtcnnInputError(url, f"HDU 1 is {sci.get('EXTNAME')!r}, not {SCI_HDU}")
        self.header_reads += 1
        header = merged_header(primary, sci)
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, True, lambda tmp: header.tofile(tmp), fsync=False)
        return header

    def read_headers(self, rels: Mapping[str, int] | Sequence[str]) -> dict[Path, fits.Header]:
        """:meth:`read_header` of each (a progress bar); keyed by mirror path."""
        from tqdm.auto import tqdm

        sizes = rels if isinstance(rels, Mapping) else dict.fromkeys(rels)
        out = {}
        with tqdm(total=len(sizes), unit="header", desc="OpenUniverse headers",
                  disable=not self.progress, leave=False) as bar:
            for rel, size in sizes.items():
                out[self.local_path(rel)] = self.read_header(rel, size)
                bar.update(1)
        return out

    # -- files --------------------------------------------------------------------------
    def fetch(self, rels: Iterable[str], sizes: Mapping[str, int] | None = None,
              desc: str = "download") -> list[Path]:
        """Bring ``rels`` into the mirror (those missing only); their mirror paths.

        Each file is written to a temporary name beside its place and renamed when
        complete, so an interrupted download leaves nothing behind. One tqdm byte bar.
        """
        from tqdm.auto import tqdm

        rels = list(dict.fromkeys(rels))
        todo = [r for r in rels if not self.local_path(r).is_file()]
        if todo:
            known = sizes is not None and all(sizes.get(r) for r in todo)
            total = sum(int(sizes[r]) for r in todo) if known else 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"{desc} ({len(todo)} files)", disable=not self.progress) as bar:
                cb = _Progress(bar, grow=not known)
                for rel in todo:
                    self._get(rel, cb)
            log.info("fetched %d files from %s into %s", len(todo), self.url, self.local)
        return [self.local_path(r) for r in rels]

    def _get(self, rel: str, callback) -> Path:
        dest = self.local_path(rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = self.url_of(rel)

        def writer(tmp: str) -> None:
            with remote_errors(url):
                self.fs.get_file(self.remote(rel), tmp, callback=callback)

        atomic_write(dest, False, writer)
        self.downloaded.append(rel)
        return dest


# ------------------------------------------------------------------- OpenUniverse


def _image_rel(name: str) -> str:
    key = parse_ou_name(name)
    return ou_image_path(PurePosixPath(), key, gz=str(name).endswith(".gz")).as_posix()


def _truth_rel(name: str) -> str:
    return ou_truth_path(PurePosixPath(), parse_ou_name(name)).as_posix()


def _fetch_pair_list(tree: RemoteTree, pair_list: Path, out: Path) -> Path:
    """The files of an edited pair list, and the list rewritten with mirror paths."""
    t = read_table(pair_list)
    for need in ("ref", "new"):
        if need not in t.colnames:
            raise RtcnnInputError(pair_list, "pair list needs columns ref and new (found: "
                                  f"{', '.join(t.colnames)})")
    cols = {"ref": [_image_rel(str(v)) for v in t["ref"]],
            "new": [_image_rel(str(v)) for v in t["new"]]}
    cols["truth_ref"] = [_truth_rel(r) for r in cols["ref"]]
    cols["truth_new"] = [_truth_rel(n) for n in cols["new"]]
    rels = [r for pair in zip(*cols.values()) for r in pair]
    tree.fetch(rels, desc="OpenUniverse pairs")
    local = Table({k: [str(tree.local_path(r)) for r in v] for k, v in cols.items()})
    if "name" in t.colnames:
        local.add_column([str(v) for v in t["name"]], name="name", index=0)
    return write_pair_list(local, out)


def _prefixes(top: str, bands, pointings) -> list[str]:
    """The fewest folders under ``top`` that hold the selection."""
    if not bands:
        return [top]
    if not pointings:
        return [f"{top}/{b}" for b in bands]
    return [f"{top}/{b}/{p}" for b in bands for p in pointings]


def _candidates(tree: RemoteTree, bands, pointings, scas) -> dict[str, int]:
    """Candidate images (relative path -> size), from the listing of the fewest folders."""
    found: dict[str, int] = {}
    for prefix in _prefixes(IMAGE_DIR.as_posix(), bands, pointings):
        found.update(tree.find(prefix))
    out = {}
    for rel, size in sorted(found.items()):
        parts = PurePosixPath(rel).parts
        if not IMAGE_RE.match(parts[-1]):
            continue
        key = parse_ou_name(parts[-1])
        if ((bands and key.band not in bands) or (pointings and key.pointing not in pointings)
                or (scas and key.sca not in scas)):
            continue
        out[rel] = size
    return out


def _fetch_obseq(tree: RemoteTree, obseq) -> Path | None:
    """Local path of the obseq table: a local file as is, a URL or the archive's fetched."""
    if obseq is not None and not is_url(str(obseq)):
        return Path(obseq)
    if obseq is not None:
        parent, name = str(obseq).rstrip("/").rsplit("/", 1)
        other = RemoteTree(parent, tree.download_dir, tree.storage_options, tree.progress)
        return other.fetch([name], desc="obseq")[0]
    found = tree.glob(OBSEQ_GLOB)
    if len(found) > 1:
        raise RtcnnInputError(tree.url, f"several obseq files ({', '.join(sorted(found))}); "
                              "name one with data.obseq=URL")
    if not found:
        log.warning("%s: no %s; MJDs are taken from the headers unchecked", tree.url,
                    OBSEQ_GLOB)
        return None
    return tree.fetch(found, found, desc="obseq")[0]


def fetch_openuniverse(
    tree: RemoteTree,
    pairs_dir: str | os.PathLike,
    pair_list: str | os.PathLike | None = None,
    *,
    bands: Sequence[str] | None = None,
    pointings: Sequence[int] | None = None,
    scas: Sequence[int] | None = None,
    obseq: str | os.PathLike | None = None,
    mode: str = "quiet",
    mjd_cut: float | None = None,
    min_overlap: float = MIN_OVERLAP,
    windows: str | os.PathLike | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> Path:
    """Fetch what the pairs need from a remote RomanTDS tree; the local pair list.

    What is read from the remote root:

    * ``pair_list`` given (an ECSV/CSV with ``ref``, ``new``; file names, mirror paths or
      URLs; only the OpenUniverse file name of each entry is used): the listed images and
      their truth tables, nothing else (no listing, no obseq).
    * automatic pairing: the listing of ``images/simple_model/{band}[/{pointing}]`` (the
      whole ``images/simple_model`` without ``bands``), the ``Roman_TDS_obseq_*.fits``
      table of the root (or ``obseq``), the listing of ``truth/`` for the same folders
      and the truth table of every candidate, the headers of every candidate image
      (:meth:`RemoteTree.read_header`: range reads of the start of the gzip stream),
      then the images of the chosen pairs only. More than ``max_candidates`` candidates
      is an error (restrict ``bands``, ``pointings``, ``scas``, or give a pair list).

    Files already in the mirror, listings and headers read before are not requested
    again. The pair list, with mirror paths, is written to ``pairs_dir/pairs.ecsv``,
    ready for :func:`rtcnn.io.openuniverse.prepare_pairs` on ``tree.local``.

    Parameters
    ----------
    tree : RemoteTree
        The remote ``RomanTDS`` root and its mirror.
    pairs_dir : path
        Where ``pairs.ecsv`` goes.
    pair_list : path, optional
        A local pair list to use instead of the automatic choice.
    bands, pointings, scas : sequences, optional
        Candidate images (GalSim band spelling, e.g. ``H158``; pointing and SCA numbers).
    obseq : path or URL, optional
        Observation sequence table (default: the one at the root).
    mode, mjd_cut, min_overlap, windows
        As :func:`rtcnn.io.openuniverse.select_pairs`.
    max_candidates : int
        Upper bound on the candidate images of automatic pairing.

    Returns
    -------
    pathlib.Path
        ``pairs_dir/pairs.ecsv``; every file it names is in the mirror.

    Raises
    ------
    RtcnnInputError
        A URL that cannot be reached or read (one line naming it), no candidates, too
        many candidates, no pair found, anything the readers raise.
    """
    out = Path(pairs_dir) / PAIR_LIST_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tree.local.mkdir(parents=True, exist_ok=True)
    if pair_list is not None:
        return _fetch_pair_list(tree, Path(pair_list), out)
    bands = None if not bands else [str(b).upper() for b in bands]
    pointings = None if not pointings else [int(p) for p in pointings]
    scas = None if not scas else [int(s) for s in scas]
    cands = _candidates(tree, bands, pointings, scas)
    where = tree.url_of(IMAGE_DIR.as_posix())
    sel = ", ".join(f"{k}={v}" for k, v in (("bands", bands), ("pointings", pointings),
                                            ("scas", scas)) if v)
    if not cands:
        raise RtcnnInputError(where, "no OpenUniverse images found (expected {band}/{pointing}/"
                              "Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz"
                              + (f" with {sel}" if sel else "") + ")")
    if len(cands) > max_candidates:
        raise RtcnnInputError(where, f"{len(cands)} candidate images{' with ' + sel if sel else ''}"
                              f" > data.max_candidates={max_candidates}: automatic pairing "
                              "reads the header and truth of each; restrict data.bands / "
                              "data.pointings / data.scas, or give data.pair_list")
    obseq_path = _fetch_obseq(tree, obseq)
    truth_have: dict[str, int] = {}
    for prefix in _prefixes(TRUTH_DIR.as_posix(), bands, pointings):
        truth_have.update(tree.find(prefix))
    truths = [t for t in (_truth_rel(PurePosixPath(r).name) for r in cands) if t in truth_have]
    tree.fetch(truths, truth_have, desc="OpenUniverse truth")
    headers = tree.read_headers(cands)
    exposures = scan_ou(tree.local, bands, obseq_path, headers=headers)
    pairs = select_pairs(exposures, mode, mjd_cut, min_overlap, True, windows)
    if len(pairs) == 0:
        raise RtcnnInputError(tree.url, f"no image pairs among {len(cands)} candidate images "
                              f"(mode {mode}: every new image needs an earlier same-band image "
                              f"covering {min_overlap:.0%} of it, and transients in its truth)")
    write_pair_list(pairs, out)
    images = [Path(p).relative_to(tree.local).as_posix()
              for p in list(pairs["ref"]) + list(pairs["new"])]
    tree.fetch(images, cands, desc="OpenUniverse images")
    return out


__all__ = [
    "HEADER_CHUNK",
    "MAX_CANDIDATES",
    "META_DIR",
    "OPENUNIVERSE_URL",
    "RemoteTree",
    "fetch_openuniverse",
    "is_url",
    "mirror_path",
    "remote_errors",
]
