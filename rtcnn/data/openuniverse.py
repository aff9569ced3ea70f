"""``data=openuniverse``: train on an OpenUniverse 2024 Roman TDS directory.

The pairs are made once by :func:`rtcnn.io.openuniverse.prepare_pairs` (pair finder,
reprojection of the reference onto the new image's grid, truth in AB mags and 0-based
pixels) into ``pairs_dir`` in the simulator's pair-directory format, with the pair list
``pairs_dir/pairs.ecsv`` beside them; from there on this is a
:class:`~rtcnn.data.datamodule.FitsDataModule` over ``pairs_dir``, so tiling, splits,
photometry and batches are exactly those of simulated pairs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from rtcnn.data.datamodule import FitsDataModule

log = logging.getLogger(__name__)

__all__ = ["OpenUniverseDataModule"]


class OpenUniverseDataModule(FitsDataModule):
    """Pairs found in an OpenUniverse 2024 ``RomanTDS`` directory.

    Parameters
    ----------
    root : str
        The ``RomanTDS`` directory (``images/simple_model/...``, ``truth/...``).
    pairs_dir : str, optional
        Where the prepared pair directories and ``pairs.ecsv`` go (default
        ``<root>-rtcnn-pairs`` next to ``root``).
    pair_list : str, optional
        An edited pair list (ECSV/CSV with ``ref``, ``new`` columns) to use instead of
        the automatic choice.
    pair_mode : {'quiet', 'earliest', 'before'}
        How references are chosen (:func:`rtcnn.io.openuniverse.select_pairs`).
    mjd_cut : float, optional
        For ``pair_mode='before'``.
    bands : list of str, optional
        Only these bands.
    min_overlap : float
        Minimum fraction of the new image the reference must cover.
    reproject : {'adaptive', 'interp'}
        Resampling of references from other pointings.
    windows : str, optional
        Table of transient activity windows (``object_id, start_mjd, end_mjd``).
    obseq : str, optional
        Observation sequence file (default: found next to ``root``).
    **kwargs
        See :class:`~rtcnn.data.datamodule.PairDataModule`.
    """

    def __init__(self, root: str, pairs_dir: str | None = None, pair_list: str | None = None,
                 pair_mode: str = "quiet", mjd_cut: float | None = None,
                 bands: Sequence[str] | None = None, min_overlap: float = 0.5,
                 reproject: str = "adaptive", windows: str | None = None,
                 obseq: str | None = None, **kwargs):
        self.ou_root = Path(os.fspath(root))
        out = Path(pairs_dir) if pairs_dir else self.ou_root.parent / (
            self.ou_root.name + "-rtcnn-pairs")
        super().__init__(str(out), **kwargs)
        self.ou_args = {"pair_list": pair_list, "mode": pair_mode, "mjd_cut": mjd_cut,
                        "bands": None if bands is None else list(bands),
                        "min_overlap": float(min_overlap), "method": reproject,
                        "windows": windows, "obseq": obseq}
        self._prepared = False

    @property
    def source(self) -> str:
        return str(self.ou_root)

    def prepare_data(self) -> None:
        """Find the pairs and write the missing pair directories (cached)."""
        from rtcnn.io.openuniverse import prepare_pairs

        if self._prepared:
            return
        dirs = prepare_pairs(self.ou_root, self.root[0], **self.ou_args)
        log.info("%d OpenUniverse pairs in %s", len(dirs), self.root[0])
        self._prepared = True

    def find_pairs(self) -> list:
        self.prepare_data()
        return super().find_pairs()
