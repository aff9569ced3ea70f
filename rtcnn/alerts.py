"""Cutouts (FITS stamps with WCS and variance) and LSST Avro alert packets of candidates.

Cutouts
-------
:func:`write_cutouts` writes, per candidate, ``<id>.fits`` with a primary HDU holding the
candidate (``ID``, ``X``, ``Y`` 0-based px, ``RA``, ``DEC``, ``PADDED``) and six image HDUs:
``REF``, ``REF_VARIANCE``, ``NEW``, ``NEW_VARIANCE``, ``DIFF``, ``DIFF_VARIANCE``, each
``N x N`` px (default :data:`DEFAULT_CUTOUT_SIZE`) with the new image's WCS of the stamp
(:class:`astropy.nddata.Cutout2D`; the reference is aligned on that grid). Values are e-/s
(``BUNIT``), variances (e-/s)^2 from :func:`stamp_variance`. A stamp that runs off the image
is padded with NaN (``PADDED = T`` in every header, and the candidate's ``edge`` flag),
never an error. Masked (NaN/inf) pixels stay NaN.

Alert packets
-------------
:func:`write_alerts` writes one Avro file ``<diaSourceId>.avro`` per candidate with the
newest LSST alert schema that ``lsst-alert-packet`` ships (:func:`alert_schema`: v11.1 with
version 30.2026), an Avro container holding the schema, so brokers read it with
``lsst.alert.packet.retrieve_alerts`` or any Avro reader. Every record is validated
against the schema before it is written. The fields rtcnn fills:

=========================== ===========================================================
alert / diaSource field     source
=========================== ===========================================================
diaSourceId                 :func:`source_ids`: BLAKE2b hash of the visit, detector and
                            position (x, y to 1e-3 px) -> 63-bit int; a rerun on the same
                            pair gives the same IDs
visit                       header ``VISIT``/``EXPID``/``OBSID`` (int), else a 63-bit hash
                            of the new image's header (same file, same visit)
detector                    header ``SCA``/``SCA_NUM``/``DETECTOR`` (1-18), else 0
midpointMjdTai              :func:`midpoint_mjd_tai`: ``MJD-AVG``/``DATE-AVG``, else
                            ``MJD-OBS``/``DATE-OBS``/``MJD-BEG``/``DATE-BEG`` + EXPTIME/2, in
                            the header's ``TIMESYS`` (default UTC) converted to TAI. A
                            header without a date gives **NaN**: the schema has no null
                            for this field, so NaN is rtcnn's "null time"
exposureTime                header ``EXPTIME``
ra, dec, raErr, decErr      ``ra``, ``dec``, ``ra_err`` (of ra cos dec), ``dec_err``
x, y, xErr, yErr            ``x``, ``y`` (0-based, integer = pixel centre, as LSST's),
                            ``x_err``, ``y_err``
psfFlux, psfFluxErr, snr    ``psf_flux``, ``psf_flux_err`` (nJy), ``snr``
apFlux, apFluxErr           ``ap_flux``, ``ap_flux_err`` (nJy; rtcnn's aperture is 3 px,
                            aperture-corrected to total, not LSST's 12 px)
isNegative                  ``is_negative``
reliability                 ``reliability`` (network score); ``reliabilityVersion`` names
                            rtcnn's version and the model file
band                        the new image's band (GalSim spelling for a Roman band, so
                            ``F158`` gives ``H158``; other names as written)
pixelFlags_edge, _bad,      the ``edge``, ``masked``, ``cosmic_ray``, ``saturated`` bits of
_cr, _saturated             ``flags``; ``apFlux_flag_apertureTruncated`` and
                            ``psfFlux_flag_edge`` = ``edge``; ``psfFlux_flag``/
                            ``apFlux_flag`` = flux not finite; ``pixelFlags`` = False
psfNdata                    pixels of the forced PSF fit (49)
bboxSize                    the cutout size N
timeProcessedMjdTai         the time the packets were made (TAI), one value per call
cutoutTemplate / Science /  FITS files (bytes): the REF / NEW / DIFF stamp as the primary
Difference                  HDU (with WCS) and its ``VARIANCE`` extension
=========================== ===========================================================

Everything else is null where the schema allows it (rtcnn has no association, history,
trail, dipole, shape, forced science/template photometry or scheduler information:
``diaObjectId``, ``prvDiaSources``, ``diaObject``, ``trail*``, ``dipole*``, ``ixx``...), and
the required ints rtcnn does not measure are 0 (``trailNdata``, ``dipoleNdata``).

Run from a catalog: ``python -m rtcnn.alerts CATALOG -o DIR [--cutouts N] [--overwrite]`` (cutouts in ``DIR_cutouts``)
(the pair is the catalog's ``ref``/``new`` metadata unless ``--ref``/``--new`` are given);
``rtcnn.detect --alerts DIR --cutouts N`` does it during detection.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import fastavro
import numpy as np
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.table import Table
from astropy.time import Time

from rtcnn import __version__, roman
from rtcnn.difference import background_sigma
from rtcnn.errors import CommandParser, RtcnnInputError, cli_main
from rtcnn.fluxes import FLAG_BITS, MEASURED_COLUMNS, PSF_HALF, header_sca
from rtcnn.io.pairdir import atomic_write

__all__ = [
    "ALERT_COLUMNS", "DEFAULT_CUTOUT_SIZE", "Stamps", "alert_records", "alert_schema",
    "check_alert_dir", "check_columns", "cutout_stamps", "midpoint_mjd_tai", "read_alerts",
    "source_ids", "stamp_variance", "visit_id", "write_alerts", "write_cutouts", "write_products",
]

log = logging.getLogger(__name__)

DEFAULT_CUTOUT_SIZE = 63  # px, side of a cutout stamp
ID_BITS = 63  # IDs are positive Avro longs
VISIT_KEYWORDS = ("VISIT", "EXPID", "OBSID", "EXPOSURE")
ALERT_COLUMNS = ("x", "y", "ra", "dec", *MEASURED_COLUMNS)  # a catalog must have these


# --------------------------------------------------------------------------- schema
def alert_schema():
    """The newest alert schema of ``lsst-alert-packet`` (:class:`lsst.alert.packet.Schema`).

    ``lsst.alert.packet.get_latest_schema_version()`` names it (``latest.txt``); the package
    loads it with ``fastavro.schema.load_schema`` (:meth:`Schema.from_file`).
    """
    from lsst.alert.packet import Schema

    return Schema.from_file()


def _record_fields(schema) -> dict[str, list]:
    """``{field: [avro types]}`` of the alert's ``diaSource`` record."""
    field = next(f for f in schema.definition["fields"] if f["name"] == "diaSource")
    return {f["name"]: (f["type"] if isinstance(f["type"], list) else [f["type"]])
            for f in field["type"]["fields"]}  # fmt: skip


# --------------------------------------------------------------------------- ids and time
def _hash63(*parts) -> int:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - ID_BITS)


def visit_id(header: Mapping) -> int:
    """The visit of an image: an integer ``VISIT``/``EXPID``/``OBSID``/``EXPOSURE`` card,
    else a 63-bit hash of the whole header (the same file always gives the same visit)."""
    for key in VISIT_KEYWORDS:
        value = header.get(key)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0:
            return int(value)
    text = header.tostring() if isinstance(header, fits.Header) else repr(sorted(header.items()))
    return _hash63("visit", text)


def detector_id(header: Mapping) -> int:
    """The SCA a header names (:func:`rtcnn.fluxes.header_sca`), else 0."""
    return header_sca(header, default=0)


def source_ids(table: Table, header: Mapping) -> np.ndarray:
    """Deterministic 63-bit IDs: hash of visit, detector and ``(x, y)`` rounded to 1e-3 px.

    Returns
    -------
    (N,) int64, all distinct for distinct positions.
    """
    visit, det = visit_id(header), detector_id(header)
    return np.array([_hash63(visit, det, f"{float(x):.3f}", f"{float(y):.3f}")
                     for x, y in zip(table["x"], table["y"])], dtype=np.int64)  # fmt: skip


def midpoint_mjd_tai(header: Mapping, exptime: float | None = None) -> float | None:
    """Mid-exposure time, MJD in TAI, from a header; None when the header has no date.

    ``MJD-AVG``/``DATE-AVG`` (the FITS standard's mid-exposure) directly; otherwise the
    start (``MJD-OBS``, ``DATE-OBS``, ``MJD-BEG``, ``DATE-BEG``) plus half of ``exptime``
    (or ``EXPTIME``). The time scale is ``TIMESYS`` (default UTC).

    Raises
    ------
    RtcnnInputError
        A date card that is not a valid date.
    """
    scale = str(header.get("TIMESYS", "UTC")).strip().lower() or "utc"
    if scale not in Time.SCALES:
        scale = "utc"
    if exptime is None:
        try:
            exptime = float(header.get("EXPTIME"))
        except (TypeError, ValueError):
            exptime = None
    for keys, offset in ((("MJD-AVG", "DATE-AVG"), 0.0),
                         (("MJD-OBS", "DATE-OBS", "MJD-BEG", "DATE-BEG"), 0.5)):  # fmt: skip
        for key in keys:
            value = header.get(key)
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            try:
                t = (Time(float(value), format="mjd", scale=scale) if key.startswith("MJD")
                     else Time(str(value).strip(), format="isot", scale=scale))  # fmt: skip
            except (TypeError, ValueError) as err:
                raise RtcnnInputError(None, f"header {key} = {value!r} is not a date ({err})"
                                      ) from None  # fmt: skip
            mjd = float(t.tai.mjd)
            if offset and exptime:
                mjd += offset * exptime / 86400.0
            return mjd
    return None


# --------------------------------------------------------------------------- cutouts
def stamp_variance(data: np.ndarray, sigma: float, exptime: float | None) -> np.ndarray:
    """Variance (e-/s)^2 of image pixels: ``sigma**2 + max(I, 0) / exptime`` (NaN stays NaN)."""
    var = np.full(data.shape, float(sigma) ** 2)
    if exptime:
        var = var + np.clip(data, 0.0, None) / exptime
    return np.where(np.isfinite(data), var, np.nan)


BLOCK = 2880  # bytes, FITS block


class _HduTemplate:
    """One FITS HDU's header built and verified once by astropy, written many times.

    astropy takes milliseconds to build and verify each HDU; thousands of stamps share
    everything but the WCS reference pixel (``CRPIX1/2``) and a few candidate cards, so
    those 80-byte cards are patched into the template's header bytes (same format, as
    :class:`astropy.io.fits.Card` renders them) and the pixels appended as big-endian
    float32, padded to the 2880-byte block.
    """

    def __init__(self, header: fits.Header, variable: Sequence[str]):
        text = header.tostring()
        keys = [c.keyword for c in header.cards]
        self.header = header
        self.bytes = bytearray(text.encode("ascii"))
        self.offsets = {k: 80 * keys.index(k) for k in variable}

    def card(self, key: str, value) -> bytes:
        """The 80-byte card ``key = value`` with the template's comment."""
        return fits.Card(key, value, self.header.comments[key]).image.encode("ascii")

    def render(self, cards: Mapping[str, bytes], data: np.ndarray | None = None) -> bytes:
        """Header bytes with ``cards`` (key -> 80-byte card) patched in, then ``data``."""
        out = bytearray(self.bytes)
        for key, image in cards.items():
            o = self.offsets[key]
            out[o:o + 80] = image
        if data is not None:
            raw = np.ascontiguousarray(data, dtype=">f4").tobytes()
            out += raw + bytes(-len(raw) % BLOCK)
        return bytes(out)


def _image_header(kind: str, size: int, wcs_header: fits.Header, name: str | None,
                  unit: str) -> fits.Header:
    """The header astropy writes for a ``size``-square float32 image HDU with this WCS."""
    zeros = np.zeros((size, size), np.float32)
    hdu = (fits.PrimaryHDU(zeros, header=wcs_header.copy()) if kind == "primary"
           else fits.ImageHDU(zeros, header=wcs_header.copy(), name=name))  # fmt: skip
    hdu.header["BUNIT"] = unit
    hdu.header["PADDED"] = (False, "stamp ran off the image (NaN-padded)")
    hdu.verify("exception")
    return hdu.header


class StampWriter:
    """FITS bytes of the stamps of one image grid (see :class:`_HduTemplate`).

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        The new image's WCS (SIP included); a stamp's WCS is it with ``CRPIX`` shifted by
        the stamp's origin, as :class:`astropy.nddata.Cutout2D` shifts it.
    size : int
        Stamp side in px.
    """

    NAMES = ("ref", "new", "diff")
    UNIT, VAR_UNIT = "electron/s", "(electron/s)**2"
    CANDIDATE_CARDS = ("ID", "X", "Y", "RA", "DEC")

    def __init__(self, wcs, size: int):
        hdr = wcs.to_header(relax=True)
        self.crpix = (float(wcs.wcs.crpix[0]), float(wcs.wcs.crpix[1]))
        var = ("CRPIX1", "CRPIX2", "PADDED")
        self.ext = {}
        for name in self.NAMES:
            for suffix, unit in (("", self.UNIT), ("_VARIANCE", self.VAR_UNIT)):
                extname = f"{name.upper()}{suffix}"
                self.ext[extname] = _HduTemplate(_image_header("ext", size, hdr, extname, unit), var)
        self.stamp_primary = _HduTemplate(_image_header("primary", size, hdr, None, self.UNIT), var)
        self.stamp_var = _HduTemplate(_image_header("ext", size, hdr, "VARIANCE", self.VAR_UNIT),
                                      var)  # fmt: skip
        primary = fits.PrimaryHDU().header
        primary["EXTEND"] = True
        for key, comment in (("ID", "source ID (diaSourceId)"), ("X", "[pix] 0-based column"),
                             ("Y", "[pix] 0-based row"), ("RA", "[deg]"), ("DEC", "[deg]")):
            primary[key] = (0.0 if key != "ID" else 0, comment)
        primary["ORIGIN"] = f"rtcnn {__version__}"
        primary["PADDED"] = (False, "stamps ran off the image (NaN-padded)")
        self.file_primary = _HduTemplate(primary, (*self.CANDIDATE_CARDS, "PADDED"))

    def _wcs_cards(self, st) -> dict[str, bytes]:
        """The stamp's CRPIX and PADDED cards (one rendering shared by all its HDUs)."""
        t = self.stamp_primary
        return {"CRPIX1": t.card("CRPIX1", self.crpix[0] - st.origin[0]),
                "CRPIX2": t.card("CRPIX2", self.crpix[1] - st.origin[1]),
                "PADDED": t.card("PADDED", bool(st.padded))}  # fmt: skip

    def stamp_bytes(self, st, name: str, cards: dict | None = None) -> bytes:
        """One stamp as a FITS file: the image (primary HDU, WCS) and its ``VARIANCE``."""
        c = cards or self._wcs_cards(st)
        return (self.stamp_primary.render(c, getattr(st, name))
                + self.stamp_var.render(c, getattr(st, f"{name}_var")))

    def alert_stamps(self, st) -> dict[str, bytes]:
        """The alert's ``cutoutDifference``/``Science``/``Template`` FITS bytes."""
        c = self._wcs_cards(st)
        return {"cutoutDifference": self.stamp_bytes(st, "diff", c),
                "cutoutScience": self.stamp_bytes(st, "new", c),
                "cutoutTemplate": self.stamp_bytes(st, "ref", c)}

    def file_bytes(self, st, meta: Mapping) -> bytes:
        """The cutout file of a candidate: primary HDU with ``meta`` (:data:`CANDIDATE_CARDS`)
        and the six image HDUs ``REF``, ``REF_VARIANCE``, ``NEW``... ``DIFF_VARIANCE``."""
        c = self._wcs_cards(st)
        p = self.file_primary
        parts = [p.render({**{k: p.card(k, v) for k, v in meta.items()}, "PADDED": c["PADDED"]})]
        for name in self.NAMES:
            parts.append(self.ext[name.upper()].render(c, getattr(st, name)))
            parts.append(self.ext[f"{name.upper()}_VARIANCE"].render(c, getattr(st, f"{name}_var")))
        return b"".join(parts)


class Stamps:
    """The three stamps of one candidate and their variances, on the new image's grid.

    Attributes
    ----------
    ref, new, diff, ref_var, new_var, diff_var : (N, N) float32
        e-/s and (e-/s)^2; NaN off the image and at masked pixels.
    origin : (int, int)
        0-based ``(x, y)`` of the stamp's first pixel in the image (negative when padded).
    padded : bool
        The stamp ran off the image (NaN beyond it).
    """

    __slots__ = ("diff", "diff_var", "new", "new_var", "origin", "padded", "ref", "ref_var")


def _image_sigma(image) -> float:
    """Background noise per pixel of an image: header ``BKGSIG``, else its MAD sigma."""
    try:
        value = float(image.header.get("BKGSIG"))
        if math.isfinite(value) and value > 0:
            return value
    except (TypeError, ValueError):
        pass
    return background_sigma(np.asarray(image.data), image.mask)


def cutout_stamps(ref, new, x, y, size: int = DEFAULT_CUTOUT_SIZE):
    """Yield :class:`Stamps` of each position, ``size`` px square, on the new image's grid.

    The pixel ranges are :class:`astropy.nddata.Cutout2D`'s (``mode="partial"``, NaN
    fill), so a stamp's WCS is the new image's with ``CRPIX`` less ``origin``.

    Parameters
    ----------
    ref, new : rtcnn.io.Image
        The aligned reference and the new image (the new image's WCS is used for all three).
    x, y : (N,) float
        Positions in px (0-based).
    size : int
        Stamp side in px (odd sizes centre the candidate's pixel).
    """
    if size < 3:
        raise RtcnnInputError(None, f"--cutouts must be >= 3 px, got {size}")
    new.require_wcs("write cutouts with a WCS")
    sig_r, sig_n = _image_sigma(ref), _image_sigma(new)
    new_data, ref_data = np.asarray(new.data), np.asarray(ref.data)
    for xi, yi in zip(np.asarray(x, float), np.asarray(y, float)):
        cut = Cutout2D(new_data, (xi, yi), size, mode="partial", fill_value=np.nan, copy=True)
        st = Stamps()
        so, sc = cut.slices_original, cut.slices_cutout
        st.padded = any(s.stop - s.start != size for s in sc)
        st.origin = (so[1].start - sc[1].start, so[0].start - sc[0].start)
        r = np.full((size, size), np.nan, np.float32)
        r[sc] = ref_data[so]
        n = cut.data.astype(np.float32)
        for img, arr in ((ref, r), (new, n)):
            if img.mask is not None:
                arr[sc] = np.where(img.mask[so], np.nan, arr[sc])
        st.ref, st.new = r, n
        st.diff = n - r
        st.ref_var = stamp_variance(r, sig_r, ref.exptime).astype(np.float32)
        st.new_var = stamp_variance(n, sig_n, new.exptime).astype(np.float32)
        st.diff_var = st.ref_var + st.new_var
        yield st


def check_columns(table: Table, path=None, needed: Sequence[str] = ALERT_COLUMNS) -> None:
    """Raise :class:`RtcnnInputError` (one line) when ``table`` lacks a needed column."""
    missing = [c for c in needed if c not in table.colnames]
    if missing:
        raise RtcnnInputError(path, f"catalog lacks column(s) {', '.join(missing)} needed for "
                              "alerts (write it with this rtcnn's detect)")  # fmt: skip


def check_alert_dir(path, overwrite: bool) -> Path:
    """An output directory for packets or cutouts: an existing one is refused without
    ``overwrite`` (check before any work); a file in its place is an error."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RtcnnInputError(p, "is a file, not a directory")
    if p.is_dir() and not overwrite:
        raise RtcnnInputError(p, "already exists; pass --overwrite to replace its contents")
    return p


def _ensure_ids(table: Table, header: Mapping) -> np.ndarray:
    if "id" not in table.colnames:
        table["id"] = source_ids(table, header)
        table["id"].description = "deterministic source ID (rtcnn.alerts.source_ids)"
    return np.asarray(table["id"], np.int64)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (many small files: no fsync)."""
    atomic_write(path, True, lambda tmp: Path(tmp).write_bytes(data), fsync=False)


@contextlib.contextmanager
def _staged_dir(path, overwrite: bool):
    """Write a directory all-or-nothing: yields a fresh temporary sibling, which replaces
    ``path`` (and everything in it) only when the block succeeds; on failure it is removed
    and ``path`` is untouched. An existing ``path`` needs ``overwrite``."""
    final = check_alert_dir(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # --overwrite: no stale files of an earlier run stay behind
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_cutouts(table: Table, ref, new, outdir, size: int = DEFAULT_CUTOUT_SIZE,
                  overwrite: bool = False, on_stamp=None) -> list[Path]:
    """Write ``<outdir>/<id>.fits`` per candidate (see the module docstring).

    Adds an ``id`` column (:func:`source_ids`) when the table has none, and sets the
    ``edge`` bit of ``flags`` where a stamp was padded. ``on_stamp(i, stamps)``, when
    given, is called with each row's :class:`Stamps` (e.g. to draw thumbnails).

    Returns
    -------
    list of pathlib.Path, in table order.
    """
    check_columns(table, needed=("x", "y", "ra", "dec"))
    ids = _ensure_ids(table, new.header)
    writer = StampWriter(new.require_wcs("write cutouts with a WCS"), size)
    names = []
    with _staged_dir(outdir, overwrite) as out:
        for i, st in enumerate(cutout_stamps(ref, new, table["x"], table["y"], size)):
            names.append(f"{ids[i]}.fits")
            _write_bytes(out / names[-1], writer.file_bytes(st, _candidate_cards(table, i, ids[i])))
            if on_stamp is not None:
                on_stamp(i, st)
            if st.padded and "flags" in table.colnames:
                table["flags"][i] |= FLAG_BITS["edge"]
    return [Path(outdir) / n for n in names]


# --------------------------------------------------------------------------- packets
def _candidate_cards(table: Table, i: int, source_id: int) -> dict:
    return {"ID": int(source_id), "X": float(table["x"][i]), "Y": float(table["y"][i]),
            "RA": float(table["ra"][i]), "DEC": float(table["dec"][i])}


def _opt(value):
    """A float for a nullable Avro field: None when not finite."""
    v = float(value)
    return v if math.isfinite(v) else None


def alert_records(table: Table, ref, new, size: int = DEFAULT_CUTOUT_SIZE, schema=None,
                  processed_mjd: float | None = None, writer: StampWriter | None = None):
    """Yield ``(record, stamps)``: the alert dict of each candidate (validated) and its stamps.

    Parameters
    ----------
    table : astropy.table.Table
        A measured catalog (:data:`ALERT_COLUMNS`).
    ref, new : rtcnn.io.Image
    size : int
        Cutout side in px.
    schema : lsst.alert.packet.Schema, optional
        Default :func:`alert_schema`.
    processed_mjd : float, optional
        ``timeProcessedMjdTai`` (default now).
    writer : StampWriter, optional
        Default one for ``new``'s WCS and ``size``.
    """
    check_columns(table)
    schema = schema or alert_schema()
    fields = _record_fields(schema)
    parsed = fastavro.parse_schema(schema.definition)
    header = new.header
    ids = _ensure_ids(table, header)
    visit, det = visit_id(header), detector_id(header)
    mjd = midpoint_mjd_tai(header, new.exptime)
    band = new.band.strip() if new.band else None
    if band:
        try:
            band = roman.canonical_band(band)  # F158 and H158 give one name, H158
        except RtcnnInputError:
            pass  # not a Roman band: as written
    processed = Time.now().tai.mjd if processed_mjd is None else float(processed_mjd)
    model = table.meta.get("model")
    version = f"rtcnn {__version__}" + (f" {os.path.basename(str(model))}" if model else "")
    writer = writer or StampWriter(new.require_wcs("write cutouts with a WCS"), size)
    flags = np.asarray(table["flags"], np.int64)
    bits = {name: (flags & bit) != 0 for name, bit in FLAG_BITS.items()}
    for i, st in enumerate(cutout_stamps(ref, new, table["x"], table["y"], size)):
        row = table[i]
        edge = bool(bits["edge"][i] or st.padded)
        src = {name: None if "null" in types else 0 for name, types in fields.items()}
        src.update({
            "diaSourceId": int(ids[i]), "visit": int(visit), "detector": int(det),
            "midpointMjdTai": float("nan") if mjd is None else mjd,
            "exposureTime": _opt(new.exptime) if new.exptime else None,
            "ra": float(row["ra"]), "dec": float(row["dec"]),
            "raErr": _opt(row["ra_err"]), "decErr": _opt(row["dec_err"]),
            "x": float(row["x"]), "y": float(row["y"]),
            "xErr": _opt(row["x_err"]), "yErr": _opt(row["y_err"]),
            "apFlux": _opt(row["ap_flux"]), "apFluxErr": _opt(row["ap_flux_err"]),
            "apFlux_flag": not math.isfinite(float(row["ap_flux"])),
            "apFlux_flag_apertureTruncated": edge,
            "isNegative": bool(row["is_negative"]), "snr": _opt(row["snr"]),
            "psfFlux": _opt(row["psf_flux"]), "psfFluxErr": _opt(row["psf_flux_err"]),
            "psfNdata": (2 * PSF_HALF + 1) ** 2,
            "psfFlux_flag": not math.isfinite(float(row["psf_flux"])),
            "psfFlux_flag_edge": edge,
            "reliability": _opt(row["reliability"]), "reliabilityVersion": version,
            "band": band, "timeProcessedMjdTai": processed, "bboxSize": int(size),
            "pixelFlags": False, "pixelFlags_bad": bool(bits["masked"][i]),
            "pixelFlags_cr": bool(bits["cosmic_ray"][i]), "pixelFlags_edge": edge,
            "pixelFlags_saturated": bool(bits["saturated"][i]),
        })  # fmt: skip
        unknown = set(src) - set(fields)
        if unknown:  # a schema without one of these fields: not the schema rtcnn was made for
            raise RuntimeError(f"alert schema {schema.definition['name']} lacks {sorted(unknown)}")
        record = {f["name"]: None for f in schema.definition["fields"]}
        record.update({
            "diaSourceId": int(ids[i]), "diaSource": src,
            **writer.alert_stamps(st),
        })  # fmt: skip
        # the schema's own validation (lsst Schema.validate = fastavro.validate); the quick
        # pass without error reports first, the reporting one only for an invalid record
        if not fastavro.validate(record, parsed, raise_errors=False):
            schema.validate(record)  # raises fastavro's ValidationError naming the field
        yield record, st


def write_alerts(table: Table, ref, new, outdir, size: int = DEFAULT_CUTOUT_SIZE,
                 overwrite: bool = False, cutout_dir=None,
                 processed_mjd: float | None = None) -> list[Path]:
    """Write ``<outdir>/<diaSourceId>.avro`` per candidate, each validated.

    With ``cutout_dir``, the cutout files (:func:`write_cutouts`) are written from the
    same stamps (one pass over the candidates).

    Returns
    -------
    list of pathlib.Path, the packets in table order.
    """
    check_columns(table)
    check_alert_dir(outdir, overwrite)
    if cutout_dir is not None:
        check_alert_dir(cutout_dir, overwrite)
    schema = alert_schema()
    writer = StampWriter(new.require_wcs("write cutouts with a WCS"), size)
    names = []
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(_staged_dir(outdir, overwrite))
        cut = (stack.enter_context(_staged_dir(cutout_dir, overwrite))
               if cutout_dir is not None else None)  # fmt: skip
        records = alert_records(table, ref, new, size, schema, processed_mjd, writer)
        for i, (record, st) in enumerate(records):
            buf = io.BytesIO()
            schema.store_alerts(buf, [record])
            names.append(f"{record['diaSourceId']}.avro")
            _write_bytes(out / names[-1], buf.getvalue())
            if st.padded:
                table["flags"][i] |= FLAG_BITS["edge"]
            if cut is not None:
                _write_bytes(cut / f"{record['diaSourceId']}.fits",
                             writer.file_bytes(st, _candidate_cards(table, i, record["diaSourceId"])))
    paths = [Path(outdir) / n for n in names]
    table.meta["alert_schema"] = schema.definition["name"]
    return paths


def write_products(table: Table, ref, new, *, alerts=None, cutouts=None,
                   size: int = DEFAULT_CUTOUT_SIZE, overwrite: bool = False,
                   catalog=None) -> None:
    """The per-pair products of ``rtcnn.detect --alerts DIR --cutouts N``, in one pass.

    Writes the packets (:func:`write_alerts`) and/or the cutout files
    (:func:`write_cutouts`), adds the ``id`` column, sets ``edge`` where a stamp is padded,
    and records in ``table.meta``: ``alerts`` and ``cutouts`` (directories; ``cutouts``
    relative to the directory of ``catalog`` when given, as :mod:`rtcnn.vet` reads it),
    ``alert_schema`` and ``seconds_products`` (s). Call it before the catalog is written.
    """
    if alerts is None and cutouts is None:
        return
    t0 = time.perf_counter()
    if alerts is not None:
        write_alerts(table, ref, new, alerts, size, overwrite, cutout_dir=cutouts)
        table.meta["alerts"] = os.fspath(alerts)
    else:
        write_cutouts(table, ref, new, cutouts, size, overwrite)
    if cutouts is not None:
        base = Path(catalog).parent if catalog is not None else None
        table.meta["cutouts"] = (os.path.relpath(cutouts, base) if base is not None
                                 else os.fspath(cutouts))  # fmt: skip
        table.meta["cutout_size"] = int(size)
    table.meta["seconds_products"] = round(time.perf_counter() - t0, 3)


def read_alerts(path) -> list[dict]:
    """The records of one packet file, read with ``lsst.alert.packet.retrieve_alerts``."""
    from lsst.alert.packet import retrieve_alerts

    with open(path, "rb") as fh:
        _, records = retrieve_alerts(fh)
        return list(records)


# --------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m rtcnn.alerts",
                      description="Write LSST Avro alert packets (and cutouts) of the "
                      "candidates of a measured catalog.")  # fmt: skip
    p.add_argument("catalog", help="ECSV catalog written by rtcnn.detect")
    p.add_argument("-o", "--output", required=True, help="directory of <diaSourceId>.avro")
    p.add_argument("--ref", help="reference image, put on the new image's grid and zero "
                   "point (default: the catalog's 'ref')")
    p.add_argument("--new", help="new image (default: the catalog's 'new')")
    p.add_argument("--cutouts", type=int, nargs="?", const=DEFAULT_CUTOUT_SIZE, default=None,
                   metavar="N", help="also write N px cutout files (default N = 63) to "
                   "OUTPUT_cutouts/")  # fmt: skip
    p.add_argument("--size", type=int, default=DEFAULT_CUTOUT_SIZE,
                   help="cutout side in px inside the packets (default 63; --cutouts N sets "
                   "both)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p


@cli_main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m rtcnn.alerts``."""
    from rtcnn.align import read_aligned_pair
    from rtcnn.catalog import read_catalog

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    table = read_catalog(args.catalog)
    check_columns(table, args.catalog)
    ref = args.ref or table.meta.get("ref")
    new = args.new or table.meta.get("new")
    if not ref or not new:
        raise RtcnnInputError(args.catalog, "metadata names no ref/new images; give --ref/--new")
    check_alert_dir(args.output, args.overwrite)
    if args.cutouts:
        check_alert_dir(Path(args.output).with_name(Path(args.output).name + "_cutouts"),
                        args.overwrite)
    ref_img, new_img, _ = read_aligned_pair(ref, new)  # the reference on the new grid
    t0 = time.perf_counter()
    out = Path(args.output)
    cut = out.with_name(out.name + "_cutouts") if args.cutouts else None
    paths = write_alerts(table, ref_img, new_img, args.output, size=args.cutouts or args.size,
                         overwrite=args.overwrite, cutout_dir=cut)  # fmt: skip
    log.info("%d packets -> %s (%.2f s)", len(paths), args.output, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
