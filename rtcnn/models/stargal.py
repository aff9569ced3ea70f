"""``stargal``: a small star/galaxy classifier CNN (the paper's warm-up model), plain torch.

Architecture, for a ``(B, C, n, n)`` stamp centred on one static source (``n = 32``):

* ``len(filters)`` blocks ``Conv2d(3x3, same) -> ReLU -> BatchNorm2d -> MaxPool2d(2) ->
  Dropout`` (:class:`rtcnn.models.attn5.ConvBlock`, the attn5 block): 32 -> 4 px with three;
* ``Flatten -> Dense(hidden) -> ReLU -> Dropout -> Dense(1)``: flattening (instead of
  global pooling) keeps where a feature is, so the centred source counts and its
  neighbours in the stamp do not;
* the output is one logit per stamp, ``(B,)`` float: ``sigmoid(logit)`` is the
  probability that the source is a galaxy (label 1; a star is 0).

This module has no Lightning, Hydra or I/O dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rtcnn.models.attn5 import ConvBlock

DEFAULT_FILTERS = (16, 32, 64)  # conv filters per block (each halves the stamp)
DEFAULT_HIDDEN = 64  # units of the dense layer
DEFAULT_DROPOUT = 0.1
DEFAULT_STAMP = 32  # px, stamp side the dense layer is sized for

__all__ = ["StarGalaxyNet"]


class StarGalaxyNet(nn.Module):
    """Star/galaxy classifier: stamps ``(B, C, n, n)`` -> galaxy logits ``(B,)``.

    Parameters
    ----------
    in_channels : int
        1 (reference image) or 2 (reference and new image).
    stamp_size : int
        Stamp side n in px; a multiple of ``2 ** len(filters)``.
    filters : sequence of int
        Output channels of each conv block.
    hidden : int
        Units of the dense layer.
    dropout : float
        Dropout rate after each block and the dense layer.
    kernel_size : int
        Convolution kernel (odd, 'same' padding).
    """

    def __init__(self, in_channels: int = 1, stamp_size: int = DEFAULT_STAMP,
                 filters: Sequence[int] = DEFAULT_FILTERS, hidden: int = DEFAULT_HIDDEN,
                 dropout: float = DEFAULT_DROPOUT, kernel_size: int = 3):
        super().__init__()
        filters = [int(f) for f in filters]
        if in_channels < 1 or not filters or min(filters) < 1 or hidden < 1:
            raise ValueError("in_channels, filters and hidden must be positive")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        cell = 2 ** len(filters)
        if stamp_size < cell or stamp_size % cell:
            raise ValueError(f"stamp_size ({stamp_size}) must be a multiple of 2**{len(filters)}"
                             f" = {cell}")
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels), "stamp_size": int(stamp_size), "filters": filters,
            "hidden": int(hidden), "dropout": float(dropout), "kernel_size": int(kernel_size),
        }
        chans = [int(in_channels), *filters]
        self.features = nn.Sequential(*(
            ConvBlock(chans[i], chans[i + 1], kernel_size, dropout) for i in range(len(filters))))
        side = stamp_size // cell
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(filters[-1] * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n, n)`` stamps -> ``(B,)`` galaxy logits."""
        c, n = self.config["in_channels"], self.config["stamp_size"]
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2:] != (n, n):
            raise ValueError(f"expected input (B, {c}, {n}, {n}), got {tuple(x.shape)}")
        return self.head(self.features(x))[:, 0]
