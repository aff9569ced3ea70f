"""The dense transient detector (``model=dense``): a small fully convolutional net.

Input is a reference/new pair ``(B, 2, H, W)`` (channel 0 = reference, 1 = new,
float32 e-/s, background-subtracted, ``[y, x]``); output is a grid of *cells*
of ``stride`` px (CenterNet style) with, per cell,

* ``heat``   (B, 1, h, w) logit that a transient's centre lies in the cell,
* ``offset`` (B, 2, h, w) ``(dx, dy)`` px from the cell centre to the transient,
* ``dmag``   (B, 1, h, w) magnitude change (AB mag, as in the training data: ``|dm|``),
* ``sign``   (B, 1, h, w) logit that the source brightened (``new > ref``),

with ``h = H // stride``, ``w = W // stride``. Cell ``(i, j)`` covers the pixels
``j*stride <= x + 0.5 < (j+1)*stride`` (and likewise ``i`` for ``y``); its centre
is at ``x = j*stride + (stride - 1) / 2`` in the package convention
(:mod:`rtcnn`: 0-based, integer = pixel centre).

The module also holds the target encoding (:func:`encode_targets`) and the
decoding of outputs into sources (:func:`decode`), both pure torch, so that the
Lightning task, the catalog command and the tests share one definition.
No Lightning, Hydra or I/O here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rtcnn.stats import MAD_TO_SIGMA, MIN_SIGMA

__all__ = ["ASINH_SCALE", "DEFAULT_CHANNELS", "DEFAULT_STRIDE", "DEFAULT_THRESHOLD", "HEAT_SIGMA",
           "REGRESS_RADIUS", "DenseDetector", "cell_centers", "decode", "detector_loss",
           "encode_targets", "focal_loss", "fuse_batchnorm", "normalize_pair", "robust_sigma"]

DEFAULT_STRIDE = 4  # px per output cell
DEFAULT_CHANNELS = (16, 24, 32)  # feature channels at strides 1, 2 and 4
ASINH_SCALE = 3.0  # noise sigmas: inputs are linear within about +-3 sigma, log beyond
DEFAULT_THRESHOLD = 0.5  # score (probability) of a reported source when nothing else is set
HEAT_SIGMA = 0.6  # cells, width of the Gaussian splatted around each transient
REGRESS_RADIUS = 1  # cells: offsets/dmag/sign are trained in the (2r+1)^2 cells around a source


def robust_sigma(images: torch.Tensor) -> torch.Tensor:
    """Per-sample pixel noise of a pair, from the median absolute deviation.

    Parameters
    ----------
    images : (B, 2, H, W) float tensor
        Reference and new image (e-/s).

    Returns
    -------
    sigma : (B,) float tensor
        ``1.4826 * MAD`` averaged over the two channels (e-/s per pixel), floored at
        :data:`MIN_SIGMA`. Sources bias it little as long as most pixels are sky.
    """
    if images.ndim != 4 or images.shape[1] != 2:
        raise ValueError(f"images must be (B, 2, H, W), got {tuple(images.shape)}")
    flat = images.flatten(2).float()
    med = flat.median(dim=-1, keepdim=True).values
    mad = (flat - med).abs().median(dim=-1).values  # (B, 2)
    return (MAD_TO_SIGMA * mad.mean(dim=1)).clamp_min(MIN_SIGMA)


def normalize_pair(images: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Three noise-scaled, asinh-compressed input planes: difference, reference, new.

    Parameters
    ----------
    images : (B, 2, H, W) float tensor
        Reference and new image (e-/s). NaNs (bad pixels) are set to zero.
    sigma : (B,) tensor or None
        Pixel noise (e-/s) per sample; ``None`` estimates it with :func:`robust_sigma`.
        A whole image should pass one global value so that stamps agree.

    Returns
    -------
    planes : (B, 3, H, W) float tensor
        ``s * asinh(p / (s * sigma))`` for ``p`` in (new - ref, ref, new), ``s`` =
        :data:`ASINH_SCALE`.
    """
    images = torch.nan_to_num(images.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if sigma is None:
        sigma = robust_sigma(images)
    scale = (ASINH_SCALE * sigma.float()).reshape(-1, 1, 1, 1)
    ref, new = images[:, 0:1], images[:, 1:2]
    planes = torch.cat([new - ref, ref, new], dim=1) / scale
    return ASINH_SCALE * torch.asinh(planes)


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class DenseDetector(nn.Module):
    """Fully convolutional transient detector with outputs on a ``stride``-px cell grid.

    Architecture: two 3x3 convolutions at full resolution, a strided 3x3 convolution
    and one more 3x3 convolution per factor of two, two 3x3 convolutions at the
    output stride (receptive field 31 px at the defaults), then 1x1 heads. Every
    convolution is followed by batch norm and ReLU.

    Parameters
    ----------
    channels : sequence of int
        Feature channels at strides 1, 2, 4, ...; ``len(channels) - 1`` halvings, so
        the output stride is ``2 ** (len(channels) - 1)``.
    head_channels : int
        Hidden channels of the 1x1 heads.
    prior : float
        Initial transient probability of every cell (focal-loss initialisation).
    """

    def __init__(
        self,
        channels: tuple[int, ...] | list[int] = DEFAULT_CHANNELS,
        head_channels: int = 32,
        prior: float = 0.01,
    ):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) < 1 or min(channels) <= 0:
            raise ValueError(f"channels must be positive integers, got {channels}")
        if not 0.0 < prior < 1.0:
            raise ValueError(f"prior must lie in (0, 1), got {prior}")
        self.config: dict[str, Any] = {
            "channels": list(channels),
            "head_channels": int(head_channels),
            "prior": float(prior),
        }
        self.stride = 2 ** (len(channels) - 1)
        layers = [_conv(3, channels[0]), _conv(channels[0], channels[0])]
        for c_prev, c in zip(channels[:-1], channels[1:]):
            layers += [_conv(c_prev, c, stride=2), _conv(c, c)]
        layers += [_conv(channels[-1], channels[-1])]
        self.body = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Conv2d(channels[-1], head_channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(head_channels, 5, 1),  # heat, dx, dy, dmag, sign
        )
        with torch.no_grad():
            self.head[-1].bias.zero_()
            self.head[-1].bias[0] = math.log(prior / (1.0 - prior))

    def forward(
        self, images: torch.Tensor, sigma: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the detector.

        Parameters
        ----------
        images : (B, 2, H, W) float tensor
            Reference and new image in e-/s; ``H`` and ``W`` multiples of ``stride``.
        sigma : (B,) tensor or None
            Pixel noise (e-/s); ``None`` estimates it per sample (:func:`robust_sigma`).

        Returns
        -------
        out : dict of tensors
            ``heat`` (B,1,h,w) logits, ``offset`` (B,2,h,w) px, ``dmag`` (B,1,h,w) mag,
            ``sign`` (B,1,h,w) logits; ``h, w = H // stride, W // stride``.
        """
        if images.ndim != 4 or images.shape[1] != 2:
            raise ValueError(f"images must be (B, 2, H, W), got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ValueError(f"image size {h}x{w} is not a multiple of the stride {self.stride}")
        x = normalize_pair(images, sigma)
        if images.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        raw = self.head(self.body(x)).float()
        return {
            "heat": raw[:, 0:1],
            "offset": raw[:, 1:3],
            "dmag": raw[:, 3:4],
            "sign": raw[:, 4:5],
        }


def fuse_batchnorm(net: DenseDetector) -> DenseDetector:
    """Fold every eval-mode BatchNorm into the convolution before it, in place.

    Inference only: ``conv(x) * g / sqrt(var + eps) + (b - mean * g / sqrt(var + eps))``
    is one convolution with rescaled weights and a bias, so each block does one pass
    over the features instead of two. Outputs agree with the unfused net to float
    rounding. The net is put in eval mode; returns it.
    """
    net.eval()
    for block in net.body:
        conv, bn = block[0], block[1]
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias)
        block[1] = nn.Identity()
    return net


def cell_centers(h: int, w: int, stride: int, device=None) -> torch.Tensor:
    """Pixel positions of the cell centres, ``(h, w, 2)`` float32 ``(x, y)`` px."""
    c = (stride - 1) / 2.0
    ys = torch.arange(h, device=device, dtype=torch.float32) * stride + c
    xs = torch.arange(w, device=device, dtype=torch.float32) * stride + c
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx, yy], dim=-1)


def encode_targets(
    xy: torch.Tensor,
    valid: torch.Tensor,
    dmag: torch.Tensor,
    brightened: torch.Tensor,
    shape: tuple[int, int],
    stride: int = DEFAULT_STRIDE,
    heat_sigma: float = HEAT_SIGMA,
    radius: int = REGRESS_RADIUS,
) -> dict[str, torch.Tensor]:
    """Encode the transients of each tile as dense cell targets.

    Parameters
    ----------
    xy : (B, K, 2) float tensor
        Transient positions ``(x, y)`` in px in the tile (NaN where padded).
    valid : (B, K) bool tensor
        Which of the K entries are real transients inside the tile.
    dmag : (B, K) float tensor
        Magnitude change to regress (mag; the data's convention, e.g. ``|m_new - m_ref|``).
        Non-finite values are not trained on (``dmag_w`` = 0).
    brightened : (B, K) bool tensor
        True where the source is brighter in the new image.
    shape : (H, W)
        Tile size in px (multiples of ``stride``).
    stride : int
        Cell size in px.
    heat_sigma : float
        Width (cells) of the Gaussian splatted around each transient; the cell that
        contains a transient is exactly 1.
    radius : int
        Offsets/dmag/sign are regressed in the ``(2 radius + 1)^2`` cells around each
        transient's cell, each relative to its own cell centre.

    Returns
    -------
    targets : dict of tensors
        ``heat`` (B,1,h,w) in [0, 1]; ``pos`` (B,1,h,w) bool, the cells holding a
        transient; ``offset`` (B,2,h,w) px from the cell centre to the nearest
        transient; ``dmag`` (B,1,h,w); ``sign`` (B,1,h,w) 1 = brightened;
        ``reg_w`` (B,1,h,w) regression weight (the heat value inside the regression
        window, else 0); ``dmag_w`` (B,1,h,w) the same, zero where dmag is unknown.
    """
    if xy.ndim != 3 or xy.shape[-1] != 2:
        raise ValueError(f"xy must be (B, K, 2), got {tuple(xy.shape)}")
    for name, arr in (("valid", valid), ("dmag", dmag), ("brightened", brightened)):
        if arr.shape != xy.shape[:2]:
            raise ValueError(f"{name} {tuple(arr.shape)} must be (B, K) = {tuple(xy.shape[:2])}")
    H, W = shape
    if H % stride or W % stride:
        raise ValueError(f"tile size {H}x{W} is not a multiple of the stride {stride}")
    h, w = H // stride, W // stride
    device = xy.device
    valid = valid.bool() & torch.isfinite(xy).all(-1)
    xy = torch.where(valid[..., None], xy.float(), torch.full_like(xy, -1e6, dtype=torch.float32))
    # cell index of each transient; sources outside the tile are dropped
    cell = torch.floor((xy + 0.5) / stride).long()  # (B,K,2)
    valid = valid & (cell[..., 0] >= 0) & (cell[..., 0] < w) & (cell[..., 1] >= 0)
    valid = valid & (cell[..., 1] < h)
    centers = cell_centers(h, w, stride, device)  # (h,w,2)
    # distance in cells from every cell centre to every transient: (B,K,h,w)
    d = (centers[None, None] - xy[:, :, None, None, :]) / stride
    g = torch.exp(-(d**2).sum(-1) / (2.0 * heat_sigma**2))
    ci = torch.arange(h, device=device).view(1, 1, h, 1)
    cj = torch.arange(w, device=device).view(1, 1, 1, w)
    own = (ci == cell[..., 1, None, None]) & (cj == cell[..., 0, None, None])
    g = torch.where(own, torch.ones_like(g), g)
    window = ((ci - cell[..., 1, None, None]).abs() <= radius) & (
        (cj - cell[..., 0, None, None]).abs() <= radius
    )
    g = g * valid[..., None, None]
    heat, nearest = g.max(dim=1) if g.shape[1] else (g.sum(1), None)  # (B,h,w)
    pos = (own & valid[..., None, None]).any(dim=1)
    B = xy.shape[0]
    offset = torch.zeros(B, 2, h, w, device=device)
    dm = torch.zeros(B, 1, h, w, device=device)
    sign = torch.zeros(B, 1, h, w, device=device)
    reg_w = torch.zeros(B, 1, h, w, device=device)
    dmag_w = torch.zeros(B, 1, h, w, device=device)
    if nearest is not None:
        idx = nearest[:, None, :, :]  # (B,1,h,w) index of the dominant transient per cell
        sel_xy = torch.gather(xy, 1, nearest.flatten(1)[..., None].expand(-1, -1, 2))
        sel_xy = sel_xy.view(B, h, w, 2)
        offset = (sel_xy - centers[None]).permute(0, 3, 1, 2) * (heat[:, None] > 0)
        dmag_f = dmag.float()
        sel_dm = torch.gather(dmag_f, 1, nearest.flatten(1)).view(B, 1, h, w)
        in_win = torch.gather(window & valid[..., None, None], 1, idx).float()
        reg_w = heat[:, None] * in_win
        finite = torch.isfinite(sel_dm)
        dmag_w = reg_w * finite
        dm = torch.where(finite, sel_dm, torch.zeros_like(sel_dm))
        sign = torch.gather(brightened.float(), 1, nearest.flatten(1)).view(B, 1, h, w)
    return {
        "heat": heat[:, None],
        "pos": pos[:, None],
        "offset": offset,
        "dmag": dm,
        "sign": sign,
        "reg_w": reg_w,
        "dmag_w": dmag_w,
    }


def decode(
    out: dict[str, torch.Tensor],
    threshold: float = DEFAULT_THRESHOLD,
    stride: int = DEFAULT_STRIDE,
    max_det: int | None = None,
    logits: bool = True,
) -> dict[str, torch.Tensor]:
    """Turn cell outputs into sources: 3x3 cell-peak suppression, threshold, offsets.

    Parameters
    ----------
    out : dict of tensors
        ``heat`` (B,1,h,w), ``offset`` (B,2,h,w) px, ``dmag`` (B,1,h,w), ``sign``
        (B,1,h,w), as returned by :class:`DenseDetector` (or by :func:`encode_targets`
        with ``logits=False``).
    threshold : float
        Minimum score (probability) of a reported source.
    stride : int
        Cell size in px.
    max_det : int or None
        Keep at most this many of the highest-scoring sources per sample.
    logits : bool
        Whether ``heat`` and ``sign`` are logits (True) or probabilities.

    Returns
    -------
    det : dict of tensors, one row per source, sorted by sample then grid order
        ``batch`` (N,) int64 sample index; ``xy`` (N, 2) float32 px (x, y) in the
        input frame; ``score`` (N,) in [0, 1]; ``dmag`` (N,) mag; ``brightened`` (N,)
        bool; ``cell`` (N, 2) int64 (i, j).
    """
    heat = out["heat"].float()
    sign = out["sign"].float()
    if logits:
        heat, sign = torch.sigmoid(heat), torch.sigmoid(sign)
    B, _, h, w = heat.shape
    peak = heat == F.max_pool2d(heat, 3, stride=1, padding=1)
    keep = peak & (heat >= threshold)
    if max_det is not None and keep.any():
        flat = torch.where(keep, heat, torch.full_like(heat, -1.0)).flatten(1)
        k = min(int(max_det), flat.shape[1])
        kth = flat.topk(k, dim=1).values[:, -1:].clamp_min(threshold)
        keep = keep & (heat >= kth.view(B, 1, 1, 1))
    b, _, i, j = torch.nonzero(keep, as_tuple=True)
    centers = cell_centers(h, w, stride, heat.device)
    xy = centers[i, j] + out["offset"].float()[b, :, i, j]
    return {
        "batch": b,
        "xy": xy,
        "score": heat[b, 0, i, j],
        "dmag": out["dmag"].float()[b, 0, i, j],
        "brightened": sign[b, 0, i, j] > 0.5,
        "cell": torch.stack([i, j], dim=1),
    }


def focal_loss(logits: torch.Tensor, target: torch.Tensor, pos: torch.Tensor,
               alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of sources.

    Parameters
    ----------
    logits : (B,1,h,w) heat logits
    target : (B,1,h,w) splatted heat target in [0, 1]
    pos : (B,1,h,w) bool, the cells that hold a source (target 1)
    alpha, beta : float
        Focusing exponents of the prediction and of the penalty reduction.
    """
    logits = logits.float()
    p = torch.sigmoid(logits)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    pos_f = pos.float()
    pos_loss = -((1 - p) ** alpha) * log_p * pos_f
    neg_loss = -((1 - target) ** beta) * (p**alpha) * log_1mp * (1 - pos_f)
    n = pos_f.sum().clamp_min(1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n


def detector_loss(
    out: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    w_offset: float = 1.0,
    w_dmag: float = 0.1,
    w_sign: float = 0.1,
) -> dict[str, torch.Tensor]:
    """Focal heat loss + weighted L1 (offset, dmag) and BCE (sign) near sources.

    Returns a dict with ``loss`` (the weighted total) and its parts ``heat``,
    ``offset``, ``dmag``, ``sign`` (each already normalised).
    """
    heat = focal_loss(out["heat"], targets["heat"], targets["pos"])
    reg_w = targets["reg_w"]
    n_reg = reg_w.sum().clamp_min(1.0)
    off = ((out["offset"].float() - targets["offset"]).abs() * reg_w).sum() / n_reg
    dmag_w = targets["dmag_w"]
    dm = ((out["dmag"].float() - targets["dmag"]).abs() * dmag_w).sum() / dmag_w.sum().clamp_min(1.0)
    sg = F.binary_cross_entropy_with_logits(out["sign"].float(), targets["sign"], reduction="none")
    sg = (sg * reg_w).sum() / n_reg
    total = heat + w_offset * off + w_dmag * dm + w_sign * sg
    return {"loss": total, "heat": heat, "offset": off, "dmag": dm, "sign": sg}
