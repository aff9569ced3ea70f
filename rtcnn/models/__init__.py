"""Networks as plain :class:`torch.nn.Module` (no Lightning, Hydra or I/O).

* :mod:`rtcnn.models.attn5` — :class:`Attn5`, the paper's attention CNN: one transient's
  ``(x, y)`` per tile;
* :mod:`rtcnn.models.detector` — :class:`DenseDetector`, a CenterNet-style detector: every
  transient of a tile, with its dmag and sign;
* :mod:`rtcnn.models.stargal` — :class:`StarGalaxyNet`, the paper's warm-up star/galaxy
  classifier of source stamps;
* :mod:`rtcnn.models.autoencoder` — :class:`PairAutoencoder`, the paper's appendix: a tile
  pair to a "transient only" image.
"""

from rtcnn.models.attn5 import Attn5, n_parameters
from rtcnn.models.autoencoder import PairAutoencoder
from rtcnn.models.detector import DenseDetector
from rtcnn.models.stargal import StarGalaxyNet

__all__ = ["Attn5", "DenseDetector", "PairAutoencoder", "StarGalaxyNet", "n_parameters"]
