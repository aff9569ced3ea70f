"""LightningDataModules over image pairs: simulated (``data=sim``) and user FITS (``data=fits``).

Thin, torchgeo-like: ``prepare_data`` makes the data exist (the simulator's default set),
``setup`` finds the pairs, loads or builds the cached :class:`~rtcnn.data.index.SampleIndex`,
splits **by pair** (seeded; overlapping tiles of one image never sit in two splits) and
wraps each split in a :class:`~rtcnn.data.dataset.TileDataset`. Batches are dicts (see
:mod:`rtcnn.data.dataset`).

With a single pair, ``split='region'`` splits each image into horizontal bands instead
(train / val / test), dropping tiles that straddle two bands.

Unusable pairs (unreadable images, bad catalogs: see :mod:`rtcnn.data.index`) are left
out, logged, and listed in :attr:`PairDataModule.broken`; ``strict=True`` makes them an
error. They keep their place in the split, so a pair's split does not change when
another pair breaks or is repaired.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np

from rtcnn.data.dataset import (
    ASINH_SOFTENING,
    EpochSampler,
    TileDataset,
    TileLoader,
    collate_tiles,
)
from rtcnn.data.index import (
    MAX_PAIR_WARNINGS,
    SAMPLE_KINDS,
    BrokenPair,
    IndexConfig,
    SampleIndex,
    load_or_build_index,
    warn_empty_pairs,
)
from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import is_complete, pair_dir, read_params
from rtcnn.tiles import TILE_OVERLAP, TILE_SIZE

log = logging.getLogger(__name__)

__all__ = ["SPLITS", "SPLIT_MODES", "FitsDataModule", "PairDataModule", "SimDataModule",
           "SplitLoaders", "split_pairs", "split_regions"]

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("pair", "region")


def split_pairs(n: int, val_fraction: float, test_fraction: float,
                seed: int) -> dict[str, np.ndarray]:
    """Seeded split of ``n`` pairs into train / val / test pair ids.

    Each non-zero fraction gets at least one pair when ``n >= 3`` (round half up
    otherwise); train keeps the rest (at least one pair).

    Returns
    -------
    dict split -> (n_split,) int64 sorted pair ids
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise RtcnnInputError(None, f"val_fraction ({val_fraction}) and test_fraction "
                              f"({test_fraction}) must be >= 0 and sum to less than 1")
    order = np.random.default_rng(seed).permutation(n)

    def count(frac):
        k = int(np.floor(frac * n + 0.5))
        return max(k, 1) if frac > 0 and n >= 3 else k

    n_val, n_test = count(val_fraction), count(test_fraction)
    while n_val + n_test >= n and (n_val or n_test):
        if n_val >= n_test and n_val:
            n_val -= 1
        else:
            n_test -= 1
    return {"val": np.sort(order[:n_val]), "test": np.sort(order[n_val:n_val + n_test]),
            "train": np.sort(order[n_val + n_test:])}


def split_regions(index: SampleIndex, tile_ids: np.ndarray, val_fraction: float,
                  test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Split tiles into horizontal bands of their image (seeded band order).

    Each pair's rows are cut at fractions of its height; a tile belongs to the band that
    holds it entirely, and tiles straddling a cut are dropped, so no pixel is shared.
    """
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction,
                 "test": test_fraction}
    order = [SPLITS[i] for i in np.random.default_rng(seed).permutation(3)]
    size = index.config.tile_size
    pair = index.tiles["pair"][tile_ids]
    y0 = index.tiles["origin"][tile_ids, 1]
    ny = index.pairs["shape"][pair, 0]
    out = {s: [] for s in SPLITS}
    lo = np.zeros(len(tile_ids))
    for name in order:
        hi = lo + fractions[name] * ny
        inside = (y0 >= lo) & (y0 + size <= np.where(name == order[-1], ny, hi))
        out[name] = tile_ids[inside]
        lo = hi
    return {s: np.asarray(v, dtype=np.int64) for s, v in out.items()}


def _plain(value):
    """OmegaConf containers → plain dicts/lists (what checkpoints can hold safely)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


class SplitLoaders:
    """The four Lightning loader hooks of a data module that has ``_loader(split, shuffle)``:
    train shuffled, val and test in order, predict = test (the grid of the test split)."""

    def train_dataloader(self) -> TileLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> TileLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> TileLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> TileLoader:
        return self._loader("test", shuffle=False)


class PairDataModule(SplitLoaders, L.LightningDataModule):
    """Tiles of image pairs, split by pair, streamed from memory-mapped FITS.

    Subclasses say where the pairs are (:meth:`find_pairs`) and may create them
    (:meth:`prepare_data`).

    Parameters
    ----------
    batch_size : int
        Tiles per batch.
    tile_size, tile_overlap : int
        Tile side and overlap in px (the paper: 64 and 10; stride = size - overlap).
    samples : {'transient', 'all'}
        'transient': tiles with at least one selected change (the ``attn5`` task);
        'all': every tile, with 0, 1 or several changes (the detector).
    min_dmag, min_snr : float
        Visibility cut (mag, S/N) that selects the changes to learn.
    kinds : list of str, optional
        Truth kinds that count as changes (default: all truth rows, i.e. transients and
        variables).
    margin : float
        Px a change must lie inside a tile to belong to it.
    reverse : bool
        The paper's reversal (the brighter image always second).
    normalization : {'minmax', 'asinh', 'none'}
        Per-tile-pair 0-1 scaling (the paper) or a robust noise-scaled asinh.
    asinh_softening : float
        Noise sigmas where the asinh turns logarithmic.
    augment : bool
        Random D4 element per training sample (seeded).
    split : {'pair', 'region'}
        Split by pair (default) or by horizontal image band.
    val_fraction, test_fraction : float
        Shares of pairs (or image height) for validation and test.
    seed : int
        Seed of the split, the shuffling and the augmentation.
    max_per_tile : int, optional
        K slots of ``xy``/``dmag``/``valid`` (default: the most changes in a tile).
    r_ap, r_in, r_out : float
        Aperture photometry radii in px (for dmag where a catalog magnitude is missing).
    num_workers, pin_memory, persistent_workers, prefetch_factor :
        Passed to :class:`torch.utils.data.DataLoader` (the last two only with workers).
    drop_last : bool
        Drop the last incomplete training batch (BatchNorm dislikes a batch of 1).
    cache_dir : str, optional
        Where the sample index is cached (default: ``.rtcnn-index`` next to the data).
    progress : bool
        Progress bars while simulating / indexing.
    strict : bool
        An unusable pair (missing / truncated / non-FITS image, shape mismatch, bad truth
        catalog...) is an error; by default it is left out, logged, and listed in
        :attr:`broken`.
    """

    def __init__(self, *, batch_size: int = 64, tile_size: int = TILE_SIZE,
                 tile_overlap: int = TILE_OVERLAP, samples: str = "transient",
                 min_dmag: float = 0.0, min_snr: float = 5.0,
                 kinds: Sequence[str] | None = None, margin: float = 0.0,
                 reverse: bool = True, normalization: str = "minmax",
                 asinh_softening: float = ASINH_SOFTENING, augment: bool = True,
                 split: str = "pair", val_fraction: float = 0.15,
                 test_fraction: float = 0.15, seed: int = 0,
                 max_per_tile: int | None = None, r_ap: float | None = None,
                 r_in: float | None = None, r_out: float | None = None,
                 num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = 2,
                 drop_last: bool = True, cache_dir: str | None = None,
                 progress: bool = True, strict: bool = False):
        super().__init__()
        kinds = _plain(kinds)
        if samples not in SAMPLE_KINDS:
            raise RtcnnInputError(None, f"samples must be one of {SAMPLE_KINDS}, got {samples!r}")
        if split not in SPLIT_MODES:
            raise RtcnnInputError(None, f"split must be one of {SPLIT_MODES}, got {split!r}")
        if batch_size < 1:
            raise RtcnnInputError(None, f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters(logger=False)
        for hp in (self.hparams, self._hparams_initial):  # also subclasses' arguments
            for k, v in list(hp.items()):
                hp[k] = _plain(v)
        radii = {k: v for k, v in (("r_ap", r_ap), ("r_in", r_in), ("r_out", r_out))
                 if v is not None}
        self.index_config = IndexConfig(
            tile_size=int(tile_size), tile_overlap=int(tile_overlap), margin=float(margin),
            min_dmag=float(min_dmag), min_snr=float(min_snr),
            kinds=None if kinds is None else tuple(kinds), **radii)
        self.batch_size = int(batch_size)
        self.samples = samples
        self.index: SampleIndex | None = None
        self.pair_ids: dict[str, np.ndarray] = {}
        self.datasets: dict[str, TileDataset] = {}

    # -- where the data is ------------------------------------------------------------
    def find_pairs(self) -> list:
        """The :class:`rtcnn.io.PairFiles` of the data set (subclasses implement)."""
        raise NotImplementedError

    @property
    def source(self) -> str:
        """What to name in errors about the data set as a whole."""
        return type(self).__name__

    # -- Lightning hooks --------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.index is not None:
            return
        hp = self.hparams
        pairs = self.find_pairs()
        self.index = load_or_build_index(pairs, self.index_config, cache_dir=hp.cache_dir,
                                         progress=hp.progress, strict=bool(hp.get("strict")))
        self._log_broken_and_masked(len(pairs))
        usable = np.arange(self.index.n_pairs)
        if self.samples == "transient":
            usable = warn_empty_pairs(self.index, usable, self.source)
        if hp.split == "pair":
            slots = self._split_slots(pairs, usable)
            parts = split_pairs(len(slots), hp.val_fraction, hp.test_fraction, hp.seed)
            self.pair_ids = {s: slots[v][slots[v] >= 0] for s, v in parts.items()}
            tiles = {s: self.index.sample_tiles(self.pair_ids[s], self.samples) for s in SPLITS}
        else:
            every = self.index.sample_tiles(usable, self.samples)
            tiles = split_regions(self.index, every, hp.val_fraction, hp.test_fraction, hp.seed)
            self.pair_ids = {s: usable for s in SPLITS}
        for s in SPLITS:
            self.datasets[s] = TileDataset(
                self.index, tiles[s], normalization=hp.normalization,
                augment=bool(hp.augment) and s == "train", seed=hp.seed, reverse=hp.reverse,
                max_per_tile=hp.max_per_tile, asinh_softening=hp.asinh_softening)
        log.info("%s: %s tiles (train/val/test) from %s pairs", self.source,
                 "/".join(str(len(self.datasets[s])) for s in SPLITS),
                 "/".join(str(len(self.pair_ids[s])) for s in SPLITS))
        if len(self.datasets["train"]) == 0:
            raise RtcnnInputError(self.source, "the training split has no tiles")

    @property
    def broken(self) -> list[BrokenPair]:
        """Pairs left out as unusable (after :meth:`setup`), each naming file and problem."""
        return [] if self.index is None else list(self.index.broken)

    def _split_slots(self, pairs: list, usable: np.ndarray) -> np.ndarray:
        """Usable pair ids in find order, with -1 where a broken pair sits.

        Splitting these slots (and dropping the -1) keeps every pair's split
        independent of which other pairs are broken; without broken pairs it is
        ``usable`` itself.
        """
        if not self.index.broken:
            return usable
        where = {str(p.name): i for i, p in enumerate(pairs)}
        names = self.index.pairs["name"]
        slots = [(where.get(str(names[i]), i), int(i)) for i in usable]
        slots += [(where[b.name], -1) for b in self.index.broken if b.name in where]
        return np.array([pid for _, pid in sorted(slots)], dtype=np.int64)

    def _log_broken_and_masked(self, n_found: int) -> None:
        """Name the pairs left out, and report the images with NaN/inf (masked) pixels."""
        broken = self.index.broken
        if broken:
            log.warning("%s: %d of %d pairs are unusable and left out (data.strict=true makes "
                        "this an error):", self.source, len(broken), n_found)
            for b in broken:
                log.warning("  %s", b)
        masked = self.index.pairs.get("masked")
        if masked is None or not (masked > 0).any():
            return
        worst = masked.max(axis=1)
        ids = np.flatnonzero(worst > 0)
        log.info("%d of %d pairs have NaN/inf pixels (masked: excluded from the statistics, "
                 "0 in the tiles); largest masked fraction %.3g%%", len(ids), len(worst),
                 100.0 * float(worst.max()))
        for i in ids[:MAX_PAIR_WARNINGS]:
            log.info("  %s: ref %.3g%%, new %.3g%% masked", self.index.pairs["name"][i],
                     100.0 * masked[i, 0], 100.0 * masked[i, 1])

    def pairs(self, split: str) -> list[str]:
        """Names of the pairs in ``split`` (after :meth:`setup`)."""
        return [str(self.index.pairs["name"][i]) for i in self.pair_ids[split]]

    def _loader(self, split: str, shuffle: bool) -> TileLoader:
        if not self.datasets:
            self.setup()
        hp = self.hparams
        ds = self.datasets[split]
        workers = int(hp.num_workers)
        extra = {}
        if workers > 0:
            extra["persistent_workers"] = bool(hp.persistent_workers)
            if hp.prefetch_factor is not None:
                extra["prefetch_factor"] = int(hp.prefetch_factor)
        return TileLoader(
            ds, batch_size=self.batch_size,
            sampler=EpochSampler(len(ds), shuffle=shuffle, seed=hp.seed),
            collate_fn=collate_tiles, num_workers=workers, pin_memory=bool(hp.pin_memory),
            drop_last=bool(hp.drop_last) and shuffle and len(ds) > self.batch_size, **extra)



class FitsDataModule(PairDataModule):
    """``data=fits``: user pairs from a directory or glob (:func:`rtcnn.io.find_pairs`).

    Each pair directory holds ``ref.fits``, ``new.fits`` and a truth catalog
    (``truth.ecsv``...; x/y or RA/Dec, ``mag_ref``/``mag_new``, optional ``snr``).

    Parameters
    ----------
    root : str or list of str
        A directory of pair directories, one pair directory, or a glob (or a list).
    **kwargs
        See :class:`PairDataModule`.
    """

    def __init__(self, root: str | Sequence[str], **kwargs):
        root = _plain(root)
        super().__init__(**kwargs)
        self.root = [os.fspath(root)] if isinstance(root, (str, os.PathLike)) else [
            os.fspath(r) for r in root]

    @property
    def source(self) -> str:
        return ", ".join(self.root)

    def find_pairs(self) -> list:
        from rtcnn.io import find_pairs

        seen, pairs = set(), []
        for r in self.root:
            for p in find_pairs(r):
                if p.ref not in seen:
                    seen.add(p.ref)
                    pairs.append(p)
        return pairs


class SimDataModule(FitsDataModule):
    """``data=sim``: the simulator's data set, generated on first use.

    Parameters
    ----------
    root : str
        Folder of the simulated set (default config:
        ``${paths.data_dir}/sim-default``).
    pairs : int
        Number of pairs to simulate.
    size : int
        Image side in px.
    mode : str
        Simulator mode (e.g. 'inject').
    sim_seed : int
        Simulator seed.
    scene : dict, optional
        Extra keyword arguments for :func:`rtcnn.sim.simulate_dataset`.
    **kwargs
        See :class:`PairDataModule`.
    """

    def __init__(self, root: str, pairs: int = 24, size: int = 1024, mode: str = "inject",
                 sim_seed: int = 0, scene: dict | None = None, **kwargs):
        scene = _plain(scene)
        super().__init__(root, **kwargs)
        self.sim_args = {"pairs": int(pairs), "size": int(size), "mode": str(mode),
                         "seed": int(sim_seed)}
        self.scene = dict(scene or {})

    def _pair_dirs(self) -> list[Path]:
        return [pair_dir(self.root[0], i) for i in range(self.sim_args["pairs"])]

    def is_complete(self) -> bool:
        """True when every expected pair directory holds ref, new and truth."""
        return all(is_complete(d) for d in self._pair_dirs())

    def prepare_data(self) -> None:
        """Simulate the set under ``root`` unless it is already there (progress bar)."""
        root = Path(self.root[0])
        self._check_params(root)
        if self.is_complete():
            return
        from rtcnn.sim import simulate_dataset

        log.info("simulating %d pairs of %d px (%s, seed %d) in %s", self.sim_args["pairs"],
                 self.sim_args["size"], self.sim_args["mode"], self.sim_args["seed"], root)
        root.mkdir(parents=True, exist_ok=True)
        # a partial set (more pairs asked for, an interrupted run) is simulated again in
        # full: the simulator is deterministic, so existing pairs come out identical
        partial = any(d.exists() for d in self._pair_dirs())
        simulate_dataset(root, self.sim_args["pairs"], self.sim_args["size"],
                         self.sim_args["mode"], self.sim_args["seed"], overwrite=partial,
                         progress=bool(self.hparams.progress), **self.scene)

    def _check_params(self, root: Path) -> None:
        """An existing set made with other settings is an error, not a silent reuse."""
        from rtcnn.sim.scene import resolve_params

        got = read_params(pair_dir(root, 0))
        if got is None:
            return
        for key in ("size", "mode", "seed"):
            want = self.sim_args[key]
            if key in got and got[key] != want:
                raise RtcnnInputError(
                    root, f"holds a simulated set with {key}={got[key]!r}, not {want!r}; "
                    "choose another data.root or delete the folder")
        want = json.loads(json.dumps(resolve_params(self.sim_args["mode"],
                                                     self.sim_args["size"], **self.scene)))
        scene = got.get("scene", want)
        differ = sorted(k for k in set(want) | set(scene) if want.get(k) != scene.get(k))
        if differ:
            raise RtcnnInputError(
                root, f"holds a simulated set with other scene parameters "
                f"({', '.join(differ)}); choose another data.root or delete the folder")

    def find_pairs(self) -> list:
        if not self.is_complete():
            self.prepare_data()
        pairs = super().find_pairs()
        wanted = {d.name for d in self._pair_dirs()}
        return [p for p in pairs if p.name in wanted]
