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
dflux          (B, K) f4       their signed flux change new - ref (reference image units,
                               e.g. e-/s; > 0 brightened), NaN padded (an addition to the
                               contract, for the detector's brightened/faded head)
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
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from rtcnn.augment import apply_batch
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

    def read_pair(self, paths: tuple[str, str], origins: np.ndarray, rows: np.ndarray,
                  swap: np.ndarray, size: int, out: np.ndarray, bad: list) -> None:
        """Copy the ``size x size`` tiles at ``origins`` (M, 2) (x0, y0) of a pair into ``out``.

        Tile ``i`` of the reference goes to ``out[rows[i], 0]`` and of the new image to
        ``out[rows[i], 1]`` (the other way round where ``swap[i]``). For each copied tile
        with masked pixels, ``(row, channel, mask)`` is appended to ``bad``.
        """
        (ref, mref), (new, mnew) = self.open(paths[0]), self.open(paths[1])
        spots = list(zip(rows.tolist(), origins[:, 0].tolist(), origins[:, 1].tolist(),
                         swap.tolist()))
        for r, x0, y0, s in spots:
            out[r, s] = ref[y0:y0 + size, x0:x0 + size]
            out[r, 1 - s] = new[y0:y0 + size, x0:x0 + size]
        for mask, first in ((mref, True), (mnew, False)):
            if mask is None:
                continue
            for r, x0, y0, s in spots:
                m = mask[y0:y0 + size, x0:x0 + size]
                if m.any():
                    bad.append((r, s if first else 1 - s, m))


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


def normalize_tiles(images: np.ndarray, method: str, bad: np.ndarray | None = None,
                    bkg: np.ndarray | None = None, noise: np.ndarray | None = None,
                    softening: float = ASINH_SOFTENING) -> np.ndarray:
    """Normalise tile pairs ``(B, 2, n, n)`` in place; bad pixels end as 0.

    numpy, not torch: on a few CPU cores numpy's reductions and copies are several times
    faster than torch's for these sizes (see ``python -m rtcnn.bench data``).

    Parameters
    ----------
    images : (B, 2, n, n) float32 ndarray
        Raw pixel values (image units). NaN/inf allowed where ``bad`` is True.
    method : {'minmax', 'asinh', 'none'}
        'minmax' (the paper): each tile pair jointly scaled to 0-1 by its own finite
        minimum and maximum (a constant tile becomes 0). 'asinh': ``asinh((x - bkg) /
        (softening * noise))`` with the pair's robust per-image background ``bkg`` (B, 2)
        and a common pixel noise ``noise`` (B,) (image units): 0 is the background, the
        noise is about ``1/softening``, a 10^4-sigma peak about 8. 'none': unchanged.
    bad : (B, 2, n, n) bool ndarray, optional
        Bad pixels (NaN/inf or masked); excluded from the statistics, then set to 0.
        Found from the pixels when not given.

    Returns
    -------
    images
    """
    if method not in NORMALIZATIONS:
        raise RtcnnInputError(None, f"normalization must be one of {NORMALIZATIONS}, "
                              f"got {method!r}")
    if bad is None and not np.isfinite(images).all():
        bad = ~np.isfinite(images)
    b = images.shape[0]
    if method == "minmax":
        flat = images.reshape(b, -1)
        if bad is None:
            lo, hi = flat.min(axis=1), flat.max(axis=1)
        else:
            fbad = bad.reshape(b, -1)
            lo = np.where(fbad, np.inf, flat).min(axis=1)
            hi = np.where(fbad, -np.inf, flat).max(axis=1)
            empty = ~np.isfinite(lo)
            lo[empty], hi[empty] = 0.0, 1.0
        span = hi - lo
        with np.errstate(divide="ignore"):
            scale = np.where(span > 0, 1.0 / span, 0.0).astype(np.float32)
        flat -= lo[:, None]
        flat *= scale[:, None]
    elif method == "asinh":
        images -= bkg[:, :, None, None]
        images *= (1.0 / (softening * noise)).astype(np.float32)[:, None, None, None]
        np.arcsinh(images, out=images)
    if bad is not None:
        images[bad] = 0.0
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
        self.ring_slots = 0  # shared-memory image slots per worker (set by TileLoader)
        pairs = index.pairs
        self._pair_names = pairs["name"].tolist()
        self._paths = (pairs["ref"].tolist(), pairs["new"].tolist())
        noise = pairs["noise"].astype(np.float64)
        self._bkg = pairs["bkg"].astype(np.float32)
        self._noise = np.sqrt(0.5 * (noise ** 2).sum(1)).astype(np.float32)
        ch = index.changes
        self._bright_mag = np.fmin(ch["mag_ref"], ch["mag_new"])

    def __len__(self) -> int:
        return len(self.tile_ids)

    def __getitem__(self, key) -> dict:
        """One sample: the batch fields without the batch axis (``pair`` a str)."""
        batch = as_tensors(self._batch([key], in_worker=False))
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, keys: Sequence) -> dict:
        """A whole batch (what DataLoader calls with a batch's keys); see the module doc."""
        return self._batch(keys, in_worker=get_worker_info() is not None)

    def _batch(self, keys: Sequence, in_worker: bool) -> dict:
        idx, epoch = _split_keys(keys)
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range 0..{len(self) - 1}")
        tiles = self.tile_ids[idx]
        pair = self.index.tiles["pair"][tiles]
        origin = self.index.tiles["origin"][tiles]
        members = self.index.members(tiles, self.k)
        meta = self._targets(members, origin)
        rev = meta.pop("reversed") & self.reverse
        xy = meta.pop("xy")
        shape = (len(idx), 2, self.size, self.size)
        image_t, out = self._output(shape, in_worker)
        images = self._scratch(shape) if self.augment else out
        bad = self._read(tiles, pair, origin, rev, images)
        normalize_tiles(images, self.normalization, bad, self._bkg[pair], self._noise[pair],
                        self.asinh_softening)
        if self.augment:
            _, xy = apply_batch(images, xy, d4_elements(self.seed, epoch, idx), out=out)
        batch = {
            "image": image_t,
            "target": xy[:, 0] / np.float32(self.size),
            "xy": xy,
            "dmag": meta["dmag"],
            "dflux": meta["dflux"],
            "valid": members >= 0,
            "reversed": rev,
            "pair": [self._pair_names[p] for p in pair.tolist()],
            "origin": origin,
            "dmag_sel": meta["dmag"][:, 0].copy(),
            "edge_dist": meta["edge_dist"],
            "mag": meta["mag"],
            "snr": meta["snr"],
        }
        # In a worker, the small arrays stay numpy (pickled by value); every tensor would
        # cost a shared-memory file and a descriptor passed over a socket, several times
        # the cost of the image itself. TileLoader turns them into tensors.
        return batch if in_worker else as_tensors(batch)

    # internals -------------------------------------------------------------------------
    def _output(self, shape: tuple[int, ...], in_worker: bool) -> tuple[torch.Tensor, np.ndarray]:
        """The batch's image tensor and a numpy view of it to write into.

        In a worker with ``ring_slots`` set (by :class:`TileLoader`), the tensor is the
        next slot of a ring of shared-memory buffers allocated once per worker: sending it
        costs a descriptor, not a fresh shared-memory file (page faults are dear, in a
        VM especially). The loader copies each image out of its slot as the DataLoader
        yields it. That is before the worker can come round to the slot again: the
        DataLoader dispatches a new task only when it yields a batch, keeps at most
        ``prefetch_factor * num_workers`` tasks between the last yielded batch and the
        newest task, and deals tasks to the workers in turn, so a worker's task ``j`` is
        dispatched after its task ``j - prefetch_factor - 1`` was yielded; ``ring_slots =
        prefetch_factor + 2`` leaves one slot to spare.
        """
        if not (in_worker and self.ring_slots):
            arr = np.empty(shape, dtype=np.float32)
            return torch.from_numpy(arr), arr
        ring = getattr(self, "_ring", None)
        if ring is None or self._ring_pid != os.getpid() or ring[0].shape[0] < shape[0]:
            ring = [torch.empty(shape).share_memory_() for _ in range(self.ring_slots)]
            self._ring, self._ring_pid, self._ring_next = ring, os.getpid(), 0
        slot = ring[self._ring_next][:shape[0]]
        self._ring_next = (self._ring_next + 1) % len(ring)
        return slot, slot.numpy()

    def _scratch(self, shape: tuple[int, ...]) -> np.ndarray:
        """A private buffer reused across batches (per process) for pre-augmentation tiles."""
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape != shape or self._buf_pid != os.getpid():
            buf = np.empty(shape, dtype=np.float32)
            self._buf, self._buf_pid = buf, os.getpid()
        return buf

    def _read(self, tiles, pair, origin, swap, images) -> np.ndarray | None:
        """Fill ``images`` (B, 2, n, n) with raw tiles (channels swapped where ``swap``).

        Returns the bad-pixel mask (NaN/inf, or masked by the file) or None if all good.
        """
        bad: list = []
        for p in np.unique(pair).tolist():
            rows = np.flatnonzero(pair == p)
            self.reader.read_pair((self._paths[0][p], self._paths[1][p]), origin[rows], rows,
                                  swap[rows].astype(np.int64), self.size, images, bad)
        if not bad and np.isfinite(images).all():
            return None
        mask = ~np.isfinite(images)
        for r, c, m in bad:
            mask[r, c] |= m
        return mask

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
            "dflux": np.where(has, ch["dflux"][m], np.nan).astype(np.float32),
            "reversed": first & (ch["dflux"][sel] < 0),
            "edge_dist": np.where(first, edge_distance(xy[:, 0], self.size), nan
                                  ).astype(np.float32),
            "mag": np.where(first, self._bright_mag[sel], nan).astype(np.float32),
            "snr": np.where(first, ch["snr"][sel], nan).astype(np.float32),
        }


def as_tensors(batch: dict) -> dict:
    """Batch with every numpy array turned into a tensor (zero-copy ``torch.from_numpy``)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
            for k, v in batch.items()}


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


class _TensorIter:
    """Iterator over a DataLoader's batches: numpy fields → tensors, images out of the ring.

    Keeps the last ``keep`` received ring tensors alive so that torch maps each worker's
    shared-memory slot once (its cache is keyed by the file and holds weak references).
    """

    def __init__(self, it, copy_images: bool, keep: int):
        self._it = it
        self._copy = copy_images
        self._recent = deque(maxlen=max(keep, 1))

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._it)
        if self._copy:
            slot = batch["image"]
            self._recent.append(slot)
            batch["image"] = torch.from_numpy(slot.numpy().copy())
        return as_tensors(batch)

    def __len__(self) -> int:
        return len(self._it)


class _LazyCountingIter:
    """A :class:`TileLoader` pass: opened at the first ``next``, counting its batches.

    Lightning creates the iterator of a run's first (or resumed) epoch before it calls
    ``set_epoch``; opening it lazily lets the sampler (and, with workers, their first
    prefetch) see the right epoch. The count of delivered batches starts from the
    batches the sampler left out (a resumed epoch).
    """

    def __init__(self, loader: TileLoader):
        self._loader = loader
        self._it = None

    def __iter__(self):
        return self

    def __next__(self):
        loader = self._loader
        if self._it is None:
            self._it = loader._open()
            sampler = loader.sampler
            start = sampler.last_start if isinstance(sampler, EpochSampler) else 0
            loader._delivered = start // loader.batch_size if loader.batch_size else 0
        batch = next(self._it)
        loader._delivered += 1
        return batch

    def __len__(self) -> int:
        return len(self._loader)


class TileLoader(DataLoader):
    """DataLoader for :class:`TileDataset` that delivers every field as a tensor.

    With workers, each worker writes images into a small ring of shared-memory buffers
    and sends the metadata as numpy arrays (see :meth:`TileDataset.__getitems__`); this
    loader copies each image out of its slot as it arrives and turns the metadata into
    tensors, in the main process. Same batches as without workers, several times faster
    than sending fresh tensors on a small machine (``python -m rtcnn.bench data``).

    Resumable: :meth:`state_dict` records the epoch and the batches delivered in it, and
    :meth:`load_state_dict` (Lightning calls both, when saving a checkpoint and when
    resuming from one saved mid-epoch) makes the next pass over that epoch start after
    those batches, so a resumed run sees exactly the batches an uninterrupted one would
    (the order is a function of the seed and the epoch, :class:`EpochSampler`).
    """

    def __init__(self, dataset, *args, **kwargs):
        super().__init__(dataset, *args, **kwargs)
        self._ring = 0
        if self.num_workers > 0 and isinstance(dataset, TileDataset):
            self._ring = (self.prefetch_factor or 2) + 2
        self._delivered = 0  # batches of the current epoch handed out (skipped ones too)

    def __iter__(self):
        self._delivered = 0
        return _LazyCountingIter(self)

    def _open(self):
        """The underlying DataLoader iterator (started on the first batch of a pass)."""
        if self.num_workers == 0:
            return super().__iter__()
        # the workers started here take a copy of the dataset with the ring switched on;
        # the dataset itself keeps it off, so that no other loader (one that would not
        # copy images out of the slots) inherits it
        self.dataset.ring_slots = self._ring
        try:
            it = super().__iter__()
        finally:
            self.dataset.ring_slots = 0
        return _TensorIter(it, self._ring > 0, self._ring * self.num_workers)

    def state_dict(self) -> dict:
        """``{"epoch", "batches"}``: the sampler's epoch and the batches delivered in it."""
        epoch = self.sampler.epoch if isinstance(self.sampler, EpochSampler) else 0
        return {"epoch": int(epoch), "batches": int(self._delivered)}

    def load_state_dict(self, state: dict) -> None:
        """Skip the ``state["batches"]`` batches already seen in epoch ``state["epoch"]``.

        Also sets the sampler's epoch: Lightning creates the first iterator of a resumed
        run before it calls ``set_epoch``, and with workers the sampler is read then.
        """
        if isinstance(self.sampler, EpochSampler) and self.batch_size:
            epoch = int(state.get("epoch", 0))
            self.sampler.set_epoch(epoch)
            self.sampler.skip(epoch, int(state.get("batches", 0)) * self.batch_size)


class EpochSampler(DistributedSampler):
    """Seeded order over ``n`` samples that yields ``(index, epoch)`` keys, sharded under DDP.

    The epoch travels with each key to the workers (so persistent workers need no state),
    and ``set_epoch`` (called by Lightning before each epoch) reshuffles.

    Under distributed training (``num_replicas > 1``) each process takes every
    ``num_replicas``-th key of the epoch's order, from position ``rank``: the shards are
    disjoint and together complete. The order is first padded, as torch's
    :class:`~torch.utils.data.DistributedSampler` does, with its first
    ``-n % num_replicas`` keys, so that every process runs the same number of batches (a
    process with one batch fewer would wait for the others in a collective forever).

    The class derives from :class:`~torch.utils.data.DistributedSampler` only as the sign,
    for Lightning, that it shards by itself: Lightning replaces any other sampler of a
    DDP run with its own wrapper, which would lose the epoch of the keys and the resume
    state of :class:`TileLoader` (a mid-epoch resume under DDP would then restart the
    epoch). With this sampler a resume under DDP is exact: every process has delivered
    the same number of batches, the number the checkpoint records.

    Parameters
    ----------
    n : int
        Number of samples.
    shuffle : bool
        Permute with ``numpy.random.default_rng([seed, epoch])``; else ``0..n-1``.
    seed : int
    num_replicas, rank : int, optional
        Processes and this process's rank; default: those of the initialised
        ``torch.distributed`` process group, else 1 and 0.
    """

    def __init__(self, n: int, shuffle: bool = True, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None):
        # not DistributedSampler.__init__: that needs a process group
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if num_replicas is None:
            num_replicas = torch.distributed.get_world_size() if distributed else 1
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if not 0 <= int(rank) < int(num_replicas):
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.n = int(n)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.drop_last = False
        self.epoch = 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples) to leave out once
        self.last_start = 0  # samples the latest pass left out

    def skip(self, epoch: int, samples: int) -> None:
        """Make the next pass over ``epoch`` start at its ``samples``-th key (resuming).

        ``samples`` counts this process's keys. Passes over other epochs are unaffected
        and clear the request.
        """
        self._skip = (int(epoch), max(int(samples), 0))

    def pending_skip(self) -> int:
        """Keys the next pass will leave out (0 unless :meth:`skip` applies to it)."""
        return self._skip[1] if self._skip is not None and self._skip[0] == self.epoch else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas) if self.n else 0

    @property
    def num_samples(self) -> int:  # DistributedSampler's name for the shard length
        return len(self)

    @property
    def total_size(self) -> int:  # DistributedSampler's name for the padded length
        return len(self) * self.num_replicas

    def shard(self) -> np.ndarray:
        """This process's sample indices of the current epoch, in order (no skip)."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.num_replicas > 1 and self.n:
            pad = -self.n % self.num_replicas
            order = np.concatenate([order, np.resize(order, pad)])[self.rank::self.num_replicas]
        return order

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = self.shard()
        start = self.pending_skip()
        self._skip = None
        self.last_start = start
        e = self.epoch
        return iter([(i, e) for i in order[start:].tolist()])


__all__ = ["EpochSampler", "NORMALIZATIONS", "TileDataset", "TileLoader",
           "TileReader", "as_tensors", "collate_tiles", "d4_elements", "normalize_tiles"]
