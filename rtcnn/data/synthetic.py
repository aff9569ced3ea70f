"""Synthetic tile batches of the data contract, for benchmarks and tests.

:func:`synthetic_tiles` draws tile pairs with the pixel statistics of the data (sky noise,
PSF-like constant sources, one transient in the new epoch); :func:`synthetic_batch` turns
them into a batch dict as :func:`rtcnn.data.collate_tiles` returns it, normalised as the
model's data config does. Used by ``python -m rtcnn.bench train`` (a fixed batch, so the
timing measures the network and not the data layer) and by the tests.
"""

from __future__ import annotations

import math

import numpy as np

from rtcnn.data.dataset import normalize_tiles
from rtcnn.roman import FWHM_PX
from rtcnn.tiles import TILE_SIZE

__all__ = ["PSF_SIGMA", "SKY_NOISE", "SYN_SOURCES", "SYN_UNIQUE", "synthetic_batch",
           "synthetic_tiles"]

SKY_NOISE = 0.1  # e-/s per pixel: noise of the synthetic sky-subtracted tiles
PSF_SIGMA = FWHM_PX["H158"] / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # px, Gaussian sigma
SYN_SOURCES = 4  # constant sources per synthetic tile (both epochs)
SYN_UNIQUE = 4096  # distinct synthetic tiles at most; a larger batch repeats them
MODELS = ("attn5", "dense")  # normalisation of each model's data config (conf/model/<name>)


def synthetic_tiles(n: int, rng: np.random.Generator, size: int = TILE_SIZE
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic tile pairs with the pixel statistics of the data: sky noise, sources, a change.

    Parameters
    ----------
    n : int
        Tiles.
    rng : numpy.random.Generator
        Source of every random number.
    size : int
        Tile side, px.

    Returns
    -------
    images : (n, 2, size, size) float32
        e-/s, sky-subtracted: Gaussian noise (:data:`SKY_NOISE`), :data:`SYN_SOURCES`
        Gaussian PSFs (:data:`PSF_SIGMA`, the H158 FWHM) at 3-1000 sigma peaks in both
        channels, and one transient at 10-300 sigma in channel 1 (new) only.
    xy : (n, 2) float32
        Transient position (x, y), px, 0-based.
    peak : (n,) float32
        Transient peak, e-/s.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = rng.normal(0.0, SKY_NOISE, (n, 2, size, size)).astype(np.float32)

    def psf(x, y, peak):  # (n,) each -> (n, size, size)
        r2 = (xx - x[:, None, None]) ** 2 + (yy - y[:, None, None]) ** 2
        return (peak[:, None, None] * np.exp(-r2 / (2 * PSF_SIGMA**2))).astype(np.float32)

    for _ in range(SYN_SOURCES):
        x, y = rng.uniform(-0.5, size - 0.5, (2, n)).astype(np.float32)
        images += psf(x, y, SKY_NOISE * 10 ** rng.uniform(0.5, 3.0, n))[:, None]
    xy = rng.uniform(2.0, size - 3.0, (n, 2)).astype(np.float32)
    peak = (SKY_NOISE * 10 ** rng.uniform(1.0, 2.5, n)).astype(np.float32)
    images[:, 1] += psf(xy[:, 0], xy[:, 1], peak)
    return images, xy, peak


def synthetic_batch(model: str, n: int, seed: int = 0, size: int = TILE_SIZE) -> dict:
    """A training batch of the data contract (:mod:`rtcnn.data`) from :func:`synthetic_tiles`.

    Parameters
    ----------
    model : {'attn5', 'dense'}
        ``attn5``: minmax-normalised tiles (the data layer's default for it); ``dense``:
        raw e-/s tiles (``experiment=dense`` uses ``normalization: none``).
    n : int
        Tiles in the batch; at most :data:`SYN_UNIQUE` distinct ones, repeated to fill a
        larger batch.
    seed : int
        Seed of the tiles.
    size : int
        Tile side, px.

    Returns
    -------
    dict of str -> torch.Tensor
        ``image`` (n, 2, size, size) float32, ``target`` (n, 2) = ``xy / size``, ``xy``
        (n, 1, 2) px, ``valid`` (n, 1) bool, ``dflux`` (n, 1) e-/s, ``dmag`` (n, 1) mag,
        ``reversed`` (n,) bool, ``snr`` (n,) peak / sky noise.
    """
    import torch

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    rng = np.random.default_rng(seed)
    images, xy, peak = synthetic_tiles(min(n, SYN_UNIQUE), rng, size)
    if n > SYN_UNIQUE:  # the same compute per tile; saves minutes at GPU batch sizes
        reps = -(-n // SYN_UNIQUE)
        images, xy, peak = (np.concatenate([a] * reps)[:n] for a in (images, xy, peak))
    if model == "attn5":
        normalize_tiles(images, "minmax")
    flux = peak * 2 * np.pi * PSF_SIGMA**2  # e-/s
    batch = {
        "image": images, "target": xy / np.float32(size), "xy": xy[:, None],
        "valid": np.ones((len(xy), 1), bool), "dflux": flux[:, None],
        "dmag": rng.uniform(0.2, 3.0, (len(xy), 1)).astype(np.float32),
        "reversed": np.zeros(len(xy), bool),
        "snr": (peak / SKY_NOISE).astype(np.float32),
    }
    return {k: torch.from_numpy(v) for k, v in batch.items()}
