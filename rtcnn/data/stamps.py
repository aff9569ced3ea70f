"""Stamps of static sources labelled star or galaxy (``data=stamps``, the classifier's data).

The paper's warm-up model separates stars from galaxies. Its samples are small stamps
(default 32 x 32 px) centred on the catalogued static sources of each image pair:

* the pairs come from the same machinery as every other data set: the simulator's set
  (``source='sim'``, :class:`~rtcnn.data.datamodule.SimDataModule`, simulated on first
  use), a directory or glob of user pairs (``source='fits'``,
  :class:`~rtcnn.data.datamodule.FitsDataModule``) or an OpenUniverse 2024 directory
  (``source='openuniverse'``, :class:`~rtcnn.data.openuniverse.OpenUniverseDataModule`,
  whose prepared pairs carry the truth object types);
* the labels come from a catalog next to each pair (``catalog``, default
  ``sources.ecsv``, which the simulator and the OpenUniverse pair writer both write):
  a ``class`` column if present, else a ``kind`` column. ``star`` and ``variable``
  (a point source) are stars, ``galaxy`` is a galaxy; other kinds (``transient``) are
  not static and are left out. Integer classes mean 0 = star, 1 = galaxy. Positions
  are read by :func:`rtcnn.io.read_truth` (x/y 0-based, 1-based columns, or RA/Dec
  through the image WCS);
* each stamp's magnitude is the catalog's ``mag_ref`` or ``mag`` (AB), and its S/N the
  aperture S/N measured on the reference image (:func:`rtcnn.photometry.aperture_flux`);
* pairs are split with :func:`~rtcnn.data.datamodule.split_pairs` (by pair, seeded);
  ``split='test'`` puts every pair in the test split (a fresh test set);
* stamps are sliced lazily from the memory-mapped images by the tile reader
  (:class:`~rtcnn.data.dataset.TileReader`), scaled by
  :func:`~rtcnn.data.dataset.normalize_tiles` and D4-augmented in training with the one
  D4 table (:func:`rtcnn.augment.apply_batch`, element = hash of seed, epoch, index).

Batches (dicts):

=========  ================  ===========================================================
key        shape, dtype      meaning
=========  ================  ===========================================================
image      (B, C, n, n) f4   C = 1 (reference image, ``channels='ref'``) or 2 (reference,
                             new; ``channels='pair'``)
label      (B,) f4           0 = star, 1 = galaxy
xy         (B, 2) f4         the source's (x, y) in the stamp, px (augmented like image)
mag        (B,) f4           AB magnitude (NaN if unknown)
snr        (B,) f4           aperture S/N on the reference image
origin     (B, 2) i8         stamp origin (x0, y0) in the image (not augmented)
pair, id   list[str]         pair name, catalog id
=========  ================  ===========================================================
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import numpy as np

from rtcnn import photometry as phot
from rtcnn.augment import apply_batch
from rtcnn.data.datamodule import (
    SPLITS,
    FitsDataModule,
    PairDataModule,
    SimDataModule,
    SplitLoaders,
    _plain,
    split_pairs,
)
from rtcnn.data.dataset import (
    ASINH_SOFTENING,
    NORMALIZATIONS,
    TileDataset,
    TileReader,
    _split_keys,
    as_tensors,
    d4_elements,
    normalize_tiles,
)
from rtcnn.data.index import BrokenPair, robust_background
from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import SOURCES_NAME

log = logging.getLogger(__name__)

STAMP_SIZE = 32  # px, stamp side
CLASSES = ("star", "galaxy")  # label 0, 1
#: catalog kinds / classes -> label; other kinds (transient, ...) are not static: left out
CLASS_OF_KIND = {"star": 0, "variable": 0, "point": 0, "galaxy": 1, "extended": 1}
CATALOG_NAME = SOURCES_NAME  # written by rtcnn.sim and the OpenUniverse pair writer
MAG_COLUMNS = ("mag_ref", "mag")  # AB magnitude of a static source, first present wins
SOURCES = ("sim", "fits", "openuniverse")
CHANNELS = {"ref": (0,), "pair": (0, 1)}
SPLIT_MODES = ("pair", "test")

__all__ = ["CHANNELS", "CLASSES", "STAMP_SIZE", "StampDataModule", "StampDataset", "StampIndex",
           "build_stamp_index", "catalog_labels"]


def catalog_labels(table, path) -> np.ndarray:
    """Labels of a catalog's rows: 0 star, 1 galaxy, -1 not static (left out).

    Parameters
    ----------
    table : astropy.table.Table
        With a ``class`` column (str: star/galaxy/..., or int 0/1) or a ``kind`` column.
    path : path-like
        Named in errors.

    Returns
    -------
    (N,) int64 ndarray

    Raises
    ------
    RtcnnInputError
        No ``class``/``kind`` column, or an integer class other than 0 or 1.
    """
    lower = {c.lower(): c for c in table.colnames}
    col = lower.get("class") or lower.get("kind")
    if col is None:
        raise RtcnnInputError(path, "needs a 'class' (star/galaxy) or 'kind' column to label "
                              f"the stamps (found: {', '.join(table.colnames) or 'none'})")
    values = np.asarray(table[col])
    if values.dtype.kind in "iub":
        values = values.astype(np.int64)
        if not np.isin(values, (0, 1)).all():
            raise RtcnnInputError(path, f"integer column '{col}' must be 0 (star) or 1 "
                                  f"(galaxy), found {sorted(set(values.tolist()))[:5]}")
        return values
    names = np.char.lower(np.char.strip(values.astype(str)))
    return np.array([CLASS_OF_KIND.get(str(n), -1) for n in names], dtype=np.int64)


class StampIndex:
    """Every labelled stamp of a set of pairs (flat numpy columns) and the pairs' stats.

    Attributes
    ----------
    size : int
        Stamp side, px.
    pairs : dict
        ``name``, ``ref``, ``new`` (str, (P,)), ``bkg``, ``noise`` ((P, 2) f4, robust
        background and pixel noise of reference and new image, image units).
    stamps : dict
        ``pair`` (S,) i8, ``id`` (S,) str, ``x``, ``y`` (S,) f8 image px (0-based),
        ``origin`` (S, 2) i8 stamp origin (x0, y0), ``label`` (S,) i8, ``mag`` (S,) f8 AB,
        ``snr`` (S,) f8.
    broken : list of BrokenPair
        Pairs left out (unreadable image or catalog).
    """

    def __init__(self, size: int, pairs: dict, stamps: dict, broken: Sequence[BrokenPair] = ()):
        self.size = int(size)
        self.pairs = pairs
        self.stamps = stamps
        self.broken = list(broken)

    @property
    def n_pairs(self) -> int:
        return len(self.pairs["name"])

    def __len__(self) -> int:
        return len(self.stamps["pair"])

    def select(self, pair_ids) -> np.ndarray:
        """(M,) int64 stamp ids of the given pairs, in index order."""
        return np.flatnonzero(np.isin(self.stamps["pair"], np.asarray(pair_ids, dtype=np.int64)))


def _catalog_path(pair, catalog: str | None) -> Path:
    folder = Path(pair.ref).parent
    if catalog is None:
        return folder / CATALOG_NAME
    p = Path(os.fspath(catalog))
    return p if (p.is_absolute() or len(p.parts) > 1) else folder / p


def _stamps_of_pair(pair, catalog: str | None, size: int) -> tuple[dict, dict]:
    """The labelled, fully inside stamps of one pair and the pair's statistics."""
    from rtcnn.io import read_pair, read_truth

    ref, new = read_pair(pair.ref, pair.new)
    path = _catalog_path(pair, catalog)
    table = read_truth(path, image=ref)
    label = catalog_labels(table, path)
    ny, nx = ref.shape
    x = np.asarray(table["x"], dtype=np.float64)
    y = np.asarray(table["y"], dtype=np.float64)
    half = size // 2
    with np.errstate(invalid="ignore"):
        x0 = np.floor(x + 0.5).astype(np.int64) - half
        y0 = np.floor(y + 0.5).astype(np.int64) - half
        keep = (np.isfinite(x) & np.isfinite(y) & (label >= 0) & (x0 >= 0) & (y0 >= 0)
                & (x0 + size <= nx) & (y0 + size <= ny))
    mag = np.full(len(table), np.nan)
    lower = {c.lower(): c for c in table.colnames}
    for name in MAG_COLUMNS:
        if name in lower:
            col = np.ma.filled(np.ma.asarray(table[lower[name]], dtype=np.float64), np.nan)
            mag = np.where(np.isfinite(mag), mag, col)
    ids = (np.asarray(table[lower["id"]]).astype(str) if "id" in lower
           else np.arange(len(table)).astype(str))
    k = np.flatnonzero(keep)
    snr = np.full(len(k), np.nan)
    if len(k):
        ap = phot.aperture_flux(ref.data, np.column_stack([x[k], y[k]]), mask=ref.mask)
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.asarray(ap["flux"], float) / np.asarray(ap["flux_err"], float)
    stats = [robust_background(img.data, img.mask) for img in (ref, new)]
    stamps = {"id": ids[k], "x": x[k], "y": y[k], "origin": np.column_stack([x0[k], y0[k]]),
              "label": label[k], "mag": mag[k], "snr": snr}
    pair_stats = {"bkg": (stats[0][0], stats[1][0]), "noise": (stats[0][1], stats[1][1])}
    return stamps, pair_stats


def build_stamp_index(pairs: Sequence, catalog: str | None = None, size: int = STAMP_SIZE,
                      strict: bool = False, progress: bool = True) -> StampIndex:
    """Read each pair's catalog and list its labelled stamps (:class:`StampIndex`).

    Parameters
    ----------
    pairs : sequence of rtcnn.io.PairFiles
    catalog : str, optional
        The labelling catalog: a file name looked up in each pair's directory, or a path
        (with a directory part) used for every pair. Default ``sources.ecsv``.
    size : int
        Stamp side, px. Sources closer than ``size / 2`` px to the image edge are left out.
    strict : bool
        An unreadable pair or catalog is an error (default: left out, logged, listed in
        ``broken``).
    progress : bool
        A progress bar over the pairs.

    Raises
    ------
    RtcnnInputError
        No pairs; every pair unusable; no labelled stamp at all; ``strict`` and a bad pair.
    """
    from tqdm.auto import tqdm

    if size < 4:
        raise RtcnnInputError(None, f"stamp_size must be >= 4 px, got {size}")
    if not pairs:
        raise RtcnnInputError(None, "no image pairs to cut stamps from")
    good, per_pair, broken = [], [], []
    for pair in tqdm(pairs, desc="stamps", unit="pair", disable=not progress):
        try:
            stamps, stats = _stamps_of_pair(pair, catalog, size)
        except RtcnnInputError as err:
            if strict:
                raise
            log.warning("%s: pair left out: %s", pair.name, err)
            broken.append(BrokenPair(str(pair.name), err.path, err.problem))
            continue
        good.append(pair)
        per_pair.append((stamps, stats))
    if not good:
        raise broken[0].error()
    cols = {k: np.concatenate([s[k] for s, _ in per_pair]) for k in per_pair[0][0]}
    cols["origin"] = cols["origin"].reshape(-1, 2).astype(np.int64)
    cols["pair"] = np.concatenate([np.full(len(s["x"]), i, dtype=np.int64)
                                   for i, (s, _) in enumerate(per_pair)])
    if len(cols["pair"]) == 0:
        raise RtcnnInputError(str(Path(good[0].ref).parent), "no labelled star or galaxy "
                              f"at least {size // 2} px inside the images of any pair")
    pair_cols = {
        "name": np.array([p.name for p in good], dtype=str),
        "ref": np.array([str(p.ref) for p in good], dtype=str),
        "new": np.array([str(p.new) for p in good], dtype=str),
        "bkg": np.array([s["bkg"] for _, s in per_pair], dtype=np.float32).reshape(-1, 2),
        "noise": np.array([s["noise"] for _, s in per_pair], dtype=np.float32).reshape(-1, 2),
    }
    return StampIndex(size, pair_cols, cols, broken)


class StampDataset(TileDataset):
    """Stamps of a :class:`StampIndex` as batches (module docstring), read lazily.

    A :class:`~rtcnn.data.dataset.TileDataset` in everything but what it indexes: the
    same reader, batch assembly (``__getitems__``), shared-memory image slots in loader
    workers and D4 augmentation.

    Parameters
    ----------
    index : StampIndex
    stamp_ids : (M,) int array
        The index's stamps served, in order.
    channels : {'ref', 'pair'}
        Reference image only (1 channel) or reference and new image (2 channels).
    normalization : {'asinh', 'minmax', 'none'}
        :func:`rtcnn.data.dataset.normalize_tiles` (asinh: noise-scaled, keeps the
        brightness; minmax: each stamp 0-1).
    augment : bool
        A seeded random D4 element per sample.
    seed : int
    asinh_softening : float
    """

    def __init__(self, index: StampIndex, stamp_ids, *, channels: str = "ref",
                 normalization: str = "asinh", augment: bool = False, seed: int = 0,
                 asinh_softening: float = ASINH_SOFTENING):
        if channels not in CHANNELS:
            raise RtcnnInputError(None, f"channels must be one of {tuple(CHANNELS)}, got "
                                  f"{channels!r}")
        if normalization not in NORMALIZATIONS:
            raise RtcnnInputError(None, f"normalization must be one of {NORMALIZATIONS}, "
                                  f"got {normalization!r}")
        self.index = index
        self.stamp_ids = np.asarray(stamp_ids, dtype=np.int64)
        self.channels = list(CHANNELS[channels])
        self.normalization = normalization
        self.augment = augment
        self.seed = int(seed)
        self.asinh_softening = float(asinh_softening)
        self.size = index.size
        self.reader = TileReader()
        self.ring_slots = 0  # shared-memory image slots per worker (set by TileLoader)
        self._paths = (index.pairs["ref"].tolist(), index.pairs["new"].tolist())
        self._bkg = index.pairs["bkg"][:, self.channels]
        noise = index.pairs["noise"][:, self.channels].astype(np.float64)
        self._noise = np.sqrt((noise ** 2).mean(1)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.stamp_ids)

    @property
    def labels(self) -> np.ndarray:
        """(M,) int64 labels of the served stamps."""
        return self.index.stamps["label"][self.stamp_ids]

    def _batch(self, keys: Sequence, in_worker: bool) -> dict:
        idx, epoch = _split_keys(keys)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        st = self.index.stamps
        sid = self.stamp_ids[idx]
        pair, origin = st["pair"][sid], st["origin"][sid]
        n, b = self.size, len(idx)
        both = np.empty((b, 2, n, n), dtype=np.float32)
        bad = self._read(sid, pair, origin, np.zeros(b, bool), both)
        images = np.ascontiguousarray(both[:, self.channels])
        normalize_tiles(images, self.normalization,
                        None if bad is None else bad[:, self.channels], self._bkg[pair],
                        self._noise[pair], self.asinh_softening)
        xy = (np.column_stack([st["x"][sid], st["y"][sid]]) - origin).astype(np.float32)
        image_t, out = self._output(images.shape, in_worker)
        if self.augment:
            _, xy = apply_batch(images, xy, d4_elements(self.seed, epoch, idx), out=out)
        else:
            out[...] = images
        batch = {
            "image": image_t,
            "label": st["label"][sid].astype(np.float32),
            "xy": xy,
            "mag": st["mag"][sid].astype(np.float32),
            "snr": st["snr"][sid].astype(np.float32),
            "origin": origin,
            "pair": [str(self.index.pairs["name"][p]) for p in pair.tolist()],
            "id": [str(i) for i in st["id"][sid]],
        }
        return batch if in_worker else as_tensors(batch)


class StampDataModule(SplitLoaders, L.LightningDataModule):
    """``data=stamps``: labelled star/galaxy stamps of image pairs, split by pair.

    Parameters
    ----------
    root : str
        The pairs: the simulated set's folder (``source='sim'``), a directory / glob of
        pair directories (``'fits'``), or an OpenUniverse ``RomanTDS`` directory
        (``'openuniverse'``).
    source : {'sim', 'fits', 'openuniverse'}
        Which pair DataModule finds (and makes) the pairs.
    pairs, size, mode, sim_seed, scene
        The simulated set (``source='sim'``; :class:`~rtcnn.data.SimDataModule`).
    openuniverse : dict, optional
        Extra arguments of :class:`~rtcnn.data.openuniverse.OpenUniverseDataModule`
        (``pairs_dir``, ``bands``...).
    catalog : str, optional
        The labelling catalog of each pair (default ``sources.ecsv``; see
        :func:`build_stamp_index`).
    stamp_size : int
        Stamp side, px.
    channels : {'ref', 'pair'}
        Cut from the reference image only, or from both images (2 channels).
    normalization, asinh_softening, augment
        See :class:`StampDataset`.
    max_mag : float, optional
        Leave out sources fainter than this AB magnitude (None: keep all).
    split : {'pair', 'test'}
        'pair': seeded split by pair with ``val_fraction`` / ``test_fraction``; 'test':
        every pair in the test split (evaluate on a fresh set).
    val_fraction, test_fraction, seed
        The split (and the shuffling and augmentation seed).
    batch_size, num_workers, pin_memory, persistent_workers, prefetch_factor, drop_last
        The data loaders.
    progress, strict
        Progress bars; an unusable pair is an error instead of being left out.
    """

    def __init__(self, root: str | Sequence[str], source: str = "sim", pairs: int = 16,
                 size: int = 1024, mode: str = "inject", sim_seed: int = 0,
                 scene: Mapping | None = None, openuniverse: Mapping | None = None,
                 catalog: str | None = None, stamp_size: int = STAMP_SIZE,
                 channels: str = "ref", normalization: str = "asinh",
                 asinh_softening: float = ASINH_SOFTENING, augment: bool = True,
                 max_mag: float | None = None, split: str = "pair",
                 val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0,
                 batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = 2,
                 drop_last: bool = True, progress: bool = True, strict: bool = False):
        super().__init__()
        root, scene, openuniverse = _plain(root), _plain(scene), _plain(openuniverse)
        if source not in SOURCES:
            raise RtcnnInputError(None, f"data.source must be one of {SOURCES}, got {source!r}")
        if split not in SPLIT_MODES:
            raise RtcnnInputError(None, f"split must be one of {SPLIT_MODES}, got {split!r}")
        if channels not in CHANNELS:
            raise RtcnnInputError(None, f"channels must be one of {tuple(CHANNELS)}, got "
                                  f"{channels!r}")
        if batch_size < 1:
            raise RtcnnInputError(None, f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(logger=False)
        for hp in (self.hparams, self._hparams_initial):
            for k, v in list(hp.items()):
                hp[k] = _plain(v)
        common = {"progress": progress, "strict": strict}
        if source == "sim":
            self.pair_source = SimDataModule(root, pairs=pairs, size=size, mode=mode,
                                             sim_seed=sim_seed, scene=scene, **common)
        elif source == "fits":
            self.pair_source = FitsDataModule(root, **common)
        else:
            from rtcnn.data.openuniverse import OpenUniverseDataModule

            self.pair_source = OpenUniverseDataModule(root, **dict(openuniverse or {}), **common)
        self.batch_size = int(batch_size)
        self.index: StampIndex | None = None
        self.pair_ids: dict[str, np.ndarray] = {}
        self.datasets: dict[str, StampDataset] = {}

    @property
    def source(self) -> str:
        """What to name in errors about the data set as a whole."""
        return self.pair_source.source

    @property
    def n_channels(self) -> int:
        return len(CHANNELS[self.hparams.channels])

    def prepare_data(self) -> None:
        self.pair_source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        hp = self.hparams
        pairs = self.pair_source.find_pairs()
        self.index = build_stamp_index(pairs, hp.catalog, int(hp.stamp_size),
                                       strict=bool(hp.strict), progress=bool(hp.progress))
        for b in self.index.broken:
            log.warning("  left out: %s", b)
        if hp.split == "test":
            every = np.arange(self.index.n_pairs)
            self.pair_ids = {"train": every[:0], "val": every[:0], "test": every}
        else:
            self.pair_ids = split_pairs(self.index.n_pairs, hp.val_fraction, hp.test_fraction,
                                        hp.seed)
        mag = self.index.stamps["mag"]
        for s in SPLITS:
            ids = self.index.select(self.pair_ids[s])
            if hp.max_mag is not None:
                ids = ids[~(mag[ids] > float(hp.max_mag))]  # unknown magnitudes are kept
            self.datasets[s] = StampDataset(
                self.index, ids, channels=hp.channels, normalization=hp.normalization,
                augment=bool(hp.augment) and s == "train", seed=hp.seed,
                asinh_softening=hp.asinh_softening)
        counts = {s: np.bincount(self.datasets[s].labels, minlength=2) for s in SPLITS}
        log.info("%s: stamps (stars/galaxies) train %s, val %s, test %s from %s pairs",
                 self.source, *("/".join(map(str, counts[s])) for s in SPLITS),
                 "/".join(str(len(self.pair_ids[s])) for s in SPLITS))
        if hp.split == "pair" and len(self.datasets["train"]) == 0:
            raise RtcnnInputError(self.source, "the training split has no stamps")

    @property
    def broken(self) -> list[BrokenPair]:
        """Pairs left out as unusable (after :meth:`setup`)."""
        return [] if self.index is None else list(self.index.broken)

    def pairs(self, split: str) -> list[str]:
        """Names of the pairs in ``split`` (after :meth:`setup`)."""
        return [str(self.index.pairs["name"][i]) for i in self.pair_ids[split]]

    # the loaders of the pair DataModules (same hparams names): seeded EpochSampler,
    # TileLoader (tensors, resumable), optional workers
    _loader = PairDataModule._loader
