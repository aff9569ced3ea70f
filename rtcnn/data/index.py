"""The sample index: every tile of every pair, and which flux changes fall in which tile.

Built once per data set (:func:`load_or_build_index`) and cached on disk next to the data
as ``.rtcnn-index/index-<key>.npz``; ``key`` hashes the input files' names, sizes and
modification times together with the settings below, so changing a file or a setting
builds a new index and an unchanged data set never builds one twice.

What it holds (three flat tables, numpy arrays, pair-major order):

* pairs: name, file paths, shape, zero points, robust background and pixel noise;
* changes (the truth rows: transients and variables): position ``(x, y)`` (0-based px),
  catalog magnitudes, ``dmag`` (paper eq. 1, or eq. 2 by aperture photometry where the
  object is in one image only), S/N, signed flux change ``dflux = new - ref`` (image
  units, e.g. e-/s), and whether it passes the visibility cut (``min_dmag``/``min_snr``);
* tiles: pair, origin ``(x0, y0)`` and, CSR-style (``ptr``/``members``), the selected
  changes inside each tile sorted brightest change first (largest ``|dflux|``).

Nothing here assumes one transient per tile: a tile lists 0, 1 or several changes; the
``attn5`` samples are the tiles with at least one (:meth:`SampleIndex.sample_tiles`).

Unusable pairs (a missing, truncated or non-FITS image, a shape mismatch, a truth catalog
without positions or entirely off the image, ...: any :class:`RtcnnInputError` while
indexing a pair) are left out and listed in :attr:`SampleIndex.broken` with the file and
the problem, so that a data set with a few bad pairs still trains on the others;
``strict=True`` makes the first one an error instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from astropy.stats import sigma_clipped_stats
from astropy.table import Table

from rtcnn import photometry as phot
from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import atomic_write
from rtcnn.tiles import TILE_OVERLAP, TILE_SIZE, tile_origins, tiles_containing
from rtcnn.truth import CHANGE_COLUMNS as TRUTH_COLUMNS
from rtcnn.truth import truth_changes

log = logging.getLogger(__name__)

__all__ = ["CHANGE_COLUMNS", "INDEX_DIRNAME", "INDEX_VERSION", "MAX_PAIR_WARNINGS", "SAMPLE_KINDS",
           "BrokenPair", "IndexConfig", "SampleIndex", "build_index", "default_cache_dir",
           "index_key", "load_or_build_index", "robust_background", "warn_empty_pairs"]

INDEX_VERSION = 3  # bump when the index layout or its computation changes
INDEX_DIRNAME = ".rtcnn-index"  # cache folder created next to the data
STATS_SAMPLES = 256  # rows/columns sampled per axis for the robust background/noise
MEMBER_CHUNK = 512  # changes tested against all tiles at once (bounds a (N, chunk) bool)
SAMPLE_KINDS = ("transient", "all")  # tiles with >= 1 selected change | every tile
MAX_PAIR_WARNINGS = 10  # pairs named one by one in warnings before a summary line


@dataclass(frozen=True)
class BrokenPair:
    """A pair left out of the index: its name, the file at fault and the problem.

    ``str()`` gives ``<name>: <file>: <problem>``; :meth:`error` the
    :class:`RtcnnInputError` that reading the pair raised.
    """

    name: str
    path: str | None
    problem: str

    def error(self) -> RtcnnInputError:
        return RtcnnInputError(self.path, self.problem)

    def __str__(self) -> str:
        return f"{self.name}: {self.error()}"


@dataclass(frozen=True)
class IndexConfig:
    """The settings an index depends on (part of its cache key).

    Parameters
    ----------
    tile_size : int
        Tile side in px (the paper: 64).
    tile_overlap : int
        Overlap of neighbouring tiles in px (the paper: 10); stride = size - overlap.
    margin : float
        A change belongs to a tile only if it lies at least ``margin`` px inside the
        tile's outer pixel edges (0: anywhere on the tile).
    min_dmag : float
        Visibility cut: minimum ``dmag`` (mag) for a change to be selected.
    min_snr : float
        Visibility cut: minimum S/N of the flux change for a change to be selected.
    kinds : tuple of str or None
        Truth ``kind`` values that count as changes (None: every truth row).
    r_ap, r_in, r_out : float
        Aperture radius and background annulus radii in px for aperture photometry.
    """

    tile_size: int = TILE_SIZE
    tile_overlap: int = TILE_OVERLAP
    margin: float = 0.0
    min_dmag: float = 0.0
    min_snr: float = 5.0
    kinds: tuple[str, ...] | None = None
    r_ap: float = phot.DEFAULT_R_AP
    r_in: float = phot.DEFAULT_R_IN
    r_out: float = phot.DEFAULT_R_OUT

    def __post_init__(self):
        if self.kinds is not None:
            object.__setattr__(self, "kinds", tuple(str(k) for k in self.kinds))
        if not 0 <= self.tile_overlap < self.tile_size:
            raise RtcnnInputError(
                None, f"tile overlap ({self.tile_overlap} px) must be >= 0 and smaller than "
                f"the tile size ({self.tile_size} px)")
        if not 0 < self.r_ap <= self.r_in < self.r_out:
            raise RtcnnInputError(
                None, f"aperture radii must satisfy 0 < r_ap <= r_in < r_out, got "
                f"{self.r_ap}, {self.r_in}, {self.r_out}")

    @property
    def stride(self) -> int:
        """Tile stride in px (``tile_size - tile_overlap``)."""
        return self.tile_size - self.tile_overlap


class SampleIndex:
    """Pairs, changes and tiles of one data set (see the module docstring).

    Attributes
    ----------
    config : IndexConfig
    key : str
        The cache key (hex).
    pairs, changes, tiles : dict[str, ndarray]
        Column name -> array. ``pairs``: ``name, ref, new, truth`` (str; truth '' if
        none), ``shape`` (P, 2) (ny, nx), ``zeropoint`` (P, 2) AB mag of 1 unit (NaN if
        unknown), ``bkg``/``noise`` (P, 2) robust background and pixel noise (image
        units), ``tile_start`` (P + 1,) first tile of each pair. ``changes``: ``pair``,
        ``id`` (str), ``x``, ``y`` (px, 0-based), ``mag_ref``, ``mag_new`` (AB, NaN where
        absent), ``dmag`` (mag), ``dmag_method`` ('catalog' | 'aperture' | 'limit': 'limit'
        means dmag is a lower limit), ``snr``,
        ``dflux`` (new - ref, image units), ``kind`` (str), ``selected`` (bool).
        ``tiles``: ``pair`` (N,), ``origin`` (N, 2) (x0, y0), ``ptr`` (N + 1,),
        ``members`` (L,) change indices, brightest change first within each tile.
        ``pairs`` also holds ``masked`` (P, 2): the fraction of NaN/inf (masked) pixels
        of the reference and the new image.
    broken : list of BrokenPair
        Pairs that could not be read (left out of the tables above).
    """

    def __init__(self, config: IndexConfig, key: str, pairs: dict, changes: dict,
                 tiles: dict, broken: Sequence[BrokenPair] = ()):
        self.config = config
        self.key = key
        self.pairs = pairs
        self.changes = changes
        self.tiles = tiles
        self.broken = list(broken)

    # sizes ---------------------------------------------------------------------------
    @property
    def n_pairs(self) -> int:
        return len(self.pairs["name"])

    @property
    def n_tiles(self) -> int:
        return len(self.tiles["pair"])

    @property
    def n_members(self) -> np.ndarray:
        """(N,) int64 number of selected changes in each tile."""
        return np.diff(self.tiles["ptr"])

    @property
    def max_members(self) -> int:
        """Most selected changes in any one tile (0 if there are none)."""
        return int(self.n_members.max()) if self.n_tiles else 0

    def selected_per_pair(self) -> np.ndarray:
        """(P,) int64 number of selected changes of each pair."""
        sel = self.changes["selected"]
        return np.bincount(self.changes["pair"][sel], minlength=self.n_pairs)

    # selections ------------------------------------------------------------------------
    def sample_tiles(self, pair_ids: Sequence[int] | np.ndarray,
                     samples: str = "transient") -> np.ndarray:
        """Tile ids of the given pairs, in index order.

        Parameters
        ----------
        pair_ids : sequence of int
            Pairs to take tiles from.
        samples : {'transient', 'all'}
            'transient': tiles holding at least one selected change (the ``attn5``
            samples); 'all': every tile (0, 1 or several changes).

        Returns
        -------
        (M,) int64 tile ids.
        """
        if samples not in SAMPLE_KINDS:
            raise RtcnnInputError(None, f"samples must be one of {SAMPLE_KINDS}, got {samples!r}")
        keep = np.isin(self.tiles["pair"], np.asarray(pair_ids, dtype=np.int64))
        if samples == "transient":
            keep &= self.n_members > 0
        return np.flatnonzero(keep)

    def members(self, tile_ids: np.ndarray, k: int) -> np.ndarray:
        """Selected changes of each tile, padded: ``(B, k) int64``, -1 = empty slot.

        Slot 0 is the brightest change (largest ``|dflux|``); a tile with more than ``k``
        changes keeps its ``k`` brightest.
        """
        tile_ids = np.asarray(tile_ids, dtype=np.int64)
        start = self.tiles["ptr"][tile_ids]
        count = self.tiles["ptr"][tile_ids + 1] - start
        out = np.full((len(tile_ids), k), -1, dtype=np.int64)
        for slot in range(k):
            has = count > slot
            out[has, slot] = self.tiles["members"][start[has] + slot]
        return out

    def changes_table(self) -> Table:
        """All changes as an astropy Table (pair name, position, mags, dmag, S/N, cut)."""
        t = Table({k: v for k, v in self.changes.items() if k != "pair"})
        t.add_column(self.pairs["name"][self.changes["pair"]], name="pair", index=0)
        for col, unit in (("x", "pix"), ("y", "pix"), ("mag_ref", "mag"), ("mag_new", "mag"),
                          ("dmag", "mag")):
            t[col].unit = unit
        t.meta["index_key"] = self.key
        t.meta["config"] = asdict(self.config)
        return t

    # storage ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` (.npz) atomically."""
        path = Path(path)
        arrays = {f"{group}.{k}": v for group in ("pairs", "changes", "tiles")
                  for k, v in getattr(self, group).items()}
        meta = json.dumps({"version": INDEX_VERSION, "key": self.key,
                           "config": asdict(self.config),
                           "broken": [asdict(b) for b in self.broken]})
        arrays["meta"] = np.array(meta)
        path.parent.mkdir(parents=True, exist_ok=True)

        def writer(tmp: str) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a name
                np.savez(fh, **arrays)

        return atomic_write(path, True, writer)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SampleIndex:
        """Read an index written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            groups: dict[str, dict] = {"pairs": {}, "changes": {}, "tiles": {}}
            for name in z.files:
                if name != "meta":
                    group, col = name.split(".", 1)
                    groups[group][col] = z[name]
        if meta.get("version") != INDEX_VERSION:
            raise ValueError(f"index version {meta.get('version')} != {INDEX_VERSION}")
        cfg = meta["config"]
        if cfg.get("kinds") is not None:
            cfg["kinds"] = tuple(cfg["kinds"])
        broken = [BrokenPair(**b) for b in meta.get("broken", [])]
        return cls(IndexConfig(**cfg), meta["key"], groups["pairs"], groups["changes"],
                   groups["tiles"], broken)


# ---------------------------------------------------------------------------------------
# cache key and location
# ---------------------------------------------------------------------------------------
def _pair_files(pair) -> list[Path]:
    files = [Path(pair.ref), Path(pair.new)]
    if pair.truth is not None:
        files.append(Path(pair.truth))
    return files


def index_key(pairs: Sequence, config: IndexConfig) -> str:
    """Hex key of the inputs (file names, sizes, mtimes) and the settings."""
    files = []
    for pair in pairs:
        for f in _pair_files(pair):
            try:
                st = f.stat()
                files.append([pair.name, str(f.resolve()), st.st_size, st.st_mtime_ns])
            except OSError:  # a missing file: the pair is broken, reading it says so
                files.append([pair.name, str(f.absolute()), None, None])
    blob = json.dumps({"version": INDEX_VERSION, "config": asdict(config), "files": files},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir(pairs: Sequence) -> Path:
    """``<common folder of the pairs>/.rtcnn-index``."""
    dirs = [str(Path(p.ref).resolve().parent) for p in pairs]
    return Path(os.path.commonpath(dirs)) / INDEX_DIRNAME


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK)


def load_or_build_index(pairs: Sequence, config: IndexConfig | None = None,
                        cache_dir: str | os.PathLike | None = None, progress: bool = True,
                        rebuild: bool = False, strict: bool = False) -> SampleIndex:
    """The index of ``pairs``, from the cache if its key matches, else built and cached.

    Parameters
    ----------
    pairs : sequence of rtcnn.io.PairFiles
        The pairs (``ref``, ``new``, ``truth`` or None, ``name``).
    config : IndexConfig, optional
    cache_dir : path, optional
        Where index files live (default :func:`default_cache_dir`; a user cache folder
        when that is not writable).
    progress : bool
        Show a progress bar while building.
    rebuild : bool
        Build even when a cached index exists.
    strict : bool
        An unusable pair is an error (the first one found), instead of being left out
        and listed in ``SampleIndex.broken``.

    Returns
    -------
    SampleIndex

    Raises
    ------
    RtcnnInputError
        No pairs; every pair unusable; with ``strict``, any pair unusable.
    """
    config = config or IndexConfig()
    if not pairs:
        raise RtcnnInputError(None, "no image pairs to index")
    key = index_key(pairs, config)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(pairs)
    if not _writable_dir(cache):
        fallback = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rtcnn"
        log.warning("%s is not writable; caching the sample index in %s", cache, fallback)
        cache = fallback
    path = cache / f"index-{key[:20]}.npz"
    if path.exists() and not rebuild:
        try:
            index = SampleIndex.load(path)
            if index.key == key:
                log.info("sample index loaded from %s", path)
                if strict and index.broken:
                    raise _strict_error(index.broken[0], len(pairs))
                return index
        except (OSError, ValueError, KeyError) as err:
            log.warning("rebuilding unreadable sample index %s (%s)", path, err)
    index = build_index(pairs, config, key=key, progress=progress, strict=strict)
    if _writable_dir(cache):
        index.save(path)
        log.info("sample index written to %s", path)
    return index


# ---------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------
def build_index(pairs: Sequence, config: IndexConfig | None = None, key: str | None = None,
                progress: bool = True, strict: bool = False) -> SampleIndex:
    """Build the index of ``pairs`` (no cache; see :func:`load_or_build_index`).

    A pair whose reading raises :class:`RtcnnInputError` is left out, logged as a
    warning and listed in ``SampleIndex.broken`` (with ``strict``: the error is raised).
    """
    from tqdm.auto import tqdm

    config = config or IndexConfig()
    key = key or index_key(pairs, config)
    good, per_pair, broken = [], [], []
    for pair in tqdm(pairs, desc="indexing pairs", unit="pair", disable=not progress,
                     leave=False):
        try:
            per_pair.append(_index_pair(pair, config))
        except RtcnnInputError as err:
            bad = BrokenPair(str(pair.name), err.path, err.problem)
            if strict:
                raise _strict_error(bad, len(pairs)) from None
            log.warning("%s: pair left out: %s", pair.name, err)
            broken.append(bad)
            continue
        good.append(pair)
    if not good:
        first = broken[0]
        if len(pairs) == 1:
            raise first.error()
        raise RtcnnInputError(first.path, f"{first.problem} (all {len(pairs)} pairs are "
                              "unusable)")
    return _assemble(good, per_pair, config, key, broken)


def _strict_error(first: BrokenPair, n_pairs: int) -> RtcnnInputError:
    """The first unusable pair's error, marked as raised because of ``strict``."""
    if n_pairs == 1:
        return first.error()
    return RtcnnInputError(first.path, f"{first.problem} (strict: an unusable pair is an error)")


def _assemble(pairs, per_pair: list[dict], config: IndexConfig, key: str,
              broken: Sequence[BrokenPair] = ()) -> SampleIndex:
    n_tiles = [len(p["origin"]) for p in per_pair]
    tile_start = np.concatenate([[0], np.cumsum(n_tiles)]).astype(np.int64)
    pair_cols = {
        "name": np.array([p.name for p in pairs], dtype=str),
        "ref": np.array([str(p.ref) for p in pairs], dtype=str),
        "new": np.array([str(p.new) for p in pairs], dtype=str),
        "truth": np.array(["" if p.truth is None else str(p.truth) for p in pairs], dtype=str),
        "shape": np.array([p["shape"] for p in per_pair], dtype=np.int64).reshape(-1, 2),
        "zeropoint": np.array([p["zeropoint"] for p in per_pair], dtype=np.float64),
        "bkg": np.array([p["bkg"] for p in per_pair], dtype=np.float32),
        "noise": np.array([p["noise"] for p in per_pair], dtype=np.float32),
        "masked": np.array([p["masked"] for p in per_pair], dtype=np.float32).reshape(-1, 2),
        "tile_start": tile_start,
    }
    change_cols = {}
    offsets = np.concatenate([[0], np.cumsum([len(p["changes"]["x"]) for p in per_pair])])
    for col in CHANGE_COLUMNS:
        change_cols[col] = np.concatenate([p["changes"][col] for p in per_pair])
    change_cols["pair"] = np.concatenate(
        [np.full(len(p["changes"]["x"]), i, dtype=np.int64) for i, p in enumerate(per_pair)])
    counts = np.concatenate([p["count"] for p in per_pair]).astype(np.int64)
    tiles = {
        "pair": np.concatenate(
            [np.full(n, i, dtype=np.int64) for i, n in enumerate(n_tiles)]),
        "origin": np.concatenate([p["origin"] for p in per_pair]).astype(np.int64),
        "ptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "members": np.concatenate(
            [p["members"] + off for p, off in zip(per_pair, offsets[:-1])]).astype(np.int64),
    }
    return SampleIndex(config, key, pair_cols, change_cols, tiles, broken)


#: Columns of the changes table and their dtypes (besides ``pair``).
CHANGE_COLUMNS = {**TRUTH_COLUMNS, "selected": bool}


def _index_pair(pair, config: IndexConfig) -> dict:
    """Tiles, changes and membership of one pair."""
    from rtcnn.io import read_pair

    ref, new = read_pair(pair.ref, pair.new)
    ny, nx = ref.shape
    if config.tile_size > min(ny, nx):
        raise RtcnnInputError(
            pair.ref, f"tile size {config.tile_size} px is larger than the image "
            f"({nx} x {ny} px)")
    origins = tile_origins((ny, nx), config.tile_size, config.stride)
    bkg_ref, noise_ref = robust_background(ref.data, ref.mask)
    bkg_new, noise_new = robust_background(new.data, new.mask)
    changes, zps = _changes_of_pair(pair, ref, new, config)
    members, count = _membership(changes, origins, config)
    return {
        "shape": (ny, nx), "origin": origins, "changes": changes,
        "zeropoint": tuple(np.nan if z is None else float(z) for z in zps),
        "bkg": (bkg_ref, bkg_new), "noise": (noise_ref, noise_new),
        "masked": (ref.masked_fraction, new.masked_fraction),
        "members": members, "count": count,
    }


def robust_background(data: np.ndarray, mask: np.ndarray | None = None,
                      n: int = STATS_SAMPLES) -> tuple[float, float]:
    """Sigma-clipped background and pixel noise of an image from a sparse pixel grid.

    Reads about ``n x n`` pixels (every k-th row and column), so a memory-mapped image
    is never loaded whole.

    Returns
    -------
    bkg, noise : float
        Median and sigma-clipped standard deviation (image units).
    """
    ny, nx = data.shape
    sy, sx = max(1, ny // n), max(1, nx // n)
    sub = np.asarray(data[::sy, ::sx], dtype=np.float32)
    good = np.isfinite(sub)
    if mask is not None:
        good &= ~mask[::sy, ::sx]
    if not good.any():
        return 0.0, 1.0
    _, med, std = sigma_clipped_stats(sub[good], sigma=3.0, maxiters=10)
    std = float(std) if np.isfinite(std) and std > 0 else 1.0
    return float(med), std


def _membership(changes: dict, origins: np.ndarray, config: IndexConfig):
    """CSR membership of the selected changes in the tiles, brightest change first.

    Returns
    -------
    members : (L,) int64 change indices (local to the pair), grouped by tile
    count : (N,) int64 changes per tile
    """
    sel = np.flatnonzero(changes["selected"])
    order = sel[np.argsort(-np.abs(changes["dflux"][sel]), kind="stable")]
    xy = np.column_stack([changes["x"][order], changes["y"][order]])
    tile_ids, cols = [], []
    for start in range(0, len(order), MEMBER_CHUNK):
        inside = tiles_containing(xy[start:start + MEMBER_CHUNK], origins, config.tile_size,
                                  config.margin)
        t, c = np.nonzero(inside)
        tile_ids.append(t)
        cols.append(c + start)
    if not tile_ids:
        return np.zeros(0, np.int64), np.zeros(len(origins), np.int64)
    t = np.concatenate(tile_ids)
    c = np.concatenate(cols)
    by_tile = np.lexsort((c, t))  # tile, then brightness rank
    members = order[c[by_tile]].astype(np.int64)
    count = np.bincount(t, minlength=len(origins)).astype(np.int64)
    return members, count


def _changes_of_pair(pair, ref, new, config: IndexConfig) -> tuple[dict, tuple]:
    """The truth changes of one pair (:func:`rtcnn.truth.truth_changes`: dmag, S/N, dflux)
    and the visibility cut.

    Returns the changes' columns (:data:`CHANGE_COLUMNS`) and the zero points (ref, new)
    used (None where unknown and not needed).
    """
    changes, zps = truth_changes(ref, new, pair.truth, config.kinds, config.r_ap, config.r_in,
                                 config.r_out, ref_path=pair.ref)  # fmt: skip
    dmag, snr = changes["dmag"], changes["snr"]
    changes["selected"] = (np.isfinite(dmag) & (dmag >= config.min_dmag) & np.isfinite(snr)
                           & (snr >= config.min_snr))
    return changes, zps


def warn_empty_pairs(index: SampleIndex, pair_ids: np.ndarray, where: str | None) -> np.ndarray:
    """Pairs among ``pair_ids`` with at least one selected change; warn about the others.

    Raises
    ------
    RtcnnInputError
        When none of the pairs has a selected change.
    """
    pair_ids = np.asarray(pair_ids, dtype=np.int64)
    n_sel = index.selected_per_pair()[pair_ids]
    cfg = index.config
    cut = f"(min_dmag={cfg.min_dmag}, min_snr={cfg.min_snr})"
    empty = pair_ids[n_sel == 0]
    for pid in empty[:MAX_PAIR_WARNINGS]:
        warnings.warn(f"{index.pairs['name'][pid]}: no transient passes the visibility cut "
                      f"{cut}; pair skipped", stacklevel=2)
    if len(empty) > MAX_PAIR_WARNINGS:
        warnings.warn(f"{len(empty) - MAX_PAIR_WARNINGS} more pairs have no transient that "
                      f"passes the visibility cut {cut}; skipped", stacklevel=2)
    if not (n_sel > 0).any():
        raise RtcnnInputError(
            where, f"none of the {len(pair_ids)} pairs has a transient that passes the "
            f"visibility cut (min_dmag={cfg.min_dmag}, min_snr={cfg.min_snr})")
    return pair_ids[n_sel > 0]
