"""Tile caches: a data set's finished tiles frozen into one compressed ``.npz``.

A machine without the simulator or the images (a lent GPU node, a laptop) trains on the
exact tiles, targets and splits of a data set from one small file::

    python -m rtcnn.data.cache tiles.npz                      # the default data (data=sim)
    python -m rtcnn.data.cache tiles.npz data.pairs=48 --half # any train.yaml overrides
    python -m rtcnn.train data=tilecache data.path=tiles.npz  # then train on it

The cache holds every split's tiles **before** augmentation (``augment`` is switched off
while exporting), after normalisation and the paper's reversal, with every batch key of
:mod:`rtcnn.data.dataset`. :class:`TileCacheDataModule` serves them through the same
loader, sampler and seeded D4 augmentation as :class:`~rtcnn.data.PairDataModule`, so a run
on the cache sees the same batches as a run on the images. The file is read with
``allow_pickle=False``: it holds arrays only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info
from tqdm.auto import tqdm

from rtcnn.augment import apply_batch
from rtcnn.data.datamodule import SplitLoaders
from rtcnn.data.dataset import (
    EpochSampler,
    TileLoader,
    _split_keys,
    as_tensors,
    collate_tiles,
    d4_elements,
)
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main

__all__ = ["CACHE_VERSION", "CachedTiles", "TileCacheDataModule", "export_tiles",
           "load_cache"]

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bumped when the file layout changes
SPLITS = ("train", "val", "test")
EXPORT_BATCH = 256  # tiles read per step while exporting
ARRAY_KEYS = ("image", "target", "xy", "dmag", "dflux", "valid", "reversed", "origin",
              "dmag_sel", "edge_dist", "mag", "snr")  # batch keys stored as arrays


def export_tiles(datamodule, path: str | Path, half: bool = False,
                 progress: bool = True) -> Path:
    """Write every split of ``datamodule`` (a :class:`~rtcnn.data.PairDataModule`) to ``path``.

    Parameters
    ----------
    datamodule : rtcnn.data.PairDataModule
        Set up here if needed (``prepare_data`` + ``setup``).
    path : str or Path
        Output ``.npz``; refused if it exists.
    half : bool
        Store the images as float16 (half the size; fine for 0-1 ``minmax`` tiles, whose
        float16 step is <= 5e-4, not for ``normalization=none`` raw e-/s values).
    progress : bool
        Progress bar per split.

    Returns
    -------
    Path
        ``path``. Keys: ``<split>/<batch key>`` arrays plus ``<split>/pair`` (str) and
        ``meta`` (JSON: version, tile size, normalisation, seed, the data config).
    """
    path = Path(path)
    if path.exists():
        raise RtcnnInputError(path, "exists; choose another name or remove it")
    if not datamodule.datasets:
        datamodule.prepare_data()
        datamodule.setup()
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        ds = datamodule.datasets[split]
        augment, ds.augment = ds.augment, False
        parts: dict[str, list] = {k: [] for k in (*ARRAY_KEYS, "pair")}
        try:
            for start in tqdm(range(0, len(ds), EXPORT_BATCH), desc=f"export {split}",
                              unit="batch", disable=not progress):
                keys = list(range(start, min(start + EXPORT_BATCH, len(ds))))
                batch = ds.__getitems__(keys)
                for k in ARRAY_KEYS:
                    v = batch[k]
                    parts[k].append(v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                parts["pair"].extend(batch["pair"])
        finally:
            ds.augment = augment
        for k in ARRAY_KEYS:
            if parts[k]:
                arrays[f"{split}/{k}"] = np.concatenate(parts[k])
        arrays[f"{split}/pair"] = np.asarray(parts["pair"], dtype=str)
        if half and f"{split}/image" in arrays:
            arrays[f"{split}/image"] = arrays[f"{split}/image"].astype(np.float16)
    hp = {k: v for k, v in datamodule.hparams.items() if _jsonable(v)}
    meta = {"version": CACHE_VERSION, "tile_size": int(datamodule.index_config.tile_size),
            "seed": int(datamodule.hparams.seed), "data": hp,
            "counts": {s: int(len(arrays.get(f"{s}/pair", ()))) for s in SPLITS}}
    arrays["meta"] = np.asarray(json.dumps(meta))
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def load_cache(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """Read a tile cache: ``(meta, {split: {key: array}})`` (arrays only, no pickles).

    Raises
    ------
    RtcnnInputError
        Missing file, not a tile cache, or another cache version.
    """
    path = Path(path)
    if not path.is_file():
        raise RtcnnInputError(path, "no such tile cache")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = {k: z[k] for k in z.files}
    except Exception as err:  # numpy raises many types for a bad file
        raise RtcnnInputError(path, f"not a readable tile cache ({type(err).__name__})") from None
    if "meta" not in files:
        raise RtcnnInputError(path, "not a tile cache (no meta entry)")
    meta = json.loads(str(files.pop("meta")))
    if meta.get("version") != CACHE_VERSION:
        raise RtcnnInputError(path, f"tile cache version {meta.get('version')}, this rtcnn "
                              f"reads version {CACHE_VERSION}")
    splits: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for key, arr in files.items():
        split, _, name = key.partition("/")
        if split in splits:
            splits[split][name] = arr
    return meta, splits


class CachedTiles(Dataset):
    """One split of a tile cache, served like :class:`~rtcnn.data.dataset.TileDataset`.

    ``__getitems__`` takes the keys that :class:`~rtcnn.data.dataset.EpochSampler` yields
    and applies the same seeded D4 element per (sample, epoch) as the image data set.
    """

    def __init__(self, arrays: dict[str, np.ndarray], size: int, augment: bool, seed: int):
        self.arrays = arrays
        self.size = int(size)
        self.augment = augment
        self.seed = int(seed)
        self.ring_slots = 0  # TileLoader sets it; cached tiles need no shared ring

    def __len__(self) -> int:
        return len(self.arrays["pair"])

    def __getitem__(self, key) -> dict:
        batch = as_tensors(self._batch([key]))
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, keys: Sequence) -> dict:
        batch = self._batch(keys)
        return batch if get_worker_info() is not None else as_tensors(batch)

    def _batch(self, keys: Sequence) -> dict:
        idx, epoch = _split_keys(keys)
        a = self.arrays
        batch = {k: a[k][idx].copy() for k in ARRAY_KEYS if k in a}
        batch["image"] = batch["image"].astype(np.float32, copy=False)
        if self.augment:
            out = np.empty_like(batch["image"])
            _, xy = apply_batch(batch["image"], batch["xy"],
                                d4_elements(self.seed, epoch, idx), out=out)
            batch["image"], batch["xy"] = out, xy
            batch["target"] = xy[:, 0] / np.float32(self.size)
        batch["pair"] = a["pair"][idx].tolist()
        return batch


class TileCacheDataModule(SplitLoaders, L.LightningDataModule):
    """Train / val / test tiles from a cache written by :func:`export_tiles` (``data=tilecache``).

    Parameters
    ----------
    path : str
        The ``.npz`` cache.
    batch_size : int
        Tiles per batch.
    augment : bool
        Seeded D4 augmentation of the training split (as the image data modules).
    seed : int, optional
        Shuffling and augmentation seed (default: the one the cache was made with).
    num_workers : int
        Loader processes (0: in the training process; cached tiles are cheap).
    drop_last : bool
        Drop the last incomplete training batch.
    normalization : str, optional
        The tile normalisation a config expects (e.g. ``experiment=paper``'s ``minmax``):
        checked against the cache's, which cannot change after export.
    """

    def __init__(self, path: str, batch_size: int = 32, augment: bool = True,
                 seed: int | None = None, num_workers: int = 0, drop_last: bool = True,
                 normalization: str | None = None):
        super().__init__()
        if batch_size < 1:
            raise RtcnnInputError("data.batch_size", f"must be >= 1, got {batch_size}")
        self.save_hyperparameters(logger=False)
        self.path = str(path)
        self.batch_size = int(batch_size)
        self.meta, self._splits = load_cache(self.path)
        cached = self.meta["data"].get("normalization")
        if normalization is not None and normalization != cached:
            raise RtcnnInputError(self.path, f"tiles were cached with normalization={cached}, "
                                  f"the config asks for {normalization}")
        self.tile_size = int(self.meta["tile_size"])
        self.seed = int(self.meta["seed"] if seed is None else seed)
        self.datasets: dict[str, CachedTiles] = {}
        self.broken: list = []

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for split in SPLITS:
            if "image" not in self._splits[split]:
                continue
            self.datasets[split] = CachedTiles(
                self._splits[split], self.tile_size,
                augment=bool(self.hparams.augment) and split == "train", seed=self.seed)

    def pairs(self, split: str) -> list[str]:
        """Names of the pairs in ``split``."""
        return sorted(set(self._splits[split].get("pair", np.array([], str)).tolist()))

    def _loader(self, split: str, shuffle: bool) -> TileLoader:
        self.setup()
        if split not in self.datasets:
            raise RtcnnInputError(self.path, f"the tile cache has no {split} split")
        ds = self.datasets[split]
        workers = int(self.hparams.num_workers)
        return TileLoader(
            ds, batch_size=self.batch_size,
            sampler=EpochSampler(len(ds), shuffle=shuffle, seed=self.seed),
            collate_fn=collate_tiles, num_workers=workers,
            drop_last=bool(self.hparams.drop_last) and shuffle and len(ds) > self.batch_size)


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m rtcnn.data.cache",
                      description="Freeze a data set's tiles (every split) into one .npz.")
    p.add_argument("output", help="the .npz to write (refused if it exists)")
    p.add_argument("overrides", nargs="*",
                   help="conf/train.yaml overrides that choose the data, e.g. data.pairs=48")
    p.add_argument("--half", action="store_true", help="store the images as float16")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.data.cache``."""
    import hydra
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    if out.exists():
        raise RtcnnInputError(out, "exists; choose another name or remove it")
    conf = Path(__file__).resolve().parents[2] / "conf"
    root = [] if any(o.startswith("paths.root_dir=") for o in args.overrides) else [
        f"paths.root_dir={Path.cwd()}"]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[*root, *args.overrides], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    dm = hydra.utils.instantiate(cfg.data)
    export_tiles(dm, out, half=args.half, progress=not args.no_progress)
    meta, _ = load_cache(out)
    print(f"{out}: {meta['counts']} tiles of {meta['tile_size']} px "
          f"({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
