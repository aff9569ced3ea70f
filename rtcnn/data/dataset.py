"""Tile datasets read lazily from memory-mapped FITS, normalised, optionally D4-augmented.

:class:`TileDataset` serves one tile pair per index as a dict (``__getitem__``) and, for
speed, a whole batch at once (``__getitems__``, which :class:`torch.utils.data.DataLoader`
calls with the batch's indices): tiles are sliced from per-worker memory maps (never a
whole image per sample), normalised and augmented as ``(B, 2, n, n)`` arrays, and
:func:`collate_tiles` passes the finished batch through. Batches follow the team contract:

=============  ==============  =======================================================
key            shape, dtype    meaning
=============  ==============  =======================================================
image          (B, 2, n, n) f4 channel 0 = reference, 1 = new, after the paper's
                               reversal (the brighter image second) and augmentation
target         (B, 2) f4       (x, y) of the tile's brightest selected change / n
                               (NaN for a tile without one)
xy             (B, K, 2) f4    tile positions (px) of the tile's selected changes,
                               brightest first, NaN padded
dmag           (B, K) f4       their dmag (mag), NaN padded
valid          (B, K) bool     True where a slot holds a change
reversed       (B,) bool       channels were swapped (the source faded: ref brighter)
pair           list[str]       pair name
origin         (B, 2) i8       tile origin (x0, y0) in the full image (not augmented)
dmag_sel       (B,) f4         dmag of the selected change (NaN if none)
edge_dist      (B,) f4         its distance to the nearest tile edge, px
mag            (B,) f4         its truth AB magnitude in the brighter image
snr            (B,) f4         its S/N
=============  ==============  =======================================================

Augmentation: element ``g`` of the D4 group (:mod:`rtcnn.augment`) for sample ``i`` in
epoch ``e`` is a hash of ``(seed, e, i)``, so it is reproducible and independent of the
number of workers and of how samples are batched. Keys are ``int`` (epoch 0) or
``(index, epoch)`` tuples as :class:`EpochSampler` yields them.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rtcnn.augment import D4_NAMES, apply_batch
from rtcnn.data.index import SampleIndex
from rtcnn.errors import RtcnnInputError
from rtcnn.tiles import edge_distance

NORMALIZATIONS = ("minmax", "asinh", "none")
ASINH_SOFTENING = 3.0  # noise sigmas: the asinh turns from linear to log at this level
HANDLE_CACHE_SIZE = 64  # open memory maps kept per worker process
_MASK64 = (1 << 64) - 1


class TileReader:
    """Per-process cache of memory-mapped images: slices tiles without loading images.

    The cache is dropped when the object is pickled (sent to a worker) or used from a
    new process, so every DataLoader worker opens its own handles.
    """

    def __init__(self, max_open: int = HANDLE_CACHE_SIZE):
        self.max_open = max_open
        self._cache: OrderedDict[str, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self):
        return {"max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["max_open"])

    def open(self, path: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(data, mask)`` of ``path``: the memory map and the bad-pixel mask (or None)."""
        if self._pid != os.getpid():
            self._cache.clear()
            self._pid = os.getpid()
        hit = self._cache.get(path)
        if hit is not None:
            self._cache.move_to_end(path)
            return hit
        from rtcnn.io import read_image

        img = read_image(path)
        hit = (img.data, img.mask)
        self._cache[path] = hit
        while len(self._cache) > self.max_open:
            self._cache.popitem(last=False)
        return hit

    def read(self, path: str, origins: np.ndarray, size: int, out: np.ndarray,
             rows: np.ndarray, bad: np.ndarray | None = None) -> bool:
        """Copy ``size x size`` tiles of ``path`` at ``origins`` (M, 2) (x0, y0) into ``out[rows]``.

        ``out`` is (B, size, size) float32 (a view is fine); ``bad`` (B, size, size) bool
        receives the bad-pixel mask in the same rows when given. Returns True when any of
        the tiles has a masked pixel.
        """
        data, mask = self.open(path)
        spots = list(zip(rows.tolist(), origins.tolist()))
        for r, (x0, y0) in spots:
            out[r] = data[y0:y0 + size, x0:x0 + size]
        if mask is None:
            return False
        any_bad = False
        for r, (x0, y0) in spots:
            m = mask[y0:y0 + size, x0:x0 + size]
            if m.any():
                any_bad = True
                if bad is not None:
                    bad[r] = m
        return any_bad


def d4_elements(seed: int, epoch: np.ndarray, index: np.ndarray) -> np.ndarray:
    """D4 element (0-7) of each sample: a splitmix64 hash of ``(seed, epoch, index)``."""
    with np.errstate(over="ignore"):
        z = (np.uint64(seed & _MASK64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.asarray(epoch, dtype=np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
             ^ np.asarray(index, dtype=np.uint64) * np.uint64(0x94D049BB133111EB))
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(61)).astype(np.int64)  # top 3 bits: 0..7


def normalize_tiles(images: torch.Tensor, method: str, bad: torch.Tensor | None = None,
                    bkg: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                    softening: float = ASINH_SOFTENING) -> torch.Tensor:
    """Normalise tile pairs ``(B, 2, n, n)`` in place; bad pixels end as 0.

    Parameters
    ----------
    images : (B, 2, n, n) float32 tensor
        Raw pixel values (image units). NaN/inf allowed where ``bad`` is True.
    method : {'minmax', 'asinh', 'none'}
        'minmax' (the paper): each tile pair jointly scaled to 0-1 by its own finite
        minimum and maximum (a constant tile becomes 0). 'asinh': ``asinh((x - bkg) /
        (softening * noise))`` with the pair's robust per-image background ``bkg`` (B, 2)
        and a common noise ``noise`` (B,) (image units); 0 is the background, 1 is about
        ``softening`` sigma, a 10^4-sigma source about 8. 'none': unchanged.
    bad : (B, 2, n, n) bool tensor, optional
        Bad pixels (NaN/inf or masked); excluded from the statistics, then set to 0.
    """
    if method not in NORMALIZATIONS:
        raise RtcnnInputError(None, f"normalization must be one of {NORMALIZATIONS}, "
                              f"got {method!r}")
    if bad is None and not bool(torch.isfinite(images).all()):
        bad = ~torch.isfinite(images)
    b = images.shape[0]
    if method == "minmax":
        flat = images.view(b, -1)
        if bad is None:
            lo, hi = torch.aminmax(flat, dim=1)
        else:
            fbad = bad.view(b, -1)
            lo = torch.where(fbad, torch.inf, flat).amin(dim=1)
            hi = torch.where(fbad, -torch.inf, flat).amax(dim=1)
            empty = ~torch.isfinite(lo)
            lo[empty], hi[empty] = 0.0, 1.0
        span = hi - lo
        scale = torch.where(span > 0, 1.0 / span, torch.zeros_like(span))
        flat.sub_(lo[:, None]).mul_(scale[:, None])
    elif method == "asinh":
        images.sub_(bkg[:, :, None, None]).mul_((1.0 / (softening * noise))[:, None, None, None])
        torch.asinh(images, out=images)
    if bad is not None:
        images.masked_fill_(bad, 0.0)
    return images


def _split_keys(keys) -> tuple[np.ndarray, np.ndarray]:
    idx = np.empty(len(keys), dtype=np.int64)
    epoch = np.zeros(len(keys), dtype=np.int64)
    for i, k in enumerate(keys):
        if isinstance(k, (tuple, list)):
            idx[i], epoch[i] = int(k[0]), int(k[1])
        else:
            idx[i] = int(k)
    return idx, epoch


class TileDataset(Dataset):
    """Tile pairs of a :class:`SampleIndex`, with targets and metadata (see module doc).

    Parameters
    ----------
    index : SampleIndex
    tile_ids : (M,) int array
        The index's tiles this dataset serves (e.g. :meth:`SampleIndex.sample_tiles`).
    normalization : {'minmax', 'asinh', 'none'}
        See :func:`normalize_tiles`.
    augment : bool
        Apply a random (seeded) D4 element per sample.
    seed : int
        Augmentation seed.
    reverse : bool
        The paper's reversal: swap the channels of a tile whose brightest change faded,
        so the brighter image is always channel 1.
    max_per_tile : int, optional
        K, the slots of ``xy``/``dmag``/``valid`` (default: the most changes in any tile
        of the index, at least 1).
    asinh_softening : float
        See :func:`normalize_tiles`.
    """

    def __init__(self, index: SampleIndex, tile_ids, *, normalization: str = "minmax",
                 augment: bool = False, seed: int = 0, reverse: bool = True,
                 max_per_tile: int | None = None, asinh_softening: float = ASINH_SOFTENING):
        if normalization not in NORMALIZATIONS:
            raise RtcnnInputError(None, f"normalization must be one of {NORMALIZATIONS}, "
                                  f"got {normalization!r}")
        self.index = index
        self.tile_ids = np.asarray(tile_ids, dtype=np.int64)
        self.normalization = normalization
        self.augment = augment
        self.seed = int(seed)
        self.reverse = reverse
        self.k = int(max_per_tile) if max_per_tile else max(1, index.max_members)
        self.asinh_softening = float(asinh_softening)
        self.size = index.config.tile_size
        self.reader = TileReader()
        pairs = index.pairs
        self._pair_names = pairs["name"].tolist()
        self._paths = (pairs["ref"].tolist(), pairs["new"].tolist())
        noise = pairs["noise"].astype(np.float64)
        self._bkg = torch.from_numpy(pairs["bkg"].astype(np.float32))
        self._noise = torch.from_numpy(np.sqrt(0.5 * (noise ** 2).sum(1)).astype(np.float32))
        ch = index.changes
        self._bright_mag = np.fmin(ch["mag_ref"], ch["mag_new"])

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, key) -> dict:
        batch = self.__getitems__([key])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, keys: Sequence) -> dict:
        idx, epoch = _split_keys(keys)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        tiles = self.tile_ids[idx]
        images, bad = self._read(tiles)
        pair = self.index.tiles["pair"][tiles]
        origin = self.index.tiles["origin"][tiles]
        members = self.index.members(tiles, self.k)
        meta = self._targets(members, origin)
        img_t = torch.from_numpy(images)
        bad_t = None if bad is None else torch.from_numpy(bad)
        pt = torch.from_numpy(pair)
        normalize_tiles(img_t, self.normalization, bad_t, self._bkg[pt], self._noise[pt],
                        self.asinh_softening)
        rev = meta.pop("reversed")
        if self.reverse and rev.any():
            r = torch.from_numpy(rev)
            img_t[r] = img_t[r].flip(1)
        else:
            rev = np.zeros_like(rev)
        xy = torch.from_numpy(meta.pop("xy"))
        if self.augment:
            g = torch.from_numpy(d4_elements(self.seed, epoch, idx))
            img_t, xy = apply_batch(img_t, xy, g)
        valid = torch.from_numpy(members >= 0)
        return {
            "image": img_t,
            "target": (xy[:, 0] / self.size).contiguous(),
            "xy": xy,
            "dmag": torch.from_numpy(meta["dmag"]),
            "valid": valid,
            "reversed": torch.from_numpy(rev),
            "pair": [self._pair_names[p] for p in pair.tolist()],
            "origin": torch.from_numpy(origin.copy()),
            "dmag_sel": torch.from_numpy(meta["dmag"][:, 0].copy()),
            "edge_dist": torch.from_numpy(meta["edge_dist"]),
            "mag": torch.from_numpy(meta["mag"]),
            "snr": torch.from_numpy(meta["snr"]),
        }

    # internals -------------------------------------------------------------------------
    def _read(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw tiles ``(B, 2, n, n)`` float32 and bad pixels (NaN/inf or masked), or None."""
        n = self.size
        b = len(tiles)
        images = np.empty((b, 2, n, n), dtype=np.float32)
        masked = np.zeros((b, 2, n, n), dtype=bool)
        any_masked = False
        pair = self.index.tiles["pair"][tiles]
        origin = self.index.tiles["origin"][tiles]
        for p in np.unique(pair).tolist():
            rows = np.flatnonzero(pair == p)
            for c in (0, 1):
                any_masked |= self.reader.read(self._paths[c][p], origin[rows], n,
                                               images[:, c], rows, masked[:, c])
        finite = bool(np.isfinite(images).all())
        if finite and not any_masked:
            return images, None
        return images, masked | ~np.isfinite(images)

    def _targets(self, members: np.ndarray, origin: np.ndarray) -> dict:
        ch = self.index.changes
        if len(ch["x"]) == 0:  # no changes at all: every slot is padding
            members = np.full_like(members, -1)
            ch = {k: np.zeros(1, dtype=v.dtype) for k, v in ch.items()}
        has = members >= 0
        m = np.where(has, members, 0)
        xy = np.stack([ch["x"][m], ch["y"][m]], axis=-1) - origin[:, None, :]
        xy[~has] = np.nan
        dmag = np.where(has, ch["dmag"][m], np.nan)
        first = has[:, 0]
        sel = m[:, 0]
        nan = np.float32(np.nan)
        return {
            "xy": xy.astype(np.float32),
            "dmag": dmag.astype(np.float32),
            "reversed": first & (ch["dflux"][sel] < 0),
            "edge_dist": np.where(first, edge_distance(xy[:, 0], self.size), nan
                                  ).astype(np.float32),
            "mag": np.where(first, self._bright_mag[sel], nan).astype(np.float32),
            "snr": np.where(first, ch["snr"][sel], nan).astype(np.float32),
        }


def collate_tiles(samples) -> dict:
    """Collate for :class:`TileDataset`: stacks sample dicts, keeps ``pair`` a list of str.

    A batch already assembled by :meth:`TileDataset.__getitems__` (a dict) passes through.
    """
    if isinstance(samples, dict):
        return samples
    out = {}
    for key in samples[0]:
        vals = [s[key] for s in samples]
        out[key] = list(vals) if isinstance(vals[0], str) else torch.stack(vals)
    return out


class EpochSampler(Sampler):
    """Seeded order over ``n`` samples that yields ``(index, epoch)`` keys.

    The epoch travels with each key to the workers (so persistent workers need no state),
    and ``set_epoch`` (called by Lightning before each epoch) reshuffles.

    Parameters
    ----------
    n : int
        Number of samples.
    shuffle : bool
        Permute with ``numpy.random.default_rng([seed, epoch])``; else ``0..n-1``.
    seed : int
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0):
        self.n = int(n)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        e = self.epoch
        return iter([(i, e) for i in order.tolist()])


__all__ = ["D4_NAMES", "EpochSampler", "NORMALIZATIONS", "TileDataset", "TileReader",
           "collate_tiles", "d4_elements", "normalize_tiles"]
