"""rtcnn — transient detection in Roman Space Telescope image pairs.

Pixel convention (the one convention of the whole package; everything refers here)
-----------------------------------------------------------------------------------
* Pixel positions are **0-based** and an **integer value is a pixel centre**: the
  first pixel covers ``-0.5 <= x < 0.5``.
* Arrays are indexed ``[y, x]`` (row, column); positions are written ``(x, y)``.
* A tile with origin ``(x0, y0)`` holds ``image[y0:y0 + size, x0:x0 + size]``; a
  position in the tile maps to the image by adding the origin.
* FITS / GalSim / OpenUniverse 1-based positions exist only at the I/O edge
  (:mod:`rtcnn.io`) and are converted there (``x0based = x1based - 1``).
* Images in memory are float32, background-subtracted, in e-/s unless a header
  says otherwise, with an AB zero point ``zp`` such that ``m = -2.5 log10(flux) + zp``.
"""

from rtcnn.errors import RtcnnInputError

__version__ = "0.1.0"

__all__ = ["RtcnnInputError", "__version__"]
