"""``attn5``: the paper's localisation CNN as a plain :class:`torch.nn.Module`.

Architecture (paper, Sect. "Model" and Fig. 2), for a ``(B, 2, 64, 64)`` input whose
two channels are the reference and the new image of one tile:

* ``depth`` (default 5) convolutional blocks, each
  ``Conv2d(3x3, padding='same') -> ReLU -> BatchNorm2d -> MaxPool2d(2) -> Dropout(p)``;
  with the default filters ``(32, 64, 128, 128, 256)`` a 64x64 tile becomes a
  ``(B, 256, 2, 2)`` feature map;
* a spatial attention layer: ``a = sigmoid(Conv2d(C -> 1, k x k))`` gives a
  ``(B, 1, h, w)`` weight map that is multiplied element-wise into the features;
* global average pooling -> ``Dense(hidden=128) -> ReLU -> Dropout(p) -> Dense(2)``
  (``head='gap'``, the paper).

The output is the transient position ``(x, y)`` in the tile divided by the tile size
(64), i.e. in "tile units" where pixel centre ``0`` maps to ``0`` (package convention,
:mod:`rtcnn`). As in the paper (a Keras ``Dense(2)`` with MSE loss) the head is linear by
default; ``out_activation='sigmoid'`` bounds it to ``(0, 1)`` instead.

``head='softargmax'`` (not in the paper) keeps the blocks and the attention convolution
but reads the position out of the attention map itself: the map is normalised with a
softmax over the ``h x w`` cells, and the output is the attention-weighted mean of the
cell centres plus a learned sub-cell offset (``tanh`` of a 1x1 convolution, at most one
cell). With ``pool_blocks=3`` the map has 8x8 cells of 8 px. A global-average-pooled
dense head must learn absolute position from the zero padding at the tile edges and
needs thousands of epochs for that (the paper trained 7000); the soft-argmax readout is
translation-equivariant by construction and reaches the same accuracy in ~100 epochs on
a CPU. See ``conf/model/attn5.yaml`` for the defaults of the training command.

This module has no Lightning, Hydra or I/O dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

DEFAULT_FILTERS = (32, 64, 128, 128, 256)  # conv filters per block (paper: five blocks)
DEFAULT_DROPOUT = 0.2  # dropout rate after every block and after the dense layer (paper)
DEFAULT_HIDDEN = 128  # units of the dense layer before the output (paper)
DEFAULT_KERNEL = 3  # conv kernel size in px, 'same' padding (paper)
DEFAULT_ATTENTION_KERNEL = 1  # kernel of the attention convolution (1x1: a per-pixel gate)
N_OUTPUTS = 2  # (x, y) / tile size
HEADS = ("gap", "softargmax")
OUT_ACTIVATIONS = (None, "sigmoid")

__all__ = ["Attn5", "ConvBlock", "HEADS", "OUT_ACTIVATIONS", "SoftArgmaxHead",
           "SpatialAttention", "n_parameters"]


def _check_args(
    in_channels: int,
    filters: Sequence[int],
    kernel_size: int,
    attention_kernel: int,
    hidden: int,
    dropout: float,
    out_activation: str | None,
    head: str,
    pool_blocks: int,
) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if len(filters) < 1 or any(int(f) < 1 for f in filters):
        raise ValueError(f"filters must be a non-empty list of positive ints, got {list(filters)}")
    for name, k in (("kernel_size", kernel_size), ("attention_kernel", attention_kernel)):
        if k < 1 or k % 2 == 0:
            raise ValueError(f"{name} must be a positive odd int, got {k}")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if out_activation not in OUT_ACTIVATIONS:
        raise ValueError(f"out_activation must be one of {OUT_ACTIVATIONS}, got {out_activation!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "softargmax" and out_activation is not None:
        raise ValueError("out_activation applies to head='gap' only")
    if not 0 <= pool_blocks <= len(filters):
        raise ValueError(f"pool_blocks must be in [0, {len(filters)}], got {pool_blocks}")


class ConvBlock(nn.Sequential):
    """``Conv2d(k, same) -> ReLU -> BatchNorm2d -> MaxPool2d(2) -> Dropout``: halves H and W.

    With ``pool=False`` the MaxPool is left out and H, W are kept.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int, dropout: float,
                 pool: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, kernel_size, padding=kernel_size // 2),
            nn.ReLU(inplace=True),
            nn.BatchNorm2d(c_out),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2))
        layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class SpatialAttention(nn.Module):
    """Multiply features by a sigmoid weight map computed from them by one convolution.

    ``forward(x)``: ``x`` (B, C, h, w) -> ``x * sigmoid(conv(x))``, same shape; the map
    itself, (B, 1, h, w) in (0, 1), is kept in :attr:`last_map` for inspection.
    """

    def __init__(self, channels: int, kernel_size: int = DEFAULT_ATTENTION_KERNEL):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2)
        self.last_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.conv(x))
        self.last_map = weights.detach()
        return x * weights


class SoftArgmaxHead(nn.Module):
    """Position = softmax-attention-weighted mean of (cell centre + learned offset).

    ``forward(f, size)``: features ``f`` (B, C, h, w) of a ``size x size`` px input ->
    ``(B, 2)`` ``(x, y) / size``. Cell ``j`` of ``h`` spans ``size / h`` px; its centre is
    at ``(j + 0.5) * size / h - 0.5`` px (0-based pixel centres). The offset is
    ``tanh(conv1x1(f))`` cells (at most one cell). The normalised attention map
    (B, 1, h, w), summing to 1, is kept in :attr:`last_map`.
    """

    def __init__(self, channels: int, kernel_size: int = DEFAULT_ATTENTION_KERNEL):
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, kernel_size, padding=kernel_size // 2)
        self.offset = nn.Conv2d(channels, N_OUTPUTS, 1)
        self.last_map: torch.Tensor | None = None

    def forward(self, f: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, _, h, w = f.shape
        height, width = size
        weights = torch.softmax(self.conv(f).flatten(1), dim=1).view(b, 1, h, w)
        self.last_map = weights.detach()
        # cell centres and cell sizes in tile units (px / input size)
        xs = ((torch.arange(w, device=f.device, dtype=f.dtype) + 0.5) * (width / w) - 0.5) / width
        ys = ((torch.arange(h, device=f.device, dtype=f.dtype) + 0.5) * (height / h) - 0.5) / height
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy])[None]  # (1, 2, h, w): (x, y)
        cell = torch.tensor([1.0 / w, 1.0 / h], device=f.device, dtype=f.dtype).view(1, 2, 1, 1)
        positions = centres + torch.tanh(self.offset(f)) * cell
        return (weights * positions).sum(dim=(2, 3))


class Attn5(nn.Module):
    """The paper's CNN: conv blocks, spatial attention, GAP, dense head -> ``(x, y) / 64``.

    Parameters
    ----------
    in_channels : int
        Input channels; 2 = (reference, new).
    filters : sequence of int
        Filters of each conv block; its length is the depth (paper: 5 blocks).
    kernel_size : int
        Odd conv kernel size, 'same' padding.
    attention_kernel : int
        Odd kernel size of the attention convolution.
    hidden : int
        Units of the dense layer after global average pooling (``head='gap'``).
    dropout : float
        Dropout rate after every block and after the dense layer, in [0, 1).
    out_activation : {None, 'sigmoid'}
        None (default, the paper's linear ``Dense(2)``) or 'sigmoid' to bound the output
        (``head='gap'`` only).
    head : {'gap', 'softargmax'}
        'gap' (default, the paper): attention-weighted features -> global average pooling
        -> dense layers. 'softargmax': the position read out of the softmax-normalised
        attention map (module docstring).
    pool_blocks : int, optional
        How many blocks, from the first, end with a 2x2 max-pool (default: all, the
        paper). The input side must be divisible by ``2 ** pool_blocks``.

    Notes
    -----
    Trainable parameters (``n_parameters``), with ``c_0 = in_channels``, ``c_i = filters[i-1]``,
    ``k = kernel_size``, ``a = attention_kernel``, ``h = hidden``, ``L = len(filters)``::

        sum_i (k^2 c_{i-1} c_i + c_i)   conv weights + biases
        + sum_i 2 c_i                   BatchNorm gamma, beta
        + a^2 c_L + 1                   attention conv
        + c_L h + h + 2 h + 2           dense layers            (head='gap')
        + 2 c_L + 2                     1x1 offset conv         (head='softargmax')

    For the paper's defaults this is 570,339 (see :func:`n_parameters`).
    """

    def __init__(
        self,
        in_channels: int = 2,
        filters: Sequence[int] = DEFAULT_FILTERS,
        kernel_size: int = DEFAULT_KERNEL,
        attention_kernel: int = DEFAULT_ATTENTION_KERNEL,
        hidden: int = DEFAULT_HIDDEN,
        dropout: float = DEFAULT_DROPOUT,
        out_activation: str | None = None,
        head: str = "gap",
        pool_blocks: int | None = None,
    ):
        super().__init__()
        filters = [int(f) for f in filters]
        pool_blocks = len(filters) if pool_blocks is None else int(pool_blocks)
        _check_args(in_channels, filters, kernel_size, attention_kernel, hidden, dropout,
                    out_activation, head, pool_blocks)
        self.config: dict[str, Any] = {
            "in_channels": int(in_channels),
            "filters": filters,
            "kernel_size": int(kernel_size),
            "attention_kernel": int(attention_kernel),
            "hidden": int(hidden),
            "dropout": float(dropout),
            "out_activation": out_activation,
            "head": head,
            "pool_blocks": pool_blocks,
        }
        chans = [in_channels, *filters]
        self.features = nn.Sequential(*(
            ConvBlock(chans[i], chans[i + 1], kernel_size, dropout, pool=i < pool_blocks)
            for i in range(len(filters))
        ))
        self.head_kind = head
        if head == "gap":
            self.attention: nn.Module = SpatialAttention(filters[-1], attention_kernel)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Sequential(
                nn.Flatten(),
                nn.Linear(filters[-1], hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                nn.Linear(hidden, N_OUTPUTS),
            )
        else:
            self.attention = SoftArgmaxHead(filters[-1], attention_kernel)
        self.out_activation = out_activation
        self.min_size = 2**pool_blocks  # px, the input side must be a multiple of this

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict positions.

        Parameters
        ----------
        x : (B, in_channels, H, W) float tensor
            Tiles (channel 0 reference, 1 new); ``H`` and ``W`` divisible by
            ``2 ** pool_blocks`` (64 for the paper's tiles).

        Returns
        -------
        (B, 2) float tensor
            ``(x, y)`` of the transient in units of the tile size.
        """
        if x.ndim != 4 or x.shape[1] != self.config["in_channels"]:
            raise ValueError(
                f"expected input (B, {self.config['in_channels']}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-1] % self.min_size or x.shape[-2] % self.min_size:
            raise ValueError(
                f"input side {tuple(x.shape[-2:])} px must be divisible by {self.min_size} "
                f"(2 ** pool_blocks for {self.config['pool_blocks']} pooling blocks)"
            )
        features = self.features(x)
        # the readout in float32 even under bf16 autocast: a bf16 position is quantised to
        # 1/256 of the tile (0.25 px); the convolutions above keep the speed of bf16
        with torch.autocast(device_type=x.device.type, enabled=False):
            features = features.float()
            if self.head_kind == "softargmax":
                return self.attention(features, (x.shape[-2], x.shape[-1]))
            out = self.head(self.pool(self.attention(features)))
        if self.out_activation == "sigmoid":
            out = torch.sigmoid(out)
        return out


def n_parameters(
    in_channels: int = 2,
    filters: Sequence[int] = DEFAULT_FILTERS,
    kernel_size: int = DEFAULT_KERNEL,
    attention_kernel: int = DEFAULT_ATTENTION_KERNEL,
    hidden: int = DEFAULT_HIDDEN,
    head: str = "gap",
) -> int:
    """Trainable parameter count of :class:`Attn5` from its formula (class Notes)."""
    chans = [in_channels, *filters]
    conv = sum(kernel_size**2 * chans[i] * chans[i + 1] + chans[i + 1] for i in range(len(filters)))
    bn = sum(2 * c for c in filters)
    attention = attention_kernel**2 * filters[-1] + 1
    if head == "gap":
        readout = filters[-1] * hidden + hidden + hidden * N_OUTPUTS + N_OUTPUTS
    else:
        readout = filters[-1] * N_OUTPUTS + N_OUTPUTS
    return conv + bn + attention + readout
