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


def apply_image(img, g: int | str):
    """Apply element ``g`` (index 0-7 or name) to ``(..., n, n)`` tensor(s) or arrays.

    A numpy array gives a numpy view (``np.flip``/``np.rot90`` match ``torch.flip``/
    ``torch.rot90``), a tensor a tensor.
    """
    k, flip = _element(g)
    if isinstance(img, np.ndarray):
        return _numpy_view(img, k, flip)
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


def _numpy_view(img: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``np.rot90(np.flip(img, -1) if flip else img, k, axes=(-2, -1))`` by plain slicing."""
    if flip:
        img = img[..., ::-1]
    if k == 1:
        return img[..., ::-1].swapaxes(-2, -1)
    if k == 2:
        return img[..., ::-1, ::-1]
    if k == 3:
        return img.swapaxes(-2, -1)[..., ::-1]
    return img


def apply_batch(images, xy, elements, out=None):
    """Apply a per-sample D4 element to a batch (on whatever device it lives).

    Parameters
    ----------
    images : (B, C, n, n) tensor or numpy array
    xy : (B, ..., 2) tensor / array of positions in px, or None
    elements : (B,) int tensor / array of element indices 0-7

    out : (B, C, n, n) numpy array, optional
        Numpy only: where to write the transformed images (not ``images`` itself).

    Returns
    -------
    images, xy : transformed copies of the same kind as the inputs. Tensors: eight
    vectorised groups; numpy arrays: one strided copy per sample into ``out``, which on
    a CPU is several times faster than the tensor path.
    """
    n = images.shape[-1]
    if isinstance(images, np.ndarray):
        return _apply_batch_numpy(images, xy, np.asarray(elements), n, out)
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


def _apply_batch_numpy(images: np.ndarray, xy, elements: np.ndarray, n: int, out=None):
    out = np.empty_like(images) if out is None else out
    for r, g in enumerate(elements.tolist()):
        out[r] = _numpy_view(images[r], *D4[D4_NAMES[g]])
    if xy is None:
        return out, None
    xy = np.asarray(xy)
    out_xy = xy.copy()
    for g in range(1, len(D4_NAMES)):
        sel = np.flatnonzero(elements == g)
        if sel.size:
            out_xy[sel] = apply_coords(xy[sel], g, n)
    return out, out_xy
