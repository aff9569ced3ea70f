"""Truth / source catalogs.

:func:`read_truth` reads ECSV, FITS binary tables, or text tables with a header line, and
returns an astropy Table whose ``x``, ``y`` columns are **0-based pixel centres**
(:mod:`rtcnn`). Positions come from, in this order:

1. 0-based pixel columns (:data:`X_COLUMNS` / :data:`Y_COLUMNS`, case-insensitive);
   if the table's metadata says ``pixel_origin: 1`` they are converted (``x - 1``);
2. 1-based pixel columns (:data:`X_COLUMNS_1BASED`, e.g. SExtractor's ``X_IMAGE``),
   converted with ``x - 1``;
3. RA/Dec columns (:data:`RA_COLUMNS` / :data:`DEC_COLUMNS`; deg unless the column
   carries an angle unit) through the image WCS (``world_to_pixel``, 0-based).

Pair directories (``ref.fits``, ``new.fits``, ``truth.ecsv``) are found by
:func:`rtcnn.io.pairdir.find_pairs`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.table import Table

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import _FITS_MAGIC, Image, pixel_to_sky, sky_to_pixel

log = logging.getLogger(__name__)

#: 0-based pixel-position column names (lower case), tried in this order.
X_COLUMNS = ("x", "xcentroid", "x_centroid", "xcenter", "x_pix", "xpix", "x_0")
Y_COLUMNS = ("y", "ycentroid", "y_centroid", "ycenter", "y_pix", "ypix", "y_0")
#: 1-based (FITS-convention) pixel-position column names (lower case), converted here.
X_COLUMNS_1BASED = ("x_image", "xwin_image", "x_fits")
Y_COLUMNS_1BASED = ("y_image", "ywin_image", "y_fits")
#: Sky-position column names (lower case); deg unless the column has an angle unit.
RA_COLUMNS = ("ra", "ra_deg", "raj2000", "ra_icrs", "alpha_j2000", "alpha")
DEC_COLUMNS = ("dec", "dec_deg", "dej2000", "decj2000", "de_icrs", "delta_j2000", "delta")
#: Table metadata key declaring the origin of the pixel columns (0 or 1; default 0).
PIXEL_ORIGIN_META = "pixel_origin"


def read_truth(path: str | os.PathLike, image: Image | None = None,
               format: str | None = None) -> Table:
    """Read a truth (or any source) catalog with 0-based ``x``, ``y`` in px.

    Parameters
    ----------
    path : str or path-like
        ECSV, FITS table (first table HDU), CSV, or whitespace text with a header line.
    image : Image, optional
        The image the catalog refers to. Needed when the catalog has only RA/Dec; when
        given, rows are checked against its footprint: an ``on_image`` column (bool) is
        added, and a catalog with rows but none on the image is an error. When the image
        has a WCS and the catalog lacks ``ra``/``dec``, they are added (deg).
    format : str, optional
        astropy ``Table.read`` format, overriding the guess from the file name.

    Returns
    -------
    astropy.table.Table
        All input columns plus ``x``, ``y`` (float64, px, 0-based; NaN where unknown),
        and ``on_image`` when ``image`` is given. Zero rows is valid.

    Raises
    ------
    RtcnnInputError
        Missing / unreadable file, no position columns, RA/Dec without a usable WCS,
        every position outside the image.
    """
    p = Path(path)
    table = read_table(p, format)
    try:
        x, y = _positions(table, p, image)
    except RtcnnInputError as err:
        raise (RtcnnInputError(p, err.problem) if err.path is None else err) from None
    table["x"] = np.asarray(x, dtype=np.float64)
    table["y"] = np.asarray(y, dtype=np.float64)
    table["x"].unit = table["y"].unit = u.pix
    if image is not None:
        _add_sky(table, image)
        _check_footprint(table, p, image)
    return table


def read_table(path: str | os.PathLike, format: str | None = None) -> Table:
    """Read any table (ECSV, FITS, CSV, text with a header) as-is, with one-line errors.

    The format is guessed from the first bytes (FITS) or the name (``.ecsv``, ``.csv``,
    else astropy's ``ascii`` guessing) unless ``format`` is given. No position handling:
    see :func:`read_truth`.

    Raises
    ------
    RtcnnInputError
        Missing, empty or unreadable file; FITS file without a table HDU.
    """
    p = Path(path)
    if not p.exists():
        raise RtcnnInputError(p, "file not found")
    if not p.is_file():
        raise RtcnnInputError(p, "is a directory, not a catalog")
    if p.stat().st_size == 0:
        raise RtcnnInputError(p, "empty file, not a catalog (an empty catalog needs a header)")
    kwargs = {}
    if format is None:
        with open(p, "rb") as fh:
            is_fits = fh.read(len(_FITS_MAGIC)) == _FITS_MAGIC
        suffix = p.name.lower()
        if is_fits:
            format = "fits"
        elif suffix.endswith(".ecsv"):
            format = "ascii.ecsv"
        elif suffix.endswith(".csv"):
            format = "ascii.csv"
        else:
            format = "ascii"
    if format == "fits":
        kwargs["hdu"] = _first_table_hdu(p)
    try:
        return Table.read(p, format=format, **kwargs)
    except Exception as err:  # astropy's readers raise many kinds
        msg = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise RtcnnInputError(p, f"cannot be read as a {format} table ({msg})") from None



# --------------------------------------------------------------------------- helpers


def _first_table_hdu(p: Path) -> int:
    from astropy.io import fits

    try:
        with fits.open(p, memmap=True) as hdul:
            for i, h in enumerate(hdul):
                if isinstance(h, (fits.BinTableHDU, fits.TableHDU)):
                    return i
    except OSError as err:
        raise RtcnnInputError(p, f"truncated or corrupt FITS file ({err})") from None
    raise RtcnnInputError(p, "FITS file has no table HDU")


def _find(table: Table, names: tuple[str, ...]) -> str | None:
    lower = {c.lower(): c for c in table.colnames}
    return next((lower[n] for n in names if n in lower), None)


def _float_column(table: Table, name: str, unit: u.UnitBase | None = None) -> np.ndarray:
    col = table[name]
    if unit is not None and col.unit is not None and col.unit.physical_type == "angle":
        values = u.Quantity(col).to_value(unit)
    else:
        values = col
    try:
        values = np.ma.filled(np.ma.asarray(values, dtype=float), np.nan)
    except (TypeError, ValueError):
        first = next((v for v in np.asarray(col).tolist() if v is not None), None)
        raise RtcnnInputError(None, f"column {name!r} is not numeric ({col.dtype}, e.g. "
                              f"{first!r})") from None
    return np.asarray(values, dtype=np.float64)


def _positions(table: Table, p: Path, image: Image | None) -> tuple[np.ndarray, np.ndarray]:
    xname, yname = _find(table, X_COLUMNS), _find(table, Y_COLUMNS)
    if xname and yname:
        origin = table.meta.get(PIXEL_ORIGIN_META, 0)
        if isinstance(origin, bool) or origin not in (0, 1):  # 1.7 is not 1
            raise RtcnnInputError(p, f"{PIXEL_ORIGIN_META} must be 0 or 1, got {origin!r}")
        origin = int(origin)
        return (_float_column(table, xname) - origin, _float_column(table, yname) - origin)
    xname, yname = _find(table, X_COLUMNS_1BASED), _find(table, Y_COLUMNS_1BASED)
    if xname and yname:
        return _float_column(table, xname) - 1.0, _float_column(table, yname) - 1.0
    rname, dname = _find(table, RA_COLUMNS), _find(table, DEC_COLUMNS)
    if rname and dname:
        if image is None:
            raise RtcnnInputError(
                p, "has RA/Dec but no x/y columns; give the image so its WCS can convert them")
        if image.wcs is None:
            why = image.wcs_problem or "the header has no celestial WCS"
            raise RtcnnInputError(
                image.path, f"{why}; a WCS is needed to convert the RA/Dec of {p} to pixels")
        if len(table) == 0:
            return np.zeros(0), np.zeros(0)
        ra, dec = _float_column(table, rname, u.deg), _float_column(table, dname, u.deg)
        return sky_to_pixel(image, ra, dec)
    raise RtcnnInputError(
        p, "has no position columns (need x, y or ra, dec; found: "
        f"{', '.join(table.colnames) or 'none'})"
    )


def _add_sky(table: Table, image: Image) -> None:
    if image.wcs is None or (_find(table, RA_COLUMNS) and _find(table, DEC_COLUMNS)):
        return
    ra, dec = pixel_to_sky(image, table["x"], table["y"]) if len(table) else ([], [])
    table["ra"] = np.asarray(ra, dtype=float) * u.deg
    table["dec"] = np.asarray(dec, dtype=float) * u.deg


def _check_footprint(table: Table, p: Path, image: Image) -> None:
    ny, nx = image.shape
    x, y = np.asarray(table["x"], float), np.asarray(table["y"], float)
    with np.errstate(invalid="ignore"):
        on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    table["on_image"] = on
    if len(table) and not on.any():
        finite = np.isfinite(x) & np.isfinite(y)
        where = (f"x in [{np.min(x[finite]):.1f}, {np.max(x[finite]):.1f}], y in "
                 f"[{np.min(y[finite]):.1f}, {np.max(y[finite]):.1f}] px"
                 if finite.any() else "no finite positions")
        raise RtcnnInputError(
            p, f"all {len(table)} positions fall outside the {nx} x {ny} px image "
            f"{image.path or ''} ({where})".replace("  ", " "))
    if len(table) and not on.all():
        log.info("%s: %d of %d rows fall outside the image", p, int((~on).sum()), len(table))


__all__ = [
    "DEC_COLUMNS",
    "PIXEL_ORIGIN_META",
    "RA_COLUMNS",
    "X_COLUMNS",
    "X_COLUMNS_1BASED",
    "Y_COLUMNS",
    "Y_COLUMNS_1BASED",
    "read_table",
    "read_truth",
]
