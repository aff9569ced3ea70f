"""``data=openuniverse``: train on an OpenUniverse 2024 Roman TDS directory or archive URL.

The pairs are made once by :func:`rtcnn.io.openuniverse.prepare_pairs` (pair finder,
reprojection of the reference onto the new image's grid, truth in AB mags and 0-based
pixels) into ``pairs_dir`` in the simulator's pair-directory format, with the pair list
``pairs_dir/pairs.ecsv`` beside them; from there on this is a
:class:`~rtcnn.data.datamodule.FitsDataModule` over ``pairs_dir``, so tiling, splits,
photometry and batches are exactly those of simulated pairs.

A URL root (``s3://nasa-irsa-simulations/openuniverse2024/roman/preview/RomanTDS``,
anonymous) is first mirrored by :mod:`rtcnn.io.remote` into ``download_dir``: only the
files the pairs need (:func:`rtcnn.io.remote.fetch_openuniverse` says which), once; the
same local readers then run on the mirror.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from rtcnn.data.datamodule import FitsDataModule, _plain
from rtcnn.errors import RtcnnInputError
from rtcnn.io.remote import MAX_CANDIDATES, is_url, mirror_path
from rtcnn.roman import canonical_band

log = logging.getLogger(__name__)

__all__ = ["OpenUniverseDataModule"]


class OpenUniverseDataModule(FitsDataModule):
    """Pairs found in an OpenUniverse 2024 ``RomanTDS`` directory or archive URL.

    Parameters
    ----------
    root : str
        The ``RomanTDS`` directory (``images/simple_model/...``, ``truth/...``), or its URL
        (``s3://...``; any fsspec URL), mirrored into ``download_dir``.
    pairs_dir : str, optional
        Where the prepared pair directories and ``pairs.ecsv`` go (default
        ``<root>-rtcnn-pairs`` next to ``root``, or next to its mirror).
    pair_list : str, optional
        An edited pair list (ECSV/CSV with ``ref``, ``new`` columns) to use instead of
        the automatic choice.
    pair_mode : {'quiet', 'earliest', 'before'}
        How references are chosen (:func:`rtcnn.io.openuniverse.select_pairs`).
    mjd_cut : float, optional
        For ``pair_mode='before'``.
    bands : list of str, optional
        Only these bands (either spelling: ``H158`` or ``F158``).
    min_overlap : float
        Minimum fraction of the new image the reference must cover.
    reproject : {'adaptive', 'interp'}
        Resampling of references from other pointings.
    windows : str, optional
        Table of transient activity windows (``object_id, start_mjd, end_mjd``).
    obseq : str, optional
        Observation sequence file or URL (default: found next to ``root``).
    download_dir : str, optional
        URL roots: the local cache the archive is mirrored into (default
        ``rtcnn-remote`` in the working directory; the config says
        ``${paths.data_dir}/remote``).
    storage_options : dict, optional
        URL roots: fsspec options (``s3://``: ``anon`` defaults to True; e.g.
        ``endpoint_url`` for another S3 server, ``config_kwargs`` for timeouts).
    pointings, scas : list of int, optional
        URL roots with automatic pairing: only these pointings / SCAs are candidates.
    max_candidates : int
        URL roots with automatic pairing: refuse to read the headers and truth of more
        candidate images than this.
    **kwargs
        See :class:`~rtcnn.data.datamodule.PairDataModule`.
    """

    def __init__(self, root: str, pairs_dir: str | None = None, pair_list: str | None = None,
                 pair_mode: str = "quiet", mjd_cut: float | None = None,
                 bands: Sequence[str] | None = None, min_overlap: float = 0.5,
                 reproject: str = "adaptive", windows: str | None = None,
                 obseq: str | None = None, download_dir: str | None = None,
                 storage_options: dict | None = None, pointings: Sequence[int] | None = None,
                 scas: Sequence[int] | None = None, max_candidates: int = MAX_CANDIDATES,
                 **kwargs):
        root = os.fspath(root)
        self.ou_url = root.rstrip("/") if is_url(root) else None
        self.download_dir = Path(download_dir) if download_dir else Path("rtcnn-remote")
        if self.ou_url is not None:
            self.ou_root = mirror_path(self.ou_url, self.download_dir)
        else:
            self.ou_root = Path(root)
            if pointings or scas:
                raise RtcnnInputError(root, "data.pointings / data.scas choose what is read "
                                      "from a URL root; for a local directory use data.bands"
                                      " or data.pair_list")
        bands = _plain(bands)
        out = Path(pairs_dir) if pairs_dir else self.ou_root.parent / (
            self.ou_root.name + "-rtcnn-pairs")
        super().__init__(str(out), **kwargs)
        self.ou_args = {"pair_list": pair_list, "mode": pair_mode, "mjd_cut": mjd_cut,
                        "bands": None if bands is None else [canonical_band(b) for b in bands],
                        "min_overlap": float(min_overlap), "method": reproject,
                        "windows": windows, "obseq": obseq}
        self.remote_args = {"storage_options": _plain(storage_options) or {},
                            "pointings": _plain(pointings), "scas": _plain(scas),
                            "max_candidates": int(max_candidates)}
        self.tree = None  # the RemoteTree of a URL root, once prepared
        self._prepared = False

    @property
    def source(self) -> str:
        return self.ou_url or str(self.ou_root)

    def prepare_data(self) -> None:
        """Find the pairs and write the missing pair directories (cached)."""
        from rtcnn.io.openuniverse import prepare_pairs

        if self._prepared:
            return
        args = dict(self.ou_args)
        if self.ou_url is not None:
            args["pair_list"] = self._fetch()
            args["obseq"] = None  # used by the pairing, done in _fetch
        dirs = prepare_pairs(self.ou_root, self.root[0], **args)
        log.info("%d OpenUniverse pairs in %s", len(dirs), self.root[0])
        self._prepared = True

    def _fetch(self) -> Path:
        """Mirror what the pairs need from the URL root; the local pair list."""
        from rtcnn.io.remote import RemoteTree, fetch_openuniverse

        a, r = self.ou_args, self.remote_args
        self.tree = RemoteTree(self.ou_url, self.download_dir, r["storage_options"],
                               progress=bool(self.hparams.get("progress", True)))
        out = fetch_openuniverse(
            self.tree, self.root[0], a["pair_list"], bands=a["bands"],
            pointings=r["pointings"], scas=r["scas"], obseq=a["obseq"], mode=a["mode"],
            mjd_cut=a["mjd_cut"], min_overlap=a["min_overlap"], windows=a["windows"],
            max_candidates=r["max_candidates"])
        log.info("%s: %d files downloaded, %d headers read into %s", self.ou_url,
                 len(self.tree.downloaded), self.tree.header_reads, self.ou_root)
        return out

    def find_pairs(self) -> list:
        self.prepare_data()
        return super().find_pairs()
