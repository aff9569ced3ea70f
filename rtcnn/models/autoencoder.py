"""``autoencoder``: the paper's first attempt (its appendix), as a plain :class:`torch.nn.Module`.

An encoder, a bottleneck and a decoder turn a ``(B, 2, n, n)`` tile pair (reference, new)
into a ``(B, 1, n, n)`` "transient only" image: the Roman PSF drawn at each transient's
position on a blank tile (:func:`render_points` draws the training truth), from which the
positions are read off the peak(s) (:func:`peak_positions`).

Architecture (``n = 64``, default filters ``(16, 32, 64)``):

* encoder: one :class:`rtcnn.models.attn5.ConvBlock` per filter (conv 3x3, ReLU,
  BatchNorm, max-pool 2, dropout): 64 -> 8 px;
* bottleneck (``bottleneck='dense'``, the paper's "flatten ... latent points"):
  ``Flatten -> Dense(latent) -> ReLU -> Dense(C * 8 * 8) -> ReLU`` back to the 8x8 map;
  ``bottleneck='conv'`` keeps the 8x8 map (a 1x1 convolution), so where a feature is
  survives the bottleneck;
* decoder: per level ``Upsample(2, nearest) -> Conv 3x3 -> ReLU -> BatchNorm`` back to
  64 px, then a 1x1 convolution to one linear output channel.

This module has no Lightning, Hydra or I/O dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtcnn.models.attn5 import ConvBlock

DEFAULT_FILTERS = (16, 32, 64)
DEFAULT_LATENT = 256  # units of the dense bottleneck
BOTTLENECKS = ("dense", "conv")
PEAK_WINDOW = 3  # px, window of the non-maximum suppression and the centroid refinement

__all__ = ["PairAutoencoder", "peak_positions", "render_points"]


class PairAutoencoder(nn.Module):
    """Tile pair ``(B, C, n, n)`` -> reconstructed transient image ``(B, 1, n, n)``.

    Parameters
    ----------
    in_channels : int
        2 (reference, new).
    tile_size : int
        n, a multiple of ``2 ** len(filters)``.
    filters : sequence of int
        Encoder channels per level (the decoder mirrors them).
    latent : int
        Units of the dense bottleneck.
    bottleneck : {'dense', 'conv'}
        Flatten through ``latent`` units (the paper) or keep the spatial map.
    dropout : float
        Dropout of the encoder blocks.
    """

    def __init__(self, in_channels: int = 2, tile_size: int = 64,
                 filters: Sequence[int] = DEFAULT_FILTERS, latent: int = DEFAULT_LATENT,
                 bottleneck: str = "dense", dropout: float = 0.0):
        super().__init__()
        filters = [int(f) for f in filters]
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
        if in_channels < 1 or not filters or min(filters) < 1 or latent < 1:
            raise ValueError("in_channels, filters and latent must be positive")
        cell = 2 ** len(filters)
        if tile_size < cell or tile_size % cell:
            raise ValueError(f"tile_size ({tile_size}) must be a multiple of {cell}")
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels), "tile_size": int(tile_size), "filters": filters,
            "latent": int(latent), "bottleneck": bottleneck, "dropout": float(dropout),
        }
        chans = [int(in_channels), *filters]
        self.encoder = nn.Sequential(*(ConvBlock(chans[i], chans[i + 1], 3, dropout)
                                       for i in range(len(filters))))
        side = tile_size // cell
        c = filters[-1]
        if bottleneck == "dense":
            self.bottleneck = nn.Sequential(
                nn.Flatten(), nn.Linear(c * side * side, latent), nn.ReLU(inplace=True),
                nn.Linear(latent, c * side * side), nn.ReLU(inplace=True),
                nn.Unflatten(1, (c, side, side)))
        else:
            self.bottleneck = nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))
        ups = []
        for c_in, c_out in zip(filters[::-1], [*filters[::-1][1:], filters[0]]):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                    nn.ReLU(inplace=True), nn.BatchNorm2d(c_out)]
        self.decoder = nn.Sequential(*ups, nn.Conv2d(filters[0], 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n, n)`` -> ``(B, 1, n, n)`` reconstruction (linear, peak ~1 per transient)."""
        c, n = self.config["in_channels"], self.config["tile_size"]
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2:] != (n, n):
            raise ValueError(f"expected input (B, {c}, {n}, {n}), got {tuple(x.shape)}")
        return self.decoder(self.bottleneck(self.encoder(x)))


def render_points(xy: torch.Tensor, kernel: torch.Tensor, oversample: int,
                  size: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Draw a PSF at each position on blank ``size x size`` tiles (the autoencoder's truth).

    Parameters
    ----------
    xy : (B, K, 2) tensor
        ``(x, y)`` px in the tile (0-based, integer = pixel centre); NaN rows are empty
        slots.
    kernel : (m, m) tensor
        The effective (pixel-convolved) PSF sampled every ``1 / oversample`` px, centred
        at ``((m - 1) / 2, (m - 1) / 2)``, any normalisation: each source is drawn with
        the kernel's values, so a source on a pixel centre peaks at ``kernel.max()``
        when the kernel's peak is at its centre.
    oversample : int
        Kernel samples per native px.
    size : int
        Tile side n, px.
    weight : (B, K) tensor, optional
        Amplitude of each source (default 1).

    Returns
    -------
    (B, 1, n, n) tensor: the sum of the sources (bilinear interpolation of the kernel at
    each pixel's offset from the source; zero beyond the kernel's box).
    """
    b, k, _ = xy.shape
    m = kernel.shape[-1]
    device, dtype = kernel.device, kernel.dtype
    grid = torch.arange(size, device=device, dtype=dtype)
    valid = torch.isfinite(xy).all(-1)  # (B, K)
    pos = torch.where(valid[..., None], xy.to(dtype), torch.zeros((), device=device, dtype=dtype))
    centre = (m - 1) / 2.0
    # fine-grid coordinates of each pixel relative to each source -> [-1, 1] for grid_sample
    u = (grid[None, None, None, :] - pos[..., 0, None, None]) * oversample + centre  # (B,K,1,n)
    v = (grid[None, None, :, None] - pos[..., 1, None, None]) * oversample + centre  # (B,K,n,1)
    u, v = torch.broadcast_tensors(u, v)
    g = torch.stack([u, v], -1) / (m - 1) * 2.0 - 1.0  # (B, K, n, n, 2), (x, y) order
    img = kernel[None, None].expand(b * k, 1, m, m)
    out = F.grid_sample(img, g.reshape(b * k, size, size, 2), mode="bilinear",
                        padding_mode="zeros", align_corners=True).reshape(b, k, size, size)
    amp = valid.to(dtype)
    if weight is not None:
        amp = amp * torch.nan_to_num(weight.to(device=device, dtype=dtype))
    out = out * amp[..., None, None]
    return out.sum(1, keepdim=True)


@torch.no_grad()
def peak_positions(image: torch.Tensor, k: int = 1,
                   window: int = PEAK_WINDOW) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest local maxima of each image, refined by a local centroid.

    Parameters
    ----------
    image : (B, 1, n, n) or (B, n, n) tensor
    k : int
        Peaks per image, highest first.
    window : int
        Odd side (px) of the non-maximum suppression and of the centroid window (values
        below the window's minimum do not count).

    Returns
    -------
    xy : (B, k, 2) float tensor
        ``(x, y)`` px, 0-based (integer = pixel centre).
    value : (B, k) tensor
        The image value at each integer peak.
    """
    img = image[:, 0] if image.ndim == 4 else image
    b, n, _ = img.shape
    img = img.float()
    pooled = F.max_pool2d(img[:, None], window, stride=1, padding=window // 2)[:, 0]
    peaks = torch.where(img >= pooled, img, torch.full_like(img, -torch.inf))
    value, flat = peaks.reshape(b, -1).topk(k, dim=1)
    iy, ix = flat // n, flat % n
    r = window // 2
    off = torch.arange(-r, r + 1, device=img.device)
    yy = (iy[..., None, None] + off[None, None, :, None]).clamp(0, n - 1)  # (B, k, w, 1)
    xx = (ix[..., None, None] + off[None, None, None, :]).clamp(0, n - 1)  # (B, k, 1, w)
    yy, xx = torch.broadcast_tensors(yy, xx)
    patch = img[torch.arange(b, device=img.device)[:, None, None, None], yy, xx]  # (B,k,w,w)
    w = (patch - patch.amin(dim=(-2, -1), keepdim=True)).clamp(min=0)
    total = w.sum(dim=(-2, -1)).clamp(min=1e-12)
    cx = (w * xx).sum(dim=(-2, -1)) / total
    cy = (w * yy).sum(dim=(-2, -1)) / total
    flat_ok = w.sum(dim=(-2, -1)) > 0
    x = torch.where(flat_ok, cx, ix.float())
    y = torch.where(flat_ok, cy, iy.float())
    return torch.stack([x, y], -1), value
