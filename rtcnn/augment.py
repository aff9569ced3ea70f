"""The D4 symmetry group of the square (4 rotations x optional flip) on tiles and coordinates.

One table, :data:`D4`, names the 8 elements. Element ``(k, flip)`` first mirrors x
(``x -> n - 1 - x``, the last array axis) when ``flip`` is set, then rotates by
``k * 90`` degrees as :func:`torch.rot90` does on the last two axes
(``(x, y) -> (y, n - 1 - x)`` per quarter turn). Images are ``(..., n, n)`` tensors
(``[..., y, x]``); positions are ``(..., 2)`` ``(x, y)`` in px in the package
convention (:mod:`rtcnn`): 0-based, integer = pixel centre, so the maps are exact.
"""

from __future__ import annotations

import numpy as np
import torch

# name -> (quarter turns k, flip x first)
D4: dict[str, tuple[int, bool]] = {
    "identity": (0, False),
    "rot90": (1, False),
    "rot180": (2, False),
    "rot270": (3, False),
    "flip_x": (0, True),
    "flip_x_rot90": (1, True),
    "flip_y": (2, True),  # flip x then half turn == mirror y
    "flip_x_rot270": (3, True),
}
D4_NAMES: tuple[str, ...] = tuple(D4)
# The original plus the paper's five augmentations (robustness test, paper fig. 7).
PAPER_VIEWS: tuple[str, ...] = ("identity", "flip_x", "flip_y", "rot90", "rot180", "rot270")


def _element(g: int | str) -> tuple[int, bool]:
    if isinstance(g, str):
        if g not in D4:
            raise ValueError(f"unknown D4 element {g!r}; expected one of {D4_NAMES}")
        return D4[g]
    return D4[D4_NAMES[int(g)]]


def apply_image(img: torch.Tensor, g: int | str) -> torch.Tensor:
    """Apply element ``g`` (index 0-7 or name) to ``(..., n, n)`` tensor(s)."""
    k, flip = _element(g)
    if flip:
        img = torch.flip(img, dims=(-1,))
    return torch.rot90(img, k, dims=(-2, -1)) if k else img


def apply_coords(xy, g: int | str, n: int):
    """Apply element ``g`` to positions ``(..., 2)`` (x, y) px of an ``n x n`` tile.

    Works on numpy arrays and torch tensors alike and returns the same kind.
    """
    k, flip = _element(g)
    x, y = xy[..., 0], xy[..., 1]
    if flip:
        x = (n - 1) - x
    for _ in range(k):
        x, y = y, (n - 1) - x
    stack = torch.stack if isinstance(xy, torch.Tensor) else np.stack
    return stack([x, y], -1)


def invert_coords(xy, g: int | str, n: int):
    """Map positions in the frame of element ``g`` back to the original frame."""
    k, flip = _element(g)
    x, y = xy[..., 0], xy[..., 1]
    for _ in range(k):
        x, y = (n - 1) - y, x
    if flip:
        x = (n - 1) - x
    stack = torch.stack if isinstance(xy, torch.Tensor) else np.stack
    return stack([x, y], -1)


def apply_batch(
    images: torch.Tensor, xy: torch.Tensor | None, elements: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply a per-sample D4 element to a batch (on whatever device it lives).

    Parameters
    ----------
    images : (B, C, n, n) tensor
    xy : (B, ..., 2) tensor of positions in px, or None
    elements : (B,) int tensor of element indices 0-7

    Returns
    -------
    images, xy : transformed copies (eight vectorised groups, no per-sample loop).
    """
    n = images.shape[-1]
    out = images.clone()
    out_xy = None if xy is None else xy.clone()
    for g in range(len(D4_NAMES)):
        sel = elements == g
        if g == 0 or not bool(sel.any()):
            continue
        out[sel] = apply_image(images[sel], g)
        if xy is not None:
            out_xy[sel] = apply_coords(xy[sel], g, n)
    return out, out_xy
