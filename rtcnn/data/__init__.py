"""Samples from image pairs: the cached sample index, tile datasets, LightningDataModules.

* :mod:`rtcnn.data.index` — every tile of every pair and the changes (transients,
  variables) inside it, with dmag (paper eq. 1-3), S/N and the visibility cut; cached.
* :mod:`rtcnn.data.dataset` — :class:`TileDataset` (lazy memory-mapped reads,
  normalisation, the paper's reversal, seeded D4 augmentation) and :func:`collate_tiles`.
* :mod:`rtcnn.data.datamodule` — :class:`SimDataModule` (``data=sim``) and
  :class:`FitsDataModule` (``data=fits``), both :class:`PairDataModule`.
* :mod:`rtcnn.data.stamps` — :class:`StampDataModule` (``data=stamps``): star/galaxy
  stamps of catalogued static sources, for the classifier.
"""

from rtcnn.data.datamodule import FitsDataModule, PairDataModule, SimDataModule, split_pairs
from rtcnn.data.dataset import (
    EpochSampler,
    TileDataset,
    collate_tiles,
    d4_elements,
    normalize_tiles,
)
from rtcnn.data.index import IndexConfig, SampleIndex, build_index, load_or_build_index
from rtcnn.data.stamps import StampDataModule

BATCH_KEYS = ("image", "target", "xy", "dmag", "dflux", "valid", "reversed", "pair", "origin",
              "dmag_sel", "edge_dist", "mag", "snr")

__all__ = [
    "BATCH_KEYS",
    "EpochSampler",
    "FitsDataModule",
    "IndexConfig",
    "PairDataModule",
    "SampleIndex",
    "SimDataModule",
    "StampDataModule",
    "TileDataset",
    "build_index",
    "collate_tiles",
    "d4_elements",
    "load_or_build_index",
    "normalize_tiles",
    "split_pairs",
]
