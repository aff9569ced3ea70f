"""Roman image-pair simulator built on ``galsim.roman``.

``python -m rtcnn.sim OUTDIR --pairs N --size S --mode inject|epochs|dither|survey --seed K [--bands all]``
or :func:`simulate_dataset` write ``OUTDIR/pair_XXXX/{ref,new}.fits``,
``truth.ecsv``, ``sources.ecsv`` and ``params.json`` (layout and columns in
:mod:`rtcnn.sim.dataset`). :mod:`rtcnn.sim.scene` draws the objects,
:mod:`rtcnn.sim.render` draws them with the Roman PSF, WCS, sky and noise.
"""

from rtcnn.sim.dataset import PAIR_FILES, pair_dir, simulate_dataset, simulate_pair
from rtcnn.sim.render import PsfModel, magzp, psf_model
from rtcnn.sim.scene import DEFAULTS, MODES

__all__ = [
    "DEFAULTS",
    "MODES",
    "PAIR_FILES",
    "PsfModel",
    "magzp",
    "pair_dir",
    "psf_model",
    "simulate_dataset",
    "simulate_pair",
]
