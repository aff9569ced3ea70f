"""Networks as plain :class:`torch.nn.Module` (no Lightning, Hydra or I/O)."""

from rtcnn.models.attn5 import Attn5, n_parameters

__all__ = ["Attn5", "n_parameters"]
