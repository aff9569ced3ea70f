"""OpenUniverse 2024 Roman Time Domain Survey files: layout, images, truth, pairs.

The OpenUniverse 2024 simulations (``roman_imsim``, as distributed) are converted here,
once, to the package's conventions (:mod:`rtcnn`): 0-based pixels, AB magnitudes,
sky-subtracted float32 images in e-/s.

Layout (``root`` is the ``RomanTDS`` directory)::

    images/simple_model/{band}/{pointing}/Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz
    truth/{band}/{pointing}/Roman_TDS_index_{band}_{pointing}_{sca}.txt
    Roman_TDS_obseq_*.fits      (here, one level up, or given explicitly)

Images: HDU 0 header only; HDU 1 ``SCI`` = counts for the whole exposure (e-, gain 1),
sky NOT subtracted; HDU 2 ``ERR``; HDU 3 ``DQ`` (non-zero = bad). Headers carry a
TAN-SIP WCS with a CD matrix and ``FILTER``, ``EXPTIME`` (s), ``MJD-OBS``, ``ZPTMAG``,
``SKY_MEAN`` (counts/pixel), ``SCA_NUM``. The pointing number is only in the file name.

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

Pairs
-----
:func:`scan_ou` indexes a directory (headers, WCS, transient ids from the truth),
:func:`select_pairs` picks for every new image a same-band reference that overlaps it
and was taken when none of its transients was active (or the earliest one, or any
before an MJD cut), :func:`write_pair_list` / :func:`read_pair_list` keep that choice
in an editable ECSV/CSV file, and :func:`prepare_pairs` writes each pair in the
simulator's pair-directory format (``ref.fits``, ``new.fits``, ``truth.ecsv``,
``sources.ecsv``, ``params.json``) with the reference resampled onto the new image's
pixel grid by :func:`reproject_image` (``reproject``; flux-conserving by default,
pixels outside the reference footprint masked). Every command and the DataModule then
read those directories like simulated pairs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS, FITSFixedWarning

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import Image, write_image
from rtcnn.roman import bandpass_zeropoint, noise_equivalent_area  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

IMAGE_DIR = Path("images") / "simple_model"  # image tree under the RomanTDS root
TRUTH_DIR = Path("truth")  # truth tree under the RomanTDS root
IMAGE_RE = re.compile(
    r"^Roman_TDS_simple_model_(?P<band>[A-Za-z]\d{3})_(?P<pointing>\d+)_(?P<sca>\d+)"
    r"\.fits(?:\.gz)?$")
TRUTH_RE = re.compile(
    r"^Roman_TDS_index_(?P<band>[A-Za-z]\d{3})_(?P<pointing>\d+)_(?P<sca>\d+)\.txt$")
OBSEQ_GLOB = "Roman_TDS_obseq_*.fits"  # observation sequence file name pattern
TRUTH_COLUMNS = ("object_id", "ra", "dec", "x", "y", "realized_flux", "flux", "mag", "obj_type")
OBSEQ_COLUMNS = ("ra", "dec", "filter", "exptime", "date", "pa")
SCI_HDU, ERR_HDU, DQ_HDU = "SCI", "ERR", "DQ"  # EXTNAMEs (HDUs 1, 2, 3)
UNIT = "electron/s"  # unit of the images returned here
DQ_BAD_BITS = 0xFFFFFFFF  # DQ bits that make a pixel bad (default: any flag)
PAIR_MODES = ("quiet", "earliest", "before")
MIN_OVERLAP = 0.5  # minimum fraction of the new image the reference must cover
OVERLAP_SAMPLES = 16  # grid points per axis used to estimate the overlap fraction
REPROJECT_METHODS = ("adaptive", "interp")
HOST_RADIUS = 1.0  # arcsec: a transient within this distance of a truth galaxy is hosted
PAIR_LIST_NAME = "pairs.ecsv"  # pair list written by prepare_pairs in its output directory
PAIR_MARKER = "openuniverse"  # params.json "source" of pair directories written here


@dataclasses.dataclass(frozen=True, order=True)
class OUKey:
    """Identity of one OpenUniverse exposure: band, pointing number, SCA number."""

    band: str
    pointing: int
    sca: int

    @property
    def stem(self) -> str:
        """``{band}_{pointing}_{sca}`` as in the file names."""
        return f"{self.band}_{self.pointing}_{self.sca}"


def parse_ou_name(path: str | os.PathLike) -> OUKey:
    """Band, pointing and SCA from an OpenUniverse image or truth file name.

    Raises
    ------
    RtcnnInputError
        The name matches neither ``Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits[.gz]``
        nor ``Roman_TDS_index_{band}_{pointing}_{sca}.txt``.
    """
    name = Path(path).name
    m = IMAGE_RE.match(name) or TRUTH_RE.match(name)
    if m is None:
        raise RtcnnInputError(
            path, "not an OpenUniverse file name (expected Roman_TDS_simple_model_"
            "{band}_{pointing}_{sca}.fits.gz or Roman_TDS_index_{band}_{pointing}_{sca}.txt)")
    return OUKey(m["band"].upper(), int(m["pointing"]), int(m["sca"]))


def ou_image_path(root: str | os.PathLike, key: OUKey, gz: bool = True) -> Path:
    """Path of the image of ``key`` under ``root`` (the ``RomanTDS`` directory)."""
    suffix = ".fits.gz" if gz else ".fits"
    return (Path(root) / IMAGE_DIR / key.band / str(key.pointing)
            / f"Roman_TDS_simple_model_{key.stem}{suffix}")


def ou_truth_path(root: str | os.PathLike, key: OUKey) -> Path:
    """Path of the truth table of ``key`` under ``root``."""
    return (Path(root) / TRUTH_DIR / key.band / str(key.pointing)
            / f"Roman_TDS_index_{key.stem}.txt")


def truth_path_for(image_path: str | os.PathLike) -> Path:
    """Truth-table path that belongs to an image path (same ``RomanTDS`` root)."""
    p = Path(image_path)
    key = parse_ou_name(p)
    # .../images/simple_model/{band}/{pointing}/file -> root is 4 levels up
    return ou_truth_path(p.parents[4] if len(p.parents) > 4 else p.parent, key)


# ----------------------------------------------------------------------- zero point


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


# ----------------------------------------------------------------------- images


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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header)
    except Exception as err:  # astropy raises many kinds for a broken WCS
        raise RtcnnInputError(path, f"the header WCS is unusable ({err})") from None
    if not wcs.has_celestial:
        raise RtcnnInputError(path, "the header has no celestial WCS")
    return wcs.celestial


def _open(path: Path) -> fits.HDUList:
    if not path.is_file():
        raise RtcnnInputError(path, "file not found")
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
    header = _hdu(hdul, SCI_HDU, 1, path).header.copy()
    for card in hdul[0].header.cards:  # roman_imsim writes the same header everywhere
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


# ----------------------------------------------------------------------- truth


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


# ----------------------------------------------------------------------- obseq


def find_obseq(root: str | os.PathLike) -> Path | None:
    """The ``Roman_TDS_obseq_*.fits`` file in ``root`` or its parent, if exactly one."""
    root = Path(root)
    for d in (root, root.parent):
        found = sorted(d.glob(OBSEQ_GLOB))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise RtcnnInputError(d, f"several obseq files ({', '.join(f.name for f in found)});"
                                  " name one with obseq=PATH")
    return None


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


# ----------------------------------------------------------------------- index


@dataclasses.dataclass
class OUExposure:
    """One exposure (one SCA of one pointing) found under a root.

    ``transients`` holds the ids of on-chip ``obj_type == transient`` truth rows (None
    without a truth file).
    """

    key: OUKey
    image: Path
    truth: Path | None
    mjd: float
    exptime: float
    zptmag: float
    shape: tuple[int, int]
    wcs: WCS = dataclasses.field(repr=False)
    transients: frozenset | None = None


def scan_ou(root: str | os.PathLike, bands: Iterable[str] | None = None,
            obseq: str | os.PathLike | None = None) -> list[OUExposure]:
    """Index every OpenUniverse image under ``root``.

    Reads each image's headers (not its pixels) and truth table. The MJD comes from the
    header ``MJD-OBS``; when an obseq table is found (:func:`find_obseq`) or given, its
    band and MJD for the pointing are checked against the header.

    Parameters
    ----------
    root : path
        The ``RomanTDS`` directory (holding ``images/simple_model``).
    bands : iterable of str, optional
        Only these bands.
    obseq : path, optional
        Observation sequence file.

    Returns
    -------
    list of OUExposure, sorted by key.

    Raises
    ------
    RtcnnInputError
        ``root`` missing, no images, unreadable headers, header/obseq disagreement.
    """
    root = Path(root)
    if not root.is_dir():
        raise RtcnnInputError(root, "directory not found")
    base = root / IMAGE_DIR
    files = sorted(f for f in base.glob("*/*/Roman_TDS_simple_model_*") if IMAGE_RE.match(f.name))
    wanted = None if bands is None else {b.upper() for b in bands}
    if wanted is not None:
        files = [f for f in files if parse_ou_name(f).band in wanted]
    if not files:
        raise RtcnnInputError(
            root, f"no OpenUniverse images found (expected {IMAGE_DIR}/{{band}}/{{pointing}}/"
            "Roman_TDS_simple_model_{band}_{pointing}_{sca}.fits.gz"
            + (f" in bands {', '.join(sorted(wanted))}" if wanted else "") + ")")
    obseq_path = Path(obseq) if obseq is not None else find_obseq(root)
    seq = read_obseq(obseq_path) if obseq_path is not None else None
    out = []
    for f in files:
        key = parse_ou_name(f)
        if f.parent.name != str(key.pointing) or f.parent.parent.name.upper() != key.band:
            raise RtcnnInputError(f, f"lies in {f.parent.parent.name}/{f.parent.name}, not "
                                  f"{key.band}/{key.pointing}")
        header = read_ou_header(f)
        mjd = _header_float(header, "MJD-OBS", f)
        exptime = _header_float(header, "EXPTIME", f)
        zptmag = header_zptmag(header, f)
        if seq is not None:
            if key.pointing >= len(seq):
                raise RtcnnInputError(f, f"pointing {key.pointing} is beyond the "
                                      f"{len(seq)} rows of {obseq_path}")
            row = seq[key.pointing]
            if row["band"] != key.band or abs(float(row["mjd"]) - mjd) > 1e-3:
                raise RtcnnInputError(
                    f, f"band {key.band}, MJD {mjd:.5f} disagree with row {key.pointing} of "
                    f"{obseq_path} ({row['band']}, MJD {float(row['mjd']):.5f})")
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
        truth = ou_truth_path(root, key)
        transients = None
        if truth.is_file():
            t = read_ou_truth(truth, zptmag, shape)
            transients = frozenset(str(i) for i in t["id"][t["kind"] == "transient"])
        else:
            truth = None
        out.append(OUExposure(key, f, truth, mjd, exptime, zptmag, shape,
                              _read_wcs(header, f), transients))
    return sorted(out, key=lambda e: e.key)


def overlap_fraction(new: OUExposure, ref: OUExposure, samples: int = OVERLAP_SAMPLES) -> float:
    """Fraction of ``new``'s pixels that fall on ``ref``'s chip (0 to 1).

    Estimated on a ``samples`` x ``samples`` grid of pixel centres through both WCSs.
    """
    ny, nx = new.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, samples), np.linspace(0, ny - 1, samples))
    sky = new.wcs.pixel_to_world(gx.ravel(), gy.ravel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, y = ref.wcs.world_to_pixel(sky)
    rny, rnx = ref.shape
    inside = (x >= -0.5) & (x < rnx - 0.5) & (y >= -0.5) & (y < rny - 0.5)
    return float(np.mean(inside))


def _footprint(e: OUExposure) -> tuple[np.ndarray, float]:
    """Unit vector of the chip centre and the centre-to-corner angle in rad."""
    ny, nx = e.shape
    sky = e.wcs.pixel_to_world([(nx - 1) / 2, 0.0], [(ny - 1) / 2, 0.0])
    ra, dec = sky.spherical.lon.rad, sky.spherical.lat.rad
    vec = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
    return vec[0], float(np.arccos(np.clip(vec[0] @ vec[1], -1.0, 1.0)))


def _read_windows(path: str | os.PathLike) -> dict[str, tuple[float, float]]:
    from rtcnn.io.catalogs import read_table

    t = read_table(Path(path))
    lower = {c.lower(): c for c in t.colnames}
    need = ("object_id", "start_mjd", "end_mjd")
    if not all(n in lower for n in need):
        raise RtcnnInputError(path, "a transient-window table needs columns object_id, "
                              f"start_mjd, end_mjd (found: {', '.join(t.colnames)})")
    return {str(i).strip(): (float(s), float(e)) for i, s, e in
            zip(t[lower["object_id"]], t[lower["start_mjd"]], t[lower["end_mjd"]])}


def select_pairs(
    exposures: Sequence[OUExposure],
    mode: str = "quiet",
    mjd_cut: float | None = None,
    min_overlap: float = MIN_OVERLAP,
    need_transients: bool = True,
    windows: str | os.PathLike | None = None,
) -> Table:
    """Choose a reference for every new image.

    A reference is an exposure in the same band that covers at least ``min_overlap`` of
    the new image and was taken before it; among those allowed by ``mode`` the one with
    the largest overlap wins (ties: the earliest).

    Modes
    -----
    ``'quiet'``
        The reference was taken while none of the new image's transients was active:
        with ``windows`` (a table ``object_id, start_mjd, end_mjd``), its MJD lies outside
        every window; otherwise none of those transients appears in its truth table.
    ``'earliest'``
        The earliest overlapping exposure of the band.
    ``'before'``
        References are exposures with MJD < ``mjd_cut``, new images those at or after it.

    Parameters
    ----------
    exposures : sequence of OUExposure
        From :func:`scan_ou`.
    mode : str
        One of :data:`PAIR_MODES`.
    mjd_cut : float, optional
        Required for ``'before'``.
    min_overlap : float
        Minimum covered fraction of the new image, 0 to 1.
    need_transients : bool
        Only new images whose truth lists an on-chip transient (those without truth are
        skipped too).
    windows : path, optional
        Transient activity windows for ``'quiet'``.

    Returns
    -------
    astropy.table.Table
        One row per pair: ``name``, ``band``, ``pointing_ref``, ``sca_ref``,
        ``pointing_new``, ``sca_new``, ``mjd_ref``, ``mjd_new``, ``overlap``, ``ref``,
        ``new``, ``truth_ref``, ``truth_new`` (paths as str, '' where absent). Zero rows
        when nothing qualifies.
    """
    if mode not in PAIR_MODES:
        raise RtcnnInputError(None, f"pair mode must be one of {', '.join(PAIR_MODES)}, "
                              f"got {mode!r}")
    if mode == "before" and mjd_cut is None:
        raise RtcnnInputError(None, "pair mode 'before' needs mjd_cut")
    if not 0.0 < min_overlap <= 1.0:
        raise RtcnnInputError(None, f"min_overlap must be in (0, 1], got {min_overlap}")
    win = _read_windows(windows) if windows is not None else None
    rows = []
    by_band: dict[str, list[OUExposure]] = {}
    for e in exposures:
        by_band.setdefault(e.key.band, []).append(e)
    foot = {id(e): _footprint(e) for e in exposures}  # cheap overlap pre-check
    for band, group in sorted(by_band.items()):
        group = sorted(group, key=lambda e: (e.mjd, e.key))
        for new in group:
            if need_transients and not new.transients:
                continue
            if mode == "before" and new.mjd < mjd_cut:
                continue
            best = None
            for ref in group:
                if ref is new or ref.mjd >= new.mjd:
                    continue
                if mode == "before" and ref.mjd >= mjd_cut:
                    continue
                if mode == "quiet" and not _quiet(new, ref, win):
                    continue
                (va, ra_), (vb, rb) = foot[id(new)], foot[id(ref)]
                if np.arccos(np.clip(va @ vb, -1.0, 1.0)) > ra_ + rb:
                    continue
                frac = overlap_fraction(new, ref)
                if frac < min_overlap:
                    continue
                score = (-ref.mjd, 0) if mode == "earliest" else (frac, -ref.mjd)
                if best is None or score > best[0]:
                    best = (score, ref, frac)
            if best is None:
                log.info("no reference for %s (mode %s)", new.image.name, mode)
                continue
            _, ref, frac = best
            rows.append(_pair_row(ref, new, frac))
    names = ("name", "band", "pointing_ref", "sca_ref", "pointing_new", "sca_new", "mjd_ref",
             "mjd_new", "overlap", "ref", "new", "truth_ref", "truth_new")
    dtypes = (str, str, int, int, int, int, float, float, float, str, str, str, str)
    t = Table(rows=rows, names=names, dtype=dtypes) if rows else Table(names=names, dtype=dtypes)
    t.meta["mode"] = mode
    if mjd_cut is not None:
        t.meta["mjd_cut"] = float(mjd_cut)
    return t


def _quiet(new: OUExposure, ref: OUExposure, win) -> bool:
    ids = new.transients or frozenset()
    if win is not None:
        for i in ids:
            if i in win and win[i][0] <= ref.mjd <= win[i][1]:
                return False
        return True
    if ref.transients is None:
        return False  # no truth: cannot tell
    return not (ids & ref.transients)


def _pair_row(ref: OUExposure, new: OUExposure, frac: float) -> tuple:
    name = f"{new.key.stem}_ref{ref.key.pointing}_{ref.key.sca}"
    return (name, new.key.band, ref.key.pointing, ref.key.sca, new.key.pointing, new.key.sca,
            ref.mjd, new.mjd, frac, str(ref.image), str(new.image),
            str(ref.truth or ""), str(new.truth or ""))


def write_pair_list(pairs: Table, path: str | os.PathLike) -> Path:
    """Write a pair list (ECSV, or CSV when ``path`` ends with ``.csv``) for editing."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fmt = "ascii.csv" if p.suffix.lower() == ".csv" else "ascii.ecsv"
    pairs.write(p, format=fmt, overwrite=True)
    return p


def read_pair_list(path: str | os.PathLike) -> Table:
    """Read a (possibly hand-edited) pair list; needs at least ``ref`` and ``new``.

    Missing ``name``/``band``/``truth_*`` columns are filled from the file names.
    """
    from rtcnn.io.catalogs import read_table

    p = Path(path)
    t = read_table(p)
    for need in ("ref", "new"):
        if need not in t.colnames:
            raise RtcnnInputError(p, f"pair list needs columns ref and new (found: "
                                  f"{', '.join(t.colnames)})")
    refs = [str(v) for v in t["ref"]]
    news = [str(v) for v in t["new"]]
    keys_ref = [parse_ou_name(r) for r in refs]
    keys_new = [parse_ou_name(n) for n in news]
    for r, n, kr, kn in zip(refs, news, keys_ref, keys_new):
        if kr.band != kn.band:
            raise RtcnnInputError(p, f"pair {Path(n).name} / {Path(r).name} mixes bands "
                                  f"{kn.band} and {kr.band}")
    if "name" not in t.colnames:
        t["name"] = [f"{kn.stem}_ref{kr.pointing}_{kr.sca}" for kr, kn in zip(keys_ref, keys_new)]
    if len(set(t["name"])) != len(t):
        raise RtcnnInputError(p, "pair names must be unique")
    for col, keys, paths in (("truth_ref", keys_ref, refs), ("truth_new", keys_new, news)):
        if col not in t.colnames:
            t[col] = [str(truth_path_for(q)) if truth_path_for(q).is_file() else ""
                      for q in paths]
    t["ref"] = refs
    t["new"] = news
    t["truth_ref"] = ["" if isinstance(v, np.ma.core.MaskedConstant) else str(v)
                      for v in t["truth_ref"]]
    t["truth_new"] = ["" if isinstance(v, np.ma.core.MaskedConstant) else str(v)
                      for v in t["truth_new"]]
    return t


# ----------------------------------------------------------------------- reprojection


def reproject_image(image: Image, target: Image, method: str = "adaptive") -> Image:
    """Resample ``image`` onto ``target``'s pixel grid.

    ``'adaptive'`` uses :func:`reproject.reproject_adaptive` with ``conserve_flux=True``
    (per-pixel e-/s are rescaled by the pixel-area ratio, so a source's total flux and
    the zero point are unchanged); ``'interp'`` uses bilinear
    :func:`reproject.reproject_interp` (surface brightness conserved: right when the two
    grids have the same pixel area, e.g. dithers of one SCA). Bad input pixels propagate
    as NaN; output pixels not fully covered by the input (footprint < 1) are masked.
    The coordinate round-trip check of ``reproject`` is skipped (``roundtrip_coords=
    False``: half the time; the two grids overlap, so the mapping is invertible there).

    Returns
    -------
    Image
        Same ``unit``, ``zeropoint``, ``band``, ``exptime`` as ``image``; ``wcs`` and shape
        of ``target``; ``mask`` = outside the footprint or touched by a bad pixel.
    """
    import reproject

    if method not in REPROJECT_METHODS:
        raise RtcnnInputError(None, f"reprojection method must be one of "
                              f"{', '.join(REPROJECT_METHODS)}, got {method!r}")
    src_wcs = image.require_wcs("reproject it")
    dst_wcs = target.require_wcs("reproject onto it")
    data = np.array(image.data, dtype=np.float64)
    if image.mask is not None:
        data[image.mask] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        if method == "adaptive":
            out, foot = reproject.reproject_adaptive(
                (data, src_wcs), dst_wcs, shape_out=target.shape, conserve_flux=True,
                boundary_mode="strict", bad_value_mode="strict", return_footprint=True,
                roundtrip_coords=False)
        else:
            out, foot = reproject.reproject_interp(
                (data, src_wcs), dst_wcs, shape_out=target.shape, return_footprint=True,
                roundtrip_coords=False)
    out = out.astype(np.float32)
    bad = ~np.isfinite(out) | (foot < 1.0 - 1e-6)
    out[bad] = np.nan
    header = target.header.copy()
    for key in ("MJD-OBS", "EXPTIME", "SKYLEVEL", "MAGZP", "POINTING", "SCA", "SCA_NUM",
                "ZPTMAG", "SKY_MEAN", "DATE-OBS"):
        if key in image.header:
            header[key] = image.header[key]
    header["REPROJ"] = (method, "resampled onto the new image's grid")
    if image.path is not None:
        header["ORIGFILE"] = Path(image.path).name
    return Image(data=out, mask=bad if bad.any() else None, wcs=dst_wcs,
                 zeropoint=image.zeropoint, unit=image.unit, header=header, path=image.path,
                 band=image.band, exptime=image.exptime, hdu=image.hdu,
                 zeropoint_source=image.zeropoint_source)


def same_pixel_grid(a: Image, b: Image, tol: float = 1e-4) -> bool:
    """True when ``a`` and ``b`` have one shape and their WCSs agree to ``tol`` px.

    Checked on a 5 x 5 grid of pixel centres (sky through ``a``, back through ``b``).
    """
    if a.shape != b.shape or a.wcs is None or b.wcs is None:
        return False
    ny, nx = a.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    x, y = b.wcs.world_to_pixel(a.wcs.pixel_to_world(gx.ravel(), gy.ravel()))
    return bool(np.max(np.hypot(x - gx.ravel(), y - gy.ravel())) < tol)


# ----------------------------------------------------------------------- pair truth


def pair_truth(ref_truth: Table, new_truth: Table, new: Image, ref_on_new: Image,
               err_ref: np.ndarray | None = None, err_new: np.ndarray | None = None,
               sca: int | None = None) -> tuple[Table, Table]:
    """Truth of a pair in the simulator's format, on the new image's grid.

    Transients are the ``kind == 'transient'`` rows of either truth table; positions
    come from the new table where the object is listed there, else from RA/Dec through
    the new image's WCS. Rows off the new chip or outside the (reprojected) reference
    footprint are left out. ``mag_ref`` / ``mag_new`` are the AB truth magnitudes,
    masked where the object is absent from that image's truth (there the DataModule
    measures the flux by aperture photometry, as for simulated pairs).

    ``snr`` is the PSF S/N of the flux change in the difference image,
    ``|dF| / sqrt(NEA (err_ref^2 + err_new^2) + F_ref/t_ref + F_new/t_new)`` with
    ``F`` in e-/s, ``err`` the per-pixel ERR planes in e-/s at the position (0 if not
    given) and NEA from :func:`noise_equivalent_area`. ``host`` is True when a truth
    galaxy lies within :data:`HOST_RADIUS` arcsec.

    Returns
    -------
    (truth, sources) : (Table, Table)
        ``truth``: ``id, x, y, ra, dec, mag_ref, mag_new, kind, host, snr``;
        ``sources``: every object of both tables on the new chip with ``id, x, y, ra,
        dec, mag_ref, mag_new, kind``.
    """
    from astropy.coordinates import SkyCoord

    ny, nx = new.shape
    wcs = new.require_wcs("place truth objects on it")
    ref_idx = {str(i): k for k, i in enumerate(ref_truth["id"])}
    new_idx = {str(i): k for k, i in enumerate(new_truth["id"])}
    ids = list(dict.fromkeys([str(i) for i in new_truth["id"]]
                             + [str(i) for i in ref_truth["id"]]))
    n = len(ids)
    rows = [(new_truth, new_idx[i]) if i in new_idx else (ref_truth, ref_idx[i]) for i in ids]
    objs = Table()
    objs["id"] = _id_column([t["id"][k] for t, k in rows]) if n else np.zeros(0, np.int64)
    objs["x"] = np.array([float(t["x"][k]) if t is new_truth else np.nan for t, k in rows])
    objs["y"] = np.array([float(t["y"][k]) if t is new_truth else np.nan for t, k in rows])
    objs["ra"] = np.array([float(t["ra"][k]) for t, k in rows]) * u.deg
    objs["dec"] = np.array([float(t["dec"][k]) for t, k in rows]) * u.deg
    mref = np.array([float(ref_truth["mag"][ref_idx[i]]) if i in ref_idx else np.nan
                     for i in ids])
    mnew = np.array([float(new_truth["mag"][new_idx[i]]) if i in new_idx else np.nan
                     for i in ids])
    objs["mag_ref"] = _masked_mag(mref)
    objs["mag_new"] = _masked_mag(mnew)
    objs["kind"] = np.array([str(t["kind"][k]) for t, k in rows], dtype=str)
    need = ~np.isfinite(np.asarray(objs["x"]))
    if need.any():  # only in the reference truth: place through the new image's WCS
        coord = SkyCoord(np.asarray(objs["ra"])[need], np.asarray(objs["dec"])[need], unit="deg")
        objs["x"][need], objs["y"][need] = wcs.world_to_pixel(coord)
    objs["x"].unit = objs["y"].unit = u.pix
    x, y = np.asarray(objs["x"]), np.asarray(objs["y"])
    on = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    ix = np.clip(np.round(np.nan_to_num(x)).astype(int), 0, nx - 1)
    iy = np.clip(np.round(np.nan_to_num(y)).astype(int), 0, ny - 1)
    covered = on.copy()
    if ref_on_new.mask is not None:
        covered &= ~ref_on_new.mask[iy, ix]

    sources = objs[on]
    sel = covered & (np.asarray(objs["kind"]) == "transient")
    truth = objs[sel]
    truth["host"] = _hosted(np.asarray(truth["ra"]), np.asarray(truth["dec"]), new_truth)
    truth["snr"] = _snr(mref[sel], mnew[sel], ix[sel], iy[sel], new, ref_on_new,
                        err_ref, err_new, sca)
    for t in (truth, sources):
        t.meta["pixel_origin"] = 0
        t.meta["source"] = PAIR_MARKER
    return truth, sources


def _masked_mag(values) -> MaskedColumn:
    v = np.asarray(values, dtype=float)
    return MaskedColumn(np.where(np.isfinite(v), v, 0.0), mask=~np.isfinite(v), unit=u.mag)


def _hosted(ra, dec, table: Table) -> np.ndarray:
    from astropy.coordinates import SkyCoord

    gal = table[table["kind"] == "galaxy"]
    if len(ra) == 0 or len(gal) == 0:
        return np.zeros(len(ra), dtype=bool)
    c = SkyCoord(np.asarray(ra, float), np.asarray(dec, float), unit="deg")
    g = SkyCoord(np.asarray(gal["ra"], float), np.asarray(gal["dec"], float), unit="deg")
    _, sep, _ = c.match_to_catalog_sky(g)
    return np.asarray(sep.arcsec <= HOST_RADIUS)


def _snr(mref, mnew, ix, iy, new: Image, ref: Image, err_ref, err_new, sca) -> np.ndarray:
    if len(ix) == 0:
        return np.zeros(0)

    def rate(m, img):
        m = np.asarray(m, float)
        return np.where(np.isfinite(m), 10 ** (-0.4 * (m - img.zeropoint)), 0.0)

    f_ref, f_new = rate(mref, ref), rate(mnew, new)
    nea = noise_equivalent_area(new.band, int(sca)) if sca is not None else 10.0
    var = np.zeros(len(ix))
    for err in (err_ref, err_new):
        if err is not None:
            var += nea * np.asarray(err, float)[iy, ix] ** 2
    var += f_ref / (ref.exptime or 1.0) + f_new / (new.exptime or 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(f_new - f_ref) / np.sqrt(var)
    return np.where(np.isfinite(snr), snr, 0.0)


# ----------------------------------------------------------------------- pair dirs


def pair_header(img: Image, role: str, **extra) -> fits.Header:
    """Header of a pair-directory image: WCS and the simulator's keywords.

    ``BUNIT``, ``BAND``, ``EXPTIME``, ``MAGZP``, ``SKYLEVEL``, ``MJD-OBS``, ``SCA``,
    ``POINTING`` (those known), ``PAIRROLE`` = ``role``, ``ORIGFILE``, ``REPROJ``, plus
    ``extra`` cards.
    """
    if img.wcs is not None and not hasattr(img.wcs, "to_header"):
        raise RtcnnInputError(img.path, "a pair image needs a FITS WCS (read ASDF images "
                              "with wcs='fits')")
    h = img.wcs.to_header(relax=True) if img.wcs is not None else fits.Header()
    h["BUNIT"] = img.unit
    cards = {"BAND": img.band, "EXPTIME": img.exptime, "MAGZP": img.zeropoint}
    for key in ("SKYLEVEL", "MJD-OBS", "SCA", "POINTING", "REPROJ"):
        cards[key] = img.header.get(key)
    cards.update(PAIRROLE=role, ORIGFILE=Path(img.path).name if img.path else None, **extra)
    for key, value in cards.items():
        if value is not None:
            h[key] = value
    return h


def write_pair_images(ref: Image, new: Image, outdir: str | os.PathLike,
                      method: str = "adaptive", **extra) -> tuple[Path, Image]:
    """Write ``ref.fits`` (resampled onto ``new``'s grid unless already on it) and ``new.fits``.

    Bad pixels (masks, outside the reference footprint) are written as NaN, so
    :func:`rtcnn.io.read_image` masks them again. ``extra`` header cards go to both.

    Returns
    -------
    (pathlib.Path, Image)
        The pair directory (created) and the reference on the new image's grid.
    """
    d = Path(outdir)
    d.mkdir(parents=True, exist_ok=True)
    if same_pixel_grid(ref, new):
        ref_on_new = dataclasses.replace(ref, header=ref.header.copy())
        ref_on_new.header["REPROJ"] = ("none", "same pixel grid as the new image")
    else:
        ref_on_new = reproject_image(ref, new, method)
    for img, role in ((ref_on_new, "ref"), (new, "new")):
        data = np.array(img.data, dtype=np.float32)
        if img.mask is not None:
            data[img.mask] = np.nan
        write_image(d / f"{role}.fits", data, pair_header(img, role, **extra), overwrite=True)
    return d, ref_on_new


def write_pair_dir(row, outdir: str | os.PathLike, method: str = "adaptive") -> Path:
    """Write one pair (a row of a pair list) in the simulator's pair-directory format.

    ``new.fits`` is the new image (e-/s, sky-subtracted, bad pixels NaN), ``ref.fits``
    the reference resampled onto its grid (:func:`reproject_image`; not resampled when
    the two WCSs are identical), ``truth.ecsv`` / ``sources.ecsv`` from
    :func:`pair_truth`, ``params.json`` the provenance.
    """
    new = read_ou_image(row["new"])
    ref = read_ou_image(row["ref"])
    kn, kr = parse_ou_name(row["new"]), parse_ou_name(row["ref"])
    d, ref_on_new = write_pair_images(ref, new, Path(outdir) / str(row["name"]), method,
                                      SIMMODE="openuniverse")
    same_grid = ref_on_new.header["REPROJ"] == "none"
    err_new = read_ou_error(row["new"])
    err_ref = read_ou_error(row["ref"])  # not resampled: ERR varies slowly (sky + read)
    if err_ref.shape != new.shape:
        err_ref = None
    empty = Table({"id": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0),
                   "x": np.zeros(0), "y": np.zeros(0), "mag": np.zeros(0),
                   "kind": np.zeros(0, str)})
    t_new = read_ou_truth_for(new, row["truth_new"]) if row["truth_new"] else empty
    t_ref = read_ou_truth_for(ref, row["truth_ref"]) if row["truth_ref"] else empty
    truth, sources = pair_truth(t_ref, t_new, new, ref_on_new, err_ref, err_new, kn.sca)
    for t, name in ((truth, "truth.ecsv"), (sources, "sources.ecsv")):
        t.meta.update({"ref": str(row["ref"]), "new": str(row["new"])})
        t.write(d / name, format="ascii.ecsv", overwrite=True)
    params = {"source": PAIR_MARKER, "name": str(row["name"]), "band": kn.band,
              "ref": str(row["ref"]), "new": str(row["new"]),
              "pointing_ref": kr.pointing, "sca_ref": kr.sca,
              "pointing_new": kn.pointing, "sca_new": kn.sca,
              "mjd_ref": float(ref.header["MJD-OBS"]), "mjd_new": float(new.header["MJD-OBS"]),
              "reproject": "none" if same_grid else method,
              "n_transients": len(truth)}
    (d / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return d


def _complete(d: Path, row) -> bool:
    files = [d / n for n in ("ref.fits", "new.fits", "truth.ecsv", "params.json")]
    if not all(f.is_file() for f in files):
        return False
    try:
        params = json.loads((d / "params.json").read_text())
    except (OSError, ValueError):
        return False
    return params.get("ref") == str(row["ref"]) and params.get("new") == str(row["new"])


def prepare_pairs(
    root: str | os.PathLike,
    outdir: str | os.PathLike,
    pair_list: str | os.PathLike | None = None,
    mode: str = "quiet",
    mjd_cut: float | None = None,
    bands: Sequence[str] | None = None,
    min_overlap: float = MIN_OVERLAP,
    method: str = "adaptive",
    windows: str | os.PathLike | None = None,
    obseq: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Find pairs under an OpenUniverse ``root`` and write them as pair directories.

    The pair list is ``pair_list`` when that file exists (hand-edited), else it is made
    by :func:`scan_ou` + :func:`select_pairs` and written to ``pair_list`` (default
    ``outdir/pairs.ecsv``) for inspection and editing. Pair directories already written
    for the same ref/new files are kept (a cache) unless ``overwrite``; pair directories
    of this module no longer in the list are removed.

    Returns
    -------
    list of pathlib.Path
        The pair directories, in pair-list order.

    Raises
    ------
    RtcnnInputError
        Anything the readers raise, or no pair found.
    """
    outdir = Path(outdir)
    list_path = Path(pair_list) if pair_list is not None else outdir / PAIR_LIST_NAME
    if list_path.is_file() and pair_list is not None:
        pairs = read_pair_list(list_path)
        log.info("using the pair list %s (%d pairs)", list_path, len(pairs))
    else:
        exposures = scan_ou(root, bands, obseq)
        pairs = select_pairs(exposures, mode, mjd_cut, min_overlap, True, windows)
        if len(pairs) == 0:
            raise RtcnnInputError(root, f"no image pairs found (mode {mode}: every new image "
                                  "needs an earlier same-band image covering "
                                  f"{min_overlap:.0%} of it, and transients in its truth)")
        write_pair_list(pairs, list_path)
        log.info("wrote the pair list %s (%d pairs)", list_path, len(pairs))
    outdir.mkdir(parents=True, exist_ok=True)
    keep = {str(n) for n in pairs["name"]}
    for d in outdir.iterdir():
        marker = d / "params.json"
        if d.is_dir() and d.name not in keep and marker.is_file():
            try:
                ours = json.loads(marker.read_text()).get("source") == PAIR_MARKER
            except (OSError, ValueError):
                ours = False
            if ours:
                shutil.rmtree(d)
    dirs = []
    for row in pairs:
        d = outdir / str(row["name"])
        if overwrite or not _complete(d, row):
            write_pair_dir(row, outdir, method)
        dirs.append(d)
    return dirs
