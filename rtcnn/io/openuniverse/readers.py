"""OpenUniverse readers: images (sky-subtracted e-/s :class:`rtcnn.io.fits.Image`), ERR
planes, truth tables (0-based, AB), the observation sequence.

Built on :mod:`rtcnn.io.fits` (file checks, the validated WCS); each reader takes a path.
Headers carry a TAN-SIP WCS with a CD matrix and ``FILTER``, ``EXPTIME`` (s),
``MJD-OBS``, ``ZPTMAG``, ``SKY_MEAN`` (counts/pixel), ``SCA_NUM``.

Zero point
----------
``roman_imsim`` writes ``ZPTMAG = 2.5 log10(EXPTIME * A)`` with ``A`` the collecting
area in cm^2, and draws ``counts = F * A * EXPTIME`` photons for a source whose photon
flux through the bandpass is ``F`` (photons/s/cm^2). GalSim's AB bandpass zero point
``Z_b = getBandpasses(AB_zeropoint=True)[band].zeropoint`` is defined by
``m_AB = -2.5 log10(F) + Z_b``. Hence, for SCI counts ``C``::

    m_AB = -2.5 log10(C) + Z_b + ZPTMAG                       (zero point of 1 count)

and after the conversion to a count rate ``R = C / EXPTIME`` (e-/s) done here::

    m_AB = -2.5 log10(R) + Z_b + ZPTMAG - 2.5 log10(EXPTIME)  (zero point of 1 e-/s)
         = -2.5 log10(R) + Z_b + 2.5 log10(A)

which :func:`ou_zeropoint` returns. The truth files' ``mag`` column is
``-2.5 log10(flux) + Z_b`` with ``flux`` in counts, i.e. ``m_AB - ZPTMAG``: AB = ``mag +
ZPTMAG`` (:func:`read_ou_truth`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import Image, check_fits_file, header_wcs
from rtcnn.io.openuniverse.layout import (
    DQ_HDU,
    ERR_HDU,
    OBSEQ_COLUMNS,
    SCI_HDU,
    TRUTH_COLUMNS,
    parse_ou_name,
    truth_path_for,
)
from rtcnn.roman import bandpass_zeropoint

log = logging.getLogger(__name__)

UNIT = "electron/s"  # unit of the images returned here
DQ_BAD_BITS = 0xFFFFFFFF  # DQ bits that make a pixel bad (default: any flag)


def ou_zeropoint(band: str, zptmag: float, exptime: float) -> float:
    """AB magnitude of 1 e-/s in an OpenUniverse image (see the module docstring).

    ``zp = Z_b + ZPTMAG - 2.5 log10(EXPTIME)``.

    Parameters
    ----------
    band : str
        Roman band, e.g. ``'H158'``.
    zptmag : float
        Header ``ZPTMAG`` (mag), ``2.5 log10(EXPTIME * collecting area)``.
    exptime : float
        Header ``EXPTIME`` in s (> 0).
    """
    if not exptime > 0:
        raise ValueError(f"exptime must be > 0 s, got {exptime}")
    return bandpass_zeropoint(band) + float(zptmag) - 2.5 * math.log10(exptime)


def _header_float(header: fits.Header, key: str, path: Path, required: bool = True):
    value = header.get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        if required:
            raise RtcnnInputError(path, f"header keyword {key} is missing or not a number")
        return None
    return value


def _read_wcs(header: fits.Header, path: Path) -> WCS:
    """The header's validated celestial WCS (:func:`rtcnn.io.fits.header_wcs`) or an error."""
    wcs, problem = header_wcs(header)
    if wcs is None:
        raise RtcnnInputError(path, problem)
    return wcs


def _open(path: Path) -> fits.HDUList:
    check_fits_file(path)
    try:
        hdul = fits.open(path, memmap=False)
        len(hdul)
    except (OSError, ValueError) as err:
        raise RtcnnInputError(path, f"truncated or corrupt FITS file ({err})") from None
    return hdul


def _hdu(hdul: fits.HDUList, name: str, index: int, path: Path):
    names = [h.name.upper() for h in hdul]
    if name in names:
        return hdul[names.index(name)]
    if index < len(hdul) and hdul[index].is_image and hdul[index].data is not None:
        return hdul[index]
    raise RtcnnInputError(path, f"has no {name} HDU (HDUs: {', '.join(names)})")


def _merged_header(hdul: fits.HDUList, path: Path) -> fits.Header:
    """The ``SCI`` header plus the HDU 0 keywords it lacks (a copy)."""
    return merged_header(hdul[0].header, _hdu(hdul, SCI_HDU, 1, path).header)


def merged_header(primary: fits.Header, sci: fits.Header) -> fits.Header:
    """A copy of the ``SCI`` header with the HDU 0 (``primary``) keywords it lacks.

    What :func:`read_ou_header` returns; :mod:`rtcnn.io.remote` builds it from the two
    headers read off the start of a remote gzip stream.
    """
    header = sci.copy()
    for card in primary.cards:  # roman_imsim writes the same header everywhere
        if card.keyword and card.keyword not in header and card.keyword not in (
                "SIMPLE", "EXTEND", "NAXIS", "BITPIX"):
            header[card.keyword] = (card.value, card.comment)
    return header


def read_ou_header(path: str | os.PathLike) -> fits.Header:
    """Header of the ``SCI`` HDU (with the HDU 0 keywords it lacks), pixels not read."""
    p = Path(path)
    with _open(p) as hdul:
        return _merged_header(hdul, p)


def header_zptmag(header: fits.Header, path: Path | None = None) -> float:
    """``ZPTMAG`` of a header, or ``2.5 log10(EXPTIME * collecting area)`` (its definition
    in ``roman_imsim``) when it is missing."""
    zptmag = _header_float(header, "ZPTMAG", path, required=False)
    if zptmag is None:
        import galsim.roman

        exptime = _header_float(header, "EXPTIME", path)
        zptmag = 2.5 * math.log10(exptime * galsim.roman.collecting_area)
        log.warning("%s: no ZPTMAG; using 2.5 log10(EXPTIME * collecting area) = %.4f",
                    path, zptmag)
    return zptmag


def read_ou_image(path: str | os.PathLike, dq_bad_bits: int = DQ_BAD_BITS) -> Image:
    """Read an OpenUniverse image as a sky-subtracted float32 image in e-/s.

    ``data = (SCI - SKY_MEAN) / EXPTIME``; the mask is ``DQ & dq_bad_bits != 0`` or a
    non-finite SCI pixel; the WCS is the header's TAN-SIP; the zero point is
    :func:`ou_zeropoint` (AB mag of 1 e-/s). The header returned is the ``SCI`` header
    with ``BUNIT``, ``MAGZP``, ``SKYLEVEL`` (e-/s/pixel subtracted), ``BAND``, ``SCA``,
    ``POINTING`` added.

    Parameters
    ----------
    path : str or path-like
        ``Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits[.gz]``.
    dq_bad_bits : int
        DQ bits that mark a pixel bad (default: every bit).

    Returns
    -------
    Image
        ``data`` (ny, nx) float32 e-/s, ``mask`` (ny, nx) bool or None, ``wcs`` astropy
        WCS, ``zeropoint`` AB mag of 1 e-/s, ``unit`` ``'electron/s'``, ``band``,
        ``exptime`` (s), ``hdu`` = index of SCI.

    Raises
    ------
    RtcnnInputError
        Not an OpenUniverse name, missing file / HDU / keyword (``EXPTIME``), a band in
        the header that differs from the file name, no usable WCS.
    """
    p = Path(path)
    key = parse_ou_name(p)
    with _open(p) as hdul:
        sci_hdu = _hdu(hdul, SCI_HDU, 1, p)
        sci_index = hdul.index_of(sci_hdu.name) if sci_hdu.name else 1
        header = _merged_header(hdul, p)
        sci = np.asarray(sci_hdu.data, dtype=np.float32)
        names = [h.name.upper() for h in hdul]
        dq = np.asarray(hdul[names.index(DQ_HDU)].data) if DQ_HDU in names else None
    if sci.ndim != 2:
        raise RtcnnInputError(p, f"SCI must be a 2-D image, got shape {sci.shape}")
    band = str(header.get("FILTER", key.band)).strip().upper()
    if band != key.band:
        raise RtcnnInputError(p, f"header FILTER = {band} but the file name says {key.band}")
    exptime = _header_float(header, "EXPTIME", p)
    if exptime <= 0:
        raise RtcnnInputError(p, f"header EXPTIME must be > 0 s, got {exptime}")
    zptmag = header_zptmag(header, p)
    sky = _header_float(header, "SKY_MEAN", p, required=False)
    if sky is None:
        from astropy.stats import sigma_clipped_stats

        sky = float(sigma_clipped_stats(sci, sigma=3.0, maxiters=5)[1])
        log.warning("%s: no SKY_MEAN; subtracting the sigma-clipped median %.3f", p, sky)
    wcs = _read_wcs(header, p)
    data = (sci - np.float32(sky)) / np.float32(exptime)
    bad = ~np.isfinite(data)
    if dq is not None:
        if dq.shape != data.shape:
            raise RtcnnInputError(p, f"DQ shape {dq.shape} differs from SCI {data.shape}")
        bad |= (dq.astype(np.int64) & int(dq_bad_bits)) != 0
    if bad.all():
        raise RtcnnInputError(p, "every pixel is flagged bad (DQ) or not finite")
    try:
        zp = ou_zeropoint(band, zptmag, exptime)
    except ValueError as err:
        raise RtcnnInputError(p, str(err)) from None
    header["BUNIT"] = UNIT
    header["MAGZP"] = (zp, "AB mag of 1 e-/s")
    header["SKYLEVEL"] = (sky / exptime, "e-/s/pix sky subtracted (SKY_MEAN/EXPTIME)")
    header["BAND"] = band
    header["SCA"] = key.sca
    header["POINTING"] = (key.pointing, "OpenUniverse pointing (obseq row)")
    return Image(data=data, mask=bad if bad.any() else None, wcs=wcs, zeropoint=zp,
                 unit=UNIT, header=header, path=p, band=band, exptime=exptime,
                 hdu=sci_index, zeropoint_source="galsim.roman bandpass + ZPTMAG - "
                 "2.5 log10(EXPTIME)")


def read_ou_error(path: str | os.PathLike) -> np.ndarray:
    """The ``ERR`` plane in e-/s (``ERR / EXPTIME``), float32 (ny, nx)."""
    p = Path(path)
    with _open(p) as hdul:
        err = np.asarray(_hdu(hdul, ERR_HDU, 2, p).data, dtype=np.float32)
        header = _hdu(hdul, SCI_HDU, 1, p).header
        exptime = _header_float(header, "EXPTIME", p, required=False)
        if exptime is None:
            exptime = _header_float(hdul[0].header, "EXPTIME", p)
    return err / np.float32(exptime)


def _id_column(values) -> np.ndarray:
    text = np.asarray([str(v).strip() for v in values], dtype=str)
    if len(text) and all(t.lstrip("-").isdigit() for t in text):
        return text.astype(np.int64)
    return text


def read_ou_truth(path: str | os.PathLike, zptmag: float,
                  shape: tuple[int, int] | None = None, offchip: str = "drop") -> Table:
    """Read an OpenUniverse truth table with 0-based positions and AB magnitudes.

    Parameters
    ----------
    path : str or path-like
        ``Roman_TDS_index_{band}_{pointing}_{sca}.txt``: whitespace-separated, one ``#``
        header line naming ``object_id ra dec x y realized_flux flux mag obj_type``.
    zptmag : float
        ``ZPTMAG`` of the matching image (mag); ``mag`` in the file is not AB.
    shape : (ny, nx), optional
        Image shape; rows whose position falls off the chip (outside ``-0.5 <= x < nx -
        0.5``, same in y) are dropped or flagged. Without it every row is kept.
    offchip : {'drop', 'flag'}
        Drop off-chip rows, or keep them and add a bool ``on_chip`` column.

    Returns
    -------
    astropy.table.Table
        ``id`` (int64, or str if the ids are not integers), ``ra``, ``dec`` (deg),
        ``x``, ``y`` (px, 0-based: file value - 1), ``mag`` (AB = file ``mag`` +
        ``zptmag``), ``flux``, ``realized_flux`` (counts for the exposure), ``kind``
        (``obj_type``: star, galaxy, transient), and ``on_chip`` with ``offchip='flag'``.
        Meta: ``zptmag``, ``path``.

    Raises
    ------
    RtcnnInputError
        Missing / unreadable file, missing columns, bad ``offchip``.
    """
    p = Path(path)
    if offchip not in ("drop", "flag"):
        raise RtcnnInputError(p, f"offchip must be 'drop' or 'flag', got {offchip!r}")
    if not p.is_file():
        raise RtcnnInputError(p, "file not found")
    with open(p) as fh:
        first = fh.readline()
    if not first.startswith("#"):
        raise RtcnnInputError(p, "first line must be a '#' header naming the columns")
    names = first.lstrip("#").split()
    missing = [c for c in TRUTH_COLUMNS if c not in names]
    if missing:
        raise RtcnnInputError(p, f"missing truth columns {', '.join(missing)} "
                              f"(found: {', '.join(names)})")
    with open(p) as fh:
        rows = [line.split() for line in fh if line.strip() and not line.startswith("#")]
    bad = next((k for k, r in enumerate(rows) if len(r) != len(names)), None)
    if bad is not None:
        raise RtcnnInputError(p, f"data row {bad + 1} has {len(rows[bad])} fields, the header "
                              f"names {len(names)}")
    raw = np.array(rows, dtype=str).reshape(len(rows), len(names))
    col = {n: raw[:, i] for i, n in enumerate(names)}

    def num(name):
        try:
            return col[name].astype(np.float64)
        except ValueError:
            raise RtcnnInputError(p, f"column {name} is not numeric") from None

    t = Table()
    t["id"] = _id_column(col["object_id"])
    t["ra"] = num("ra") * u.deg
    t["dec"] = num("dec") * u.deg
    t["x"] = (num("x") - 1.0) * u.pix  # GalSim/FITS 1-based -> 0-based
    t["y"] = (num("y") - 1.0) * u.pix
    t["mag"] = (num("mag") + float(zptmag)) * u.mag  # ZPTMAG-less -> AB
    t["flux"] = num("flux")
    t["realized_flux"] = num("realized_flux")
    t["kind"] = np.asarray([s.strip() for s in col["obj_type"]], dtype=str)
    t.meta["zptmag"] = float(zptmag)
    t.meta["path"] = str(p)
    if shape is not None:
        ny, nx = shape
        x, y = np.asarray(t["x"]), np.asarray(t["y"])
        on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
        if offchip == "drop":
            t = t[on]
        else:
            t["on_chip"] = on
    return t


def read_ou_truth_for(image: Image, truth: str | os.PathLike | None = None,
                      offchip: str = "drop") -> Table:
    """Truth of an image read by :func:`read_ou_image` (path derived from the image's)."""
    path = Path(truth) if truth is not None else truth_path_for(image.path)
    return read_ou_truth(path, header_zptmag(image.header, image.path), image.shape, offchip)


def read_obseq(path: str | os.PathLike) -> Table:
    """Read the observation sequence; its row index is the pointing number.

    Returns
    -------
    astropy.table.Table
        ``pointing`` (int, = row index), ``ra``, ``dec``, ``pa`` (deg), ``band`` (str,
        ``filter`` stripped), ``exptime`` (s), ``mjd`` (``date``).

    Raises
    ------
    RtcnnInputError
        Missing file, no table in HDU 1, missing columns.
    """
    p = Path(path)
    if not p.is_file():
        raise RtcnnInputError(p, "file not found")
    try:
        t = Table.read(p, hdu=1, format="fits")
    except Exception as err:  # astropy raises many kinds
        raise RtcnnInputError(p, f"HDU 1 is not a readable FITS table ({err})") from None
    lower = {c.lower(): c for c in t.colnames}
    missing = [c for c in OBSEQ_COLUMNS if c not in lower]
    if missing:
        raise RtcnnInputError(p, f"missing obseq columns {', '.join(missing)} "
                              f"(found: {', '.join(t.colnames)})")
    out = Table()
    out["pointing"] = np.arange(len(t), dtype=np.int64)
    for name in ("ra", "dec", "pa"):
        out[name] = np.asarray(t[lower[name]], dtype=float) * u.deg
    out["band"] = np.asarray([str(b).strip().upper() for b in t[lower["filter"]]], dtype=str)
    out["exptime"] = np.asarray(t[lower["exptime"]], dtype=float) * u.s
    out["mjd"] = np.asarray(t[lower["date"]], dtype=float)
    out.meta["path"] = str(p)
    return out


__all__ = [
    "DQ_BAD_BITS",
    "UNIT",
    "header_zptmag",
    "merged_header",
    "ou_zeropoint",
    "read_obseq",
    "read_ou_error",
    "read_ou_header",
    "read_ou_image",
    "read_ou_truth",
    "read_ou_truth_for",
]
