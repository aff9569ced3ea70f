"""Input/output at the edge of rtcnn: the only place FITS 1-based pixels exist.

* :mod:`rtcnn.io.fits` — images: HDU choice, lazy (memory-mapped) reads, zero point
  from header keywords, atomic writes.
* :mod:`rtcnn.io.catalogs` — truth / source tables (ECSV, FITS, text) with 0-based
  ``x, y``, and finding ``ref.fits``/``new.fits``/``truth.ecsv`` pair directories.

Every user mistake raises :class:`rtcnn.errors.RtcnnInputError` naming the file.
This package never imports torch.
"""

from rtcnn.io.catalogs import PairFiles, find_pairs, read_table, read_truth
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

__all__ = [
    # fits
    "Image",
    "ZEROPOINT_KEYWORDS",
    "check_fits_file",
    "header_zeropoint",
    "pixel_to_sky",
    "read_image",
    "read_pair",
    "sky_to_pixel",
    "write_image",
    # catalogs
    "PairFiles",
    "find_pairs",
    "read_table",
    "read_truth",
]
