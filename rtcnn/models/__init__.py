"""Networks as plain :class:`torch.nn.Module` (no Lightning, Hydra or I/O).

* :mod:`rtcnn.models.attn5` — :class:`Attn5`, the paper's attention CNN: one transient's
  ``(x, y)`` per tile;
* :mod:`rtcnn.models.detector` — :class:`DenseDetector`, a CenterNet-style detector: every
  transient of a tile, with its dmag and sign.
"""

from rtcnn.models.attn5 import Attn5, n_parameters
from rtcnn.models.detector import DenseDetector

__all__ = ["Attn5", "DenseDetector", "n_parameters"]
