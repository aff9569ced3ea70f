"""Input/output at the edge of rtcnn: the only place where 1-based pixels exist.

* :mod:`rtcnn.io.fits` — FITS images: HDU choice (SCI, then float images), lazy
  (memory-mapped) reads, scaled integers converted, a validated celestial WCS, the zero
  point from header keywords; ``pixel_to_sky`` / ``sky_to_pixel`` (0-based).
* :mod:`rtcnn.io.catalogs` — truth / source tables (ECSV, FITS, CSV, text) with 0-based
  ``x, y``.
* :mod:`rtcnn.io.pairdir` — the pair-directory layout (``ref.fits``, ``new.fits``,
  ``truth.ecsv``, ``sources.ecsv``, ``params.json``), finding pairs, and the one atomic
  writer of every output (no overwrite without asking, no output that is an input).
* :mod:`rtcnn.io.openuniverse` — the OpenUniverse 2024 RomanTDS files (layout, readers,
  pairing) converted to pair directories.
* :mod:`rtcnn.io.asdf` — Roman Level-2 ASDF images (``roman_datamodels``, optional).
* :mod:`rtcnn.io.remote` — remote archives through fsspec (``s3://`` anonymous): the
  files the pairs need, mirrored once into a local cache for the readers above.

Every user mistake raises :class:`rtcnn.errors.RtcnnInputError` naming the file.
This package never imports torch. The names below are the public ones; the
OpenUniverse, ASDF and remote readers are imported from their modules (they pull in
GalSim, reproject, roman_datamodels, s3fs).
"""

from rtcnn.io.catalogs import read_table, read_truth
from rtcnn.io.fits import (
    ZEROPOINT_KEYWORDS,
    Image,
    check_fits_file,
    header_zeropoint,
    pixel_to_sky,
    read_image,
    read_pair,
    sky_to_pixel,
    write_image,
)
from rtcnn.io.pairdir import PairFiles, atomic_write, find_pairs

__all__ = [
    "Image",
    "PairFiles",
    "ZEROPOINT_KEYWORDS",
    "atomic_write",
    "check_fits_file",
    "find_pairs",
    "header_zeropoint",
    "pixel_to_sky",
    "read_image",
    "read_pair",
    "read_table",
    "read_truth",
    "sky_to_pixel",
    "write_image",
]
