"""Candidate catalogs: one astropy Table format for every detector, ECSV on disk.

A candidate catalog has one row per detected change, sorted by decreasing score:

========== ====== ==========================================================
column     unit   meaning
========== ====== ==========================================================
x, y       pix    position, 0-based, integer = pixel centre (:mod:`rtcnn`)
ra, dec    deg    position on the sky from the new image's WCS
dmag       mag    magnitude difference between the two epochs, ``>= 0``
brightened        True where the source is brighter in the new image
score             detection score (network probability, or S/N for the baseline)
========== ====== ==========================================================

The table metadata names the inputs (``ref``, ``new``), the ``model`` (checkpoint
or ``baseline``), the ``threshold`` and the package version. :func:`write_catalog`
writes atomically (:func:`rtcnn.io.pairdir.atomic_write`) and never replaces an
existing file unless asked; :func:`write_ds9_regions` writes a DS9 region file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table

from rtcnn import __version__
from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import pixel_to_sky
from rtcnn.io.pairdir import atomic_write  # the one atomic writer (also used via this name)
from rtcnn.postprocess import Sources

CATALOG_COLUMNS = ("x", "y", "ra", "dec", "dmag", "brightened", "score")
CATALOG_UNITS = {"x": u.pix, "y": u.pix, "ra": u.deg, "dec": u.deg, "dmag": u.mag}
CATALOG_DESCRIPTIONS = {
    "x": "column position, 0-based, integer = pixel centre",
    "y": "row position, 0-based, integer = pixel centre",
    "ra": "right ascension from the new image WCS",
    "dec": "declination from the new image WCS",
    "dmag": "magnitude difference between the two epochs (>= 0)",
    "brightened": "True where the source is brighter in the new image",
    "score": "detection score (higher = more confident)",
}
DS9_RADIUS = 3.0  # px, circle radius of a DS9 region (about 2 Roman PSF FWHM)


def make_catalog(
    x: np.ndarray,
    y: np.ndarray,
    score: np.ndarray,
    dmag: np.ndarray | None,
    brightened: np.ndarray | None,
    wcs,
    meta: Mapping | None = None,
) -> Table:
    """Build a candidate catalog.

    Parameters
    ----------
    x, y : (N,) float
        Positions in px (0-based, integer = pixel centre).
    score : (N,) float
        Detection scores.
    dmag : (N,) float or None
        Magnitude differences in mag (NaN / None where unknown).
    brightened : (N,) bool or None
        True = brighter in the new image; None = all True.
    wcs : astropy.wcs.WCS
        Celestial WCS of the new image (for ``ra``, ``dec``).
    meta : mapping, optional
        Extra metadata, e.g. ``{"ref": "ref.fits", "new": "new.fits", "model": "ckpt",
        "threshold": 0.5}``; ``new`` names the file in the missing-WCS error.

    Returns
    -------
    astropy.table.Table
        Columns :data:`CATALOG_COLUMNS` with units, rows by decreasing score.

    Raises
    ------
    RtcnnInputError
        Arrays of different lengths, or no celestial WCS.
    """
    meta = dict(meta or {})
    x = np.asarray(x, dtype=np.float64).ravel()
    n = len(x)
    y = np.asarray(y, dtype=np.float64).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    dmag = np.full(n, np.nan) if dmag is None else np.asarray(dmag, dtype=np.float64).ravel()
    if brightened is None:
        brightened = np.ones(n, dtype=bool)
    brightened = np.asarray(brightened, dtype=bool).ravel()
    lengths = {"x": n, "y": len(y), "score": len(score), "dmag": len(dmag),
               "brightened": len(brightened)}  # fmt: skip
    if len(set(lengths.values())) != 1:
        raise RtcnnInputError(None, f"catalog columns have different lengths: {lengths}")
    ra, dec = pixel_to_sky(wcs, x, y, path=meta.get("new"))
    order = np.argsort(-score, kind="stable")
    table = Table()
    for name, values in zip(CATALOG_COLUMNS, (x, y, ra, dec, dmag, brightened, score)):
        table[name] = values[order]
        table[name].unit = CATALOG_UNITS.get(name)
        table[name].description = CATALOG_DESCRIPTIONS[name]
    table.meta.update(
        {"rtcnn_version": __version__, "pixel_convention": "0-based, integer = pixel centre"}
    )
    table.meta.update({k: (os.fspath(v) if isinstance(v, Path) else v) for k, v in meta.items()})
    return table


def catalog_from_sources(sources: Sources, wcs, meta: Mapping | None = None) -> Table:
    """:func:`make_catalog` from a :class:`rtcnn.postprocess.Sources`."""
    return make_catalog(
        sources.x, sources.y, sources.score, sources.dmag, sources.brightened, wcs, meta
    )


def write_catalog(table: Table, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a catalog as ECSV, atomically.

    Parameters
    ----------
    table : astropy.table.Table
        From :func:`make_catalog`.
    path : path-like
        Output file (ECSV whatever the suffix).
    overwrite : bool
        Replace an existing file; otherwise an existing file is an error.

    Returns
    -------
    pathlib.Path
        The path written.

    Raises
    ------
    RtcnnInputError
        The file exists and ``overwrite`` is False, or its directory does not exist.
    """
    return atomic_write(
        Path(path), overwrite, lambda tmp: table.write(tmp, format="ascii.ecsv", overwrite=True)
    )


def read_catalog(path: str | os.PathLike) -> Table:
    """Read a candidate catalog written by :func:`write_catalog`.

    Only ``x`` and ``y`` are required; a missing ``score`` is filled with 1, a
    missing ``dmag`` with NaN and a missing ``brightened`` with True.

    Raises
    ------
    RtcnnInputError
        Missing file, not a readable table, or no ``x``/``y`` columns.
    """
    path = Path(path)
    if not path.is_file():
        raise RtcnnInputError(path, "no such file")
    try:
        table = Table.read(path, format="ascii.ecsv")
    except Exception as err:  # astropy raises many types for a bad file
        raise RtcnnInputError(path, f"not a readable ECSV catalog ({type(err).__name__})") from None
    missing = [c for c in ("x", "y") if c not in table.colnames]
    if missing:
        raise RtcnnInputError(path, f"catalog has no {'/'.join(missing)} column")
    n = len(table)
    if "score" not in table.colnames:
        table["score"] = np.ones(n)
    if "dmag" not in table.colnames:
        table["dmag"] = np.full(n, np.nan) * u.mag
    if "brightened" not in table.colnames:
        table["brightened"] = np.ones(n, dtype=bool)
    return table


def write_ds9_regions(
    table: Table,
    path: str | os.PathLike,
    radius: float = DS9_RADIUS,
    overwrite: bool = False,
) -> Path:
    """Write a DS9 region file: one circle per candidate, in image coordinates.

    DS9 image coordinates are 1-based (FITS), so ``x + 1, y + 1`` is written: this is
    the I/O edge where the package's 0-based positions are converted. Brightened
    sources are green, faded ones red; each circle is labelled with its score.

    Parameters
    ----------
    table : astropy.table.Table
        A catalog with ``x``, ``y``, ``score`` and ``brightened``.
    path : path-like
        Output ``.reg`` file (written atomically).
    radius : float
        Circle radius in px.
    overwrite : bool
        Replace an existing file.
    """
    lines = [
        "# Region file format: DS9 version 4.1",
        f"# rtcnn {__version__}: candidates, image coordinates (1-based), radius {radius} px",
        'global color=green dashlist=8 3 width=1 font="helvetica 9 normal roman" '
        "select=1 highlite=1 dash=0 fixed=0 edit=1 move=1 delete=1 include=1 source=1",
        "image",
    ]
    bright = table["brightened"] if "brightened" in table.colnames else np.ones(len(table), bool)
    for row, b in zip(table, bright):
        color = "green" if b else "red"
        lines.append(
            f"circle({float(row['x']) + 1:.3f},{float(row['y']) + 1:.3f},{radius:g}) "
            f"# color={color} text={{{float(row['score']):.3g}}}"
        )
    text = "\n".join(lines) + "\n"

    def writer(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    return atomic_write(Path(path), overwrite, writer)
