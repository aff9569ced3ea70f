"""OpenUniverse 2024 Roman Time Domain Survey files: layout, readers, pairing, pair directories.

The OpenUniverse 2024 simulations (``roman_imsim``, as distributed) are converted here,
once, to the package's conventions (:mod:`rtcnn`): 0-based pixels, AB magnitudes,
sky-subtracted float32 images in e-/s.

* :mod:`~rtcnn.io.openuniverse.layout` — file names and where they live under the
  ``RomanTDS`` root (paths only);
* :mod:`~rtcnn.io.openuniverse.readers` — images, ERR planes, truth tables, the
  observation sequence (on :mod:`rtcnn.io.fits`; the zero point is derived there);
* :mod:`~rtcnn.io.openuniverse.pairing` — the pairing policy: index the exposures,
  choose a reference for each new image, the editable pair list;
* :mod:`~rtcnn.io.openuniverse.prepare` — each pair written as an rtcnn pair directory
  (:mod:`rtcnn.io.pairdir`) with the reference resampled onto the new image's grid.

Every public name of those modules is importable from here.
"""

from rtcnn.io.openuniverse import layout, pairing, prepare, readers
from rtcnn.io.openuniverse.layout import *  # noqa: F403 - the public names of each module
from rtcnn.io.openuniverse.pairing import *  # noqa: F403
from rtcnn.io.openuniverse.prepare import *  # noqa: F403
from rtcnn.io.openuniverse.readers import *  # noqa: F403
from rtcnn.roman import bandpass_zeropoint, noise_equivalent_area

__all__ = [*layout.__all__, *readers.__all__, *pairing.__all__, *prepare.__all__,
           "bandpass_zeropoint", "noise_equivalent_area"]
