"""FITS images: choose the image HDU, read it lazily, find the zero point, write one.

This is one of the two places (with :mod:`rtcnn.sim`'s writer) where FITS's 1-based
pixel convention meets the package's 0-based one (:mod:`rtcnn`). The rule here is
simple: pixel <-> sky always goes through :meth:`astropy.wcs.WCS.pixel_to_world` /
:meth:`~astropy.wcs.WCS.world_to_pixel`, which are 0-based (astropy applies
``CRPIX - 1`` itself); nothing in rtcnn calls ``all_pix2world(..., 1)``.

Memory: :func:`read_image` memory-maps uncompressed, unscaled images, so a 4088x4088
Roman SCA costs nothing until pixels are touched; :meth:`Image.section` copies one tile
(native float32, bad pixels filled) and :meth:`Image.filled` one full image. The only
full-size array built at read time is the bad-pixel mask (1 byte/px), and only when the
image has NaN/inf pixels.

Zero point
----------
``Image.zeropoint`` is the AB magnitude of 1 image unit (``BUNIT``; e-/s for rtcnn's
simulator), so ``m = -2.5 log10(flux) + zeropoint``. It is taken from the first of
:data:`ZEROPOINT_KEYWORDS` present in the header with a finite numeric value, else derived
from ``PHOTFLAM``/``PHOTPLAM`` (HST convention, flux in e-/s), else from ``PIXAR_SR`` when
``BUNIT`` is MJy/sr (JWST / Roman L2 convention), else ``None`` (estimate it from stars
with :func:`rtcnn.photometry.zeropoint_from_stars`, the paper's eq. 3). The value is used
as given: rtcnn does not rescale it by ``EXPTIME``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS, FITSFixedWarning, SingularMatrixError

from rtcnn.errors import RtcnnInputError
from rtcnn.io.pairdir import atomic_write

log = logging.getLogger(__name__)

#: Header keywords holding an AB zero point (mag of 1 image unit), tried in this order.
#: (Not OpenUniverse's ZPTMAG: it is 2.5 log10(EXPTIME * area), not an AB zero point of the
#: image unit; rtcnn.io.openuniverse.read_ou_image converts it.)
ZEROPOINT_KEYWORDS = ("MAGZP", "MAGZPT", "MAGZERO", "ZPAB", "PHOTZP", "ZEROPT", "ZP")
#: Header keywords naming the band / filter, tried in this order.
BAND_KEYWORDS = ("BAND", "FILTER", "FILTER1")
#: Header keywords holding the exposure time in s, tried in this order.
EXPTIME_KEYWORDS = ("EXPTIME", "EXPOSURE", "TEXPTIME")
#: EXTNAME of the science extension chosen when the primary HDU holds no image.
SCI_EXTNAME = "SCI"
#: First bytes of a FITS file (the SIMPLE card), and of the compressed streams astropy reads.
_FITS_MAGIC = b"SIMPLE  ="
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"PK\x03\x04")
AB_ZEROPOINT_JY = 1e23 * 10 ** (-0.4 * 48.60)  # Jy (3630.78), flux density of AB mag 0
GRID_TOLERANCE = 0.01  # px: two WCSs closer than this at an image's corners are one grid
#: A CD/PC matrix with |det| <= (WCS_SINGULAR_RTOL * its largest element)^2 is singular.
WCS_SINGULAR_RTOL = 1e-6
#: px: largest miss of a pixel -> sky -> pixel round trip for a WCS to be trusted.
WCS_ROUNDTRIP_TOL = 0.01


@dataclass
class Image:
    """One 2-D image with the metadata rtcnn needs.

    Attributes
    ----------
    data : (ny, nx) ndarray, float32
        Pixel values in ``unit`` (e-/s for the simulator), background-subtracted by the
        producer. Read-only; usually a memory map of the file in FITS byte order
        (``>f4``), which numpy handles but torch does not: use :meth:`section` or
        :meth:`filled` for native float32 arrays with bad pixels filled. May contain
        NaN/inf where ``mask`` is True.
    mask : (ny, nx) ndarray of bool, or None
        True = bad pixel (NaN or inf in ``data``). ``None`` when every pixel is finite.
    wcs : astropy.wcs.WCS or None
        Celestial WCS (0-based through ``pixel_to_world`` / ``world_to_pixel``), or
        ``None`` when the header has none (``wcs_problem`` says why).
    zeropoint : float or None
        AB magnitude of 1 ``unit`` (see the module docstring), or None.
    unit : str
        ``BUNIT`` from the header ("" if absent).
    header : astropy.io.fits.Header
        Header of the chosen HDU (a copy).
    path : pathlib.Path or None
        The file read (None for :meth:`from_array`).
    band : str or None
        Band / filter name (``BAND``, ``FILTER``...).
    exptime : float or None
        Exposure time in s.
    hdu : int
        Index of the HDU that was read.
    zeropoint_source : str or None
        Header keyword(s) the zero point came from.
    wcs_problem : str or None
        Why ``wcs`` is None (for error messages), else None.
    """

    data: np.ndarray = field(repr=False)
    mask: np.ndarray | None = field(repr=False)
    wcs: WCS | None = field(repr=False)
    zeropoint: float | None
    unit: str
    header: fits.Header = field(repr=False)
    path: Path | None
    band: str | None = None
    exptime: float | None = None
    hdu: int = 0
    zeropoint_source: str | None = None
    wcs_problem: str | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` in px."""
        return (int(self.data.shape[0]), int(self.data.shape[1]))

    @property
    def masked_fraction(self) -> float:
        """Fraction of pixels that are NaN/inf (masked), 0 to 1."""
        return 0.0 if self.mask is None else float(self.mask.mean())

    def section(self, x0: int, y0: int, nx: int, ny: int | None = None, fill: float = 0.0):
        """Copy of ``data[y0:y0+ny, x0:x0+nx]`` as native float32, bad pixels set to ``fill``.

        Reads only those rows from the memory map. ``ny`` defaults to ``nx`` (a square
        tile). ``fill`` is in image units; 0 is the background level of a
        background-subtracted image.

        Returns
        -------
        (ny, nx) ndarray, float32, C-contiguous, writeable.
        """
        ny = nx if ny is None else ny
        full_ny, full_nx = self.shape
        if not (0 <= x0 and 0 <= y0 and nx > 0 and ny > 0 and x0 + nx <= full_nx
                and y0 + ny <= full_ny):
            raise ValueError(
                f"section x0={x0}, y0={y0}, {nx}x{ny} px is outside the "
                f"{full_nx}x{full_ny} px image"
            )
        out = np.array(self.data[y0:y0 + ny, x0:x0 + nx], dtype=np.float32, order="C")
        if self.mask is not None:
            out[self.mask[y0:y0 + ny, x0:x0 + nx]] = fill
        return out

    def filled(self, fill: float = 0.0) -> np.ndarray:
        """The whole image as a native float32 copy with bad pixels set to ``fill``."""
        ny, nx = self.shape
        return self.section(0, 0, nx, ny, fill=fill)

    def require_wcs(self, purpose: str = "convert between RA/Dec and pixels") -> WCS:
        """Return ``wcs`` or raise :class:`RtcnnInputError` naming the file and ``purpose``."""
        if self.wcs is None:
            why = self.wcs_problem or "the header has no celestial WCS"
            raise RtcnnInputError(self.path, f"{why}; a WCS is needed to {purpose}")
        return self.wcs

    @classmethod
    def from_array(
        cls,
        data: np.ndarray,
        *,
        wcs: WCS | None = None,
        zeropoint: float | None = None,
        unit: str = "electron/s",
        header: fits.Header | None = None,
        path: str | os.PathLike | None = None,
        band: str | None = None,
        exptime: float | None = None,
    ) -> Image:
        """Wrap an in-memory 2-D array (float32 copy only if needed), masking NaN/inf."""
        arr = np.asarray(data)
        if arr.ndim != 2:
            raise RtcnnInputError(path, f"image must be 2-D, got shape {arr.shape}")
        arr = arr.astype(np.float32, copy=False)
        mask = _bad_pixel_mask(arr, path)
        return cls(
            data=arr, mask=mask, wcs=wcs, zeropoint=zeropoint, unit=unit,
            header=header if header is not None else fits.Header(),
            path=None if path is None else Path(path), band=band, exptime=exptime, hdu=0,
            zeropoint_source=None if zeropoint is None else "given",
            wcs_problem=None if wcs is not None else "no WCS was given",
        )


def pixel_to_sky(source: Image | WCS | None, x, y, path: str | os.PathLike | None = None):
    """0-based pixel ``(x, y)`` → ``(ra, dec)`` in deg (float64 arrays, RA in [0, 360)).

    ``source`` is an :class:`Image` or a celestial :class:`~astropy.wcs.WCS`; the values
    are in the WCS's own frame (``pixel_to_world_values``, 0-based, SIP included).
    ``path`` names the file in the error when there is no WCS.

    Raises
    ------
    RtcnnInputError
        No celestial WCS (the image's ``wcs_problem`` says why).
    """
    wcs = _celestial(source, path, "convert pixels to RA/Dec")
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size == 0:
        return np.zeros(x.shape), np.zeros(y.shape)
    ra, dec = wcs.pixel_to_world_values(x, y)
    return np.mod(np.asarray(ra, dtype=np.float64), 360.0), np.asarray(dec, dtype=np.float64)


def sky_to_pixel(source: Image | WCS | None, ra, dec, path: str | os.PathLike | None = None):
    """``(ra, dec)`` in deg → 0-based pixel ``(x, y)`` (float64 arrays); inverse of
    :func:`pixel_to_sky`."""
    wcs = _celestial(source, path, "convert RA/Dec to pixels")
    ra, dec = np.asarray(ra, dtype=np.float64), np.asarray(dec, dtype=np.float64)
    if ra.size == 0:
        return np.zeros(ra.shape), np.zeros(dec.shape)
    x, y = wcs.world_to_pixel_values(ra, dec)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def _celestial(source, path, purpose: str) -> WCS:
    """The 2-D celestial WCS of an :class:`Image` or a WCS, or a one-line error."""
    if isinstance(source, Image):
        return source.require_wcs(purpose)
    if source is None or not getattr(source, "has_celestial", False):
        raise RtcnnInputError(path, f"no celestial WCS in the header; a WCS is needed to "
                              f"{purpose}")
    return source if source.naxis == 2 else source.celestial


def check_fits_file(path: str | os.PathLike) -> Path:
    """Raise :class:`RtcnnInputError` unless ``path`` is an existing, non-empty FITS file.

    Checks existence, that it is a file, and the first bytes (the ``SIMPLE`` card, or a
    gzip / bzip2 / zip stream that astropy decompresses).
    """
    p = Path(path)
    if not p.exists():
        raise RtcnnInputError(p, "file not found")
    if not p.is_file():
        raise RtcnnInputError(p, "is a directory, not a FITS file")
    try:
        with open(p, "rb") as fh:
            head = fh.read(len(_FITS_MAGIC))
    except OSError as err:
        raise RtcnnInputError(p, f"cannot be read ({err.strerror or err})") from None
    if not head:
        raise RtcnnInputError(p, "empty file, not a FITS file")
    if not head.startswith(_FITS_MAGIC) and not head.startswith(_COMPRESSED_MAGIC):
        raise RtcnnInputError(p, "not a FITS file (it does not start with a SIMPLE card)")
    return p


def read_image(path: str | os.PathLike, hdu: int | str | None = None,
               memmap: bool = True) -> Image:
    """Read one 2-D image and its metadata from a FITS file.

    HDU choice (unless ``hdu`` names one): the image HDU with ``EXTNAME = 'SCI'``, else the
    first 2-D floating-point image (primary HDU included), else the first 2-D image (an
    integer DQ or mask plane never wins over a float image). A constant image is read
    with a warning (the wrong HDU?). Leading axes of length 1 (e.g. ``NAXIS3 = 1``) are
    dropped; a true cube is an error. Scaled integers (``BZERO``/``BSCALE``/``BLANK``)
    are read into memory and converted (astropy cannot map them).

    Parameters
    ----------
    path : str or path-like
        FITS file (optionally gzip/bzip2-compressed; then it is read, not mapped).
    hdu : int or str, optional
        HDU index or EXTNAME (case-insensitive) to read instead of the automatic choice.
    memmap : bool
        Memory-map the pixels (default). Scaled (``BSCALE``/``BZERO``), integer, or
        tile-compressed images are read and converted to float32 once.

    Returns
    -------
    Image
        See :class:`Image`. NaN/inf pixels are masked, not an error; the masked fraction
        is logged at INFO level.

    Raises
    ------
    RtcnnInputError
        Missing file, not FITS, truncated/corrupt, no 2-D image HDU, 3-D image, unknown
        ``hdu``, all pixels NaN/inf.
    """
    p = check_fits_file(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyWarning)
            with fits.open(p, memmap=memmap) as hdul:
                len(hdul)  # parse every header now (not the data)
                index = _choose_hdu(hdul, hdu, p)
                chosen = hdul[index]
                shape = _image_shape(chosen.header)
                _check_not_truncated(chosen, shape, p)
                scaled = memmap and _is_scaled(chosen.header)
                if not scaled:
                    data = _load_data(chosen, shape, p)
                header = chosen.header.copy()
                wcs, wcs_problem = header_wcs(header, hdul)
            if scaled:  # astropy cannot map BZERO/BSCALE/BLANK images: read and convert
                with fits.open(p, memmap=False) as hdul:
                    data = _load_data(hdul[index], shape, p)
        truncated = [w for w in caught if "truncated" in str(w.message)]
        if truncated:  # e.g. a gzip stream that ended early: astropy pads the pixels
            raise RtcnnInputError(p, f"truncated FITS file ({_short(truncated[0].message)})")
    except RtcnnInputError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError) as err:
        raise RtcnnInputError(p, f"truncated or corrupt FITS file ({_short(err)})") from None
    mask = _bad_pixel_mask(data, p)
    _warn_if_constant(data, mask, p, _hdu_name(index, header))
    zp, zp_source = header_zeropoint(header)
    return Image(
        data=data, mask=mask, wcs=wcs, zeropoint=zp, unit=str(header.get("BUNIT", "")).strip(),
        header=header, path=p, band=_first_str(header, BAND_KEYWORDS),
        exptime=_first_float(header, EXPTIME_KEYWORDS), hdu=index,
        zeropoint_source=zp_source, wcs_problem=wcs_problem,
    )


def read_pair(ref: str | os.PathLike, new: str | os.PathLike,
              hdu: int | str | None = None, memmap: bool = True,
              other_grid: bool = False) -> tuple[Image, Image]:
    """Read a reference and a new image on one pixel grid (or, with ``other_grid``, any two).

    Two images are on one grid when their shapes agree and, where both have a WCS, the
    WCSs agree to :data:`GRID_TOLERANCE` px at the new image's corners
    (:func:`grid_offset`). A pair on two grids is an error here, never silently treated
    as aligned: read it with :func:`rtcnn.align.read_aligned_pair`, which passes
    ``other_grid=True`` and resamples the reference onto the new grid.

    Raises
    ------
    RtcnnInputError
        Anything :func:`read_image` raises, or (naming ``new``) a shape mismatch when
        either image has no WCS, or (without ``other_grid``) two pixel grids.
    """
    ref_img = read_image(ref, hdu=hdu, memmap=memmap)
    new_img = read_image(new, hdu=hdu, memmap=memmap)
    if ref_img.shape != new_img.shape and (ref_img.wcs is None or new_img.wcs is None):
        raise RtcnnInputError(
            new,
            f"shape {_fmt_shape(new_img.shape)} does not match the reference "
            f"{_fmt_shape(ref_img.shape)} ({ref}) and a WCS is missing to align them",
        )
    if not other_grid and ref_img.wcs is not None and new_img.wcs is not None:
        offset = grid_offset(ref_img.wcs, new_img.wcs, new_img.shape)[0]
        if ref_img.shape != new_img.shape or offset > GRID_TOLERANCE:
            raise RtcnnInputError(
                new, f"is on another pixel grid than the reference {ref} (WCSs "
                f"{offset:.3g} px apart); read the pair with rtcnn.align.read_aligned_pair")
    return ref_img, new_img


def grid_offset(ref_wcs: WCS, new_wcs: WCS, new_shape: tuple[int, int]
                ) -> tuple[float, float, float]:
    """How far the reference pixel grid is from the new one, at the new image's corners.

    The four corner pixel centres and the centre of the new image go to the sky through
    ``new_wcs`` and back through ``ref_wcs`` (:func:`astropy.wcs.utils.pixel_to_pixel`,
    0-based, SIP included).

    Returns
    -------
    (max_offset, shift_x, shift_y) : floats, px
        ``shift_x, shift_y``: the median reference-minus-new shift of those points;
        ``max_offset``: the largest distance of a point from the new position plus that
        shift rounded to whole pixels (one grid: ``<= GRID_TOLERANCE`` with a zero
        shift; a crop of one grid: ``<= GRID_TOLERANCE`` with an integer shift).
    """
    from astropy.wcs.utils import pixel_to_pixel

    ny, nx = new_shape
    x = np.array([0.0, nx - 1.0, 0.0, nx - 1.0, (nx - 1) / 2.0])
    y = np.array([0.0, 0.0, ny - 1.0, ny - 1.0, (ny - 1) / 2.0])
    xr, yr = pixel_to_pixel(new_wcs, ref_wcs, x, y)
    dx, dy = np.asarray(xr, dtype=float) - x, np.asarray(yr, dtype=float) - y
    if not (np.isfinite(dx).all() and np.isfinite(dy).all()):
        return math.inf, math.nan, math.nan
    sx, sy = float(np.median(dx)), float(np.median(dy))
    return float(np.max(np.hypot(dx - round(sx), dy - round(sy)))), sx, sy


def write_image(path: str | os.PathLike, data: np.ndarray,
                header: fits.Header | dict[str, Any] | None = None,
                overwrite: bool = False) -> Path:
    """Write a 2-D float32 image as the primary HDU, atomically
    (:func:`rtcnn.io.pairdir.atomic_write`: a crash never leaves a half-written file).

    Parameters
    ----------
    path : str or path-like
        Destination; its directory must exist.
    data : (ny, nx) array
        Pixels, cast to float32.
    header : astropy Header or dict, optional
        Cards to write (WCS, BUNIT, MAGZP...). Structural keywords are set by astropy.
    overwrite : bool
        Replace an existing file; otherwise an existing ``path`` is an error.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise ValueError(f"write_image needs a 2-D array, got shape {arr.shape}")
    hdr = header if isinstance(header, fits.Header) else fits.Header(
        list((header or {}).items()))
    hdu = fits.PrimaryHDU(arr.astype(np.float32, copy=False), header=hdr)
    return atomic_write(path, overwrite, hdu.writeto)


def header_zeropoint(header: fits.Header) -> tuple[float | None, str | None]:
    """AB zero point (mag of 1 image unit) from a header, and where it came from.

    Order: :data:`ZEROPOINT_KEYWORDS`; then ``PHOTFLAM``/``PHOTPLAM``
    (``zp = -2.5 log10 PHOTFLAM - 5 log10 PHOTPLAM - 2.408``); then ``PIXAR_SR`` with
    ``BUNIT`` in MJy/sr (``zp = -2.5 log10(PIXAR_SR * 1e6 / 3630.78)``). Non-numeric or
    non-finite values are skipped (logged).

    Returns
    -------
    (zeropoint, source) : (float or None, str or None)
    """
    for key in ZEROPOINT_KEYWORDS:
        if key in header:
            value = _as_float(header[key])
            if value is not None:
                return value, key
            log.warning("ignoring zero-point keyword %s = %r (not a finite number)",
                        key, header[key])
    flam, plam = _as_float(header.get("PHOTFLAM")), _as_float(header.get("PHOTPLAM"))
    if flam and plam and flam > 0 and plam > 0:
        return -2.5 * math.log10(flam) - 5.0 * math.log10(plam) - 2.408, "PHOTFLAM/PHOTPLAM"
    pixar = _as_float(header.get("PIXAR_SR"))
    bunit = str(header.get("BUNIT", "")).replace(" ", "").lower()
    if pixar and pixar > 0 and bunit in ("mjy/sr", "mjy/steradian", "mjy.sr**-1"):
        return -2.5 * math.log10(pixar * 1e6 / AB_ZEROPOINT_JY), "PIXAR_SR"
    return None, None


# --------------------------------------------------------------------------- helpers


def _hdu_label(i: int, h: fits.hdu.base._BaseHDU) -> str:
    name = h.name or ("PRIMARY" if i == 0 else "")
    kind = "image" if h.is_image else "table"
    naxis = int(h.header.get("NAXIS", 0))
    dims = "x".join(str(h.header.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1))
    desc = f"{kind} {dims}" if naxis and kind == "image" else (kind if naxis else "empty")
    return f"{i}:{name} ({desc})" if name else f"{i} ({desc})"


def _image_shape(header: fits.Header) -> tuple[int, ...]:
    """Array shape (numpy order) from NAXISn without touching the data."""
    naxis = int(header.get("NAXIS", 0))
    return tuple(int(header.get(f"NAXIS{k}", 0)) for k in range(naxis, 0, -1))


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop leading length-1 axes (a ``NAXIS3 = 1`` 'cube' is an image)."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _is_2d_image(h) -> bool:
    shape = _squeezed(_image_shape(h.header))
    return h.is_image and len(shape) == 2 and min(shape) > 0


def _choose_hdu(hdul: fits.HDUList, hdu: int | str | None, path: Path) -> int:
    labels = ", ".join(_hdu_label(i, h) for i, h in enumerate(hdul))
    if hdu is not None:
        if isinstance(hdu, (int, np.integer)):
            index = int(hdu)
            if not -len(hdul) <= index < len(hdul):
                raise RtcnnInputError(path, f"has no HDU {hdu} (HDUs: {labels})")
            index %= len(hdul)
        else:
            names = [h.name.upper() for h in hdul]
            if str(hdu).upper() not in names:
                raise RtcnnInputError(path, f"has no HDU named {hdu!r} (HDUs: {labels})")
            index = names.index(str(hdu).upper())
        _check_image_hdu(hdul[index], index, path, labels)
        return index
    for i, h in enumerate(hdul):
        if h.name.upper() == SCI_EXTNAME and h.is_image:
            _check_image_hdu(h, i, path, labels)
            return i
    for i, h in enumerate(hdul):  # a float image before an integer one (DQ, masks, counts)
        if _is_2d_image(h) and int(h.header.get("BITPIX", 0)) < 0:
            return i
    for i, h in enumerate(hdul):
        if _is_2d_image(h):
            return i
    for i, h in enumerate(hdul):
        if h.is_image and len(_squeezed(_image_shape(h.header))) > 2:
            _check_image_hdu(h, i, path, labels)
    raise RtcnnInputError(path, f"has no 2-D image HDU (HDUs: {labels})")


def _check_image_hdu(h, index: int, path: Path, labels: str) -> None:
    if not h.is_image:
        raise RtcnnInputError(path, f"HDU {index} is a table, not an image (HDUs: {labels})")
    shape = _squeezed(_image_shape(h.header))
    if len(shape) > 2:
        raise RtcnnInputError(
            path, f"image HDU {index} is {len(shape)}-D (shape {_fmt_shape(shape)}); "
            "rtcnn needs a 2-D image"
        )
    if len(shape) < 2 or min(shape) == 0:
        raise RtcnnInputError(path, f"HDU {index} holds no 2-D image (HDUs: {labels})")


def _check_not_truncated(h, shape: tuple[int, ...], path: Path) -> None:
    """Compare the data's expected end with the file size (uncompressed files only)."""
    info = h.fileinfo()
    fobj = info.get("file") if info else None
    if (not info or fobj is None or getattr(fobj, "compression", None)
            or isinstance(h, fits.CompImageHDU)):
        return
    nbytes = abs(int(h.header.get("BITPIX", 0))) // 8 * int(np.prod(shape))
    size = os.path.getsize(path)
    if info["datLoc"] + nbytes > size:
        raise RtcnnInputError(
            path, f"truncated FITS file: HDU {h.name or 'PRIMARY'} needs "
            f"{info['datLoc'] + nbytes} bytes, the file has {size}"
        )


def _load_data(h, shape: tuple[int, ...], path: Path) -> np.ndarray:
    data = h.data
    if data is None:
        raise RtcnnInputError(path, "image HDU has no data")
    data = data.reshape(_squeezed(data.shape))
    if data.dtype.kind != "f" or data.dtype.itemsize != 4:
        data = data.astype(np.float32)
    return data


def _bad_pixel_mask(data: np.ndarray, path) -> np.ndarray | None:
    """Mask of NaN/inf pixels (True = bad), None when all are finite; all bad → error."""
    finite = np.isfinite(data)
    if finite.all():
        return None
    mask = ~finite
    frac = float(mask.mean())
    if frac == 1.0:
        raise RtcnnInputError(path, "every pixel is NaN or inf (all-NaN image)")
    log.info("%s: %.3g%% of pixels are NaN/inf and masked", path, 100.0 * frac)
    return mask


def header_wcs(header: fits.Header,
               hdul: fits.HDUList | None = None) -> tuple[WCS | None, str | None]:
    """The celestial WCS of a 2-D image's header, validated, or None and why not.

    ``hdul`` is the open file, for distortion tables stored in other HDUs.

    Read with ``naxis=2``: a ``NAXIS3 = 1`` cube's header is a 2-D image's (and astropy
    refuses SIP distortion on more than 2 axes). A WCS whose CD/PC matrix is singular, or
    whose pixel -> sky -> pixel round trip at the reference pixel misses by more than
    :data:`WCS_ROUNDTRIP_TOL` px, is refused: it would give wrong RA/Dec silently.

    Returns
    -------
    (wcs, problem) : (astropy.wcs.WCS or None, str or None)
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, fobj=hdul, naxis=2)
    except SingularMatrixError:
        log.warning("ignoring unusable WCS: its CD/PC matrix is singular")
        return None, "the header WCS is unusable (its CD/PC matrix is singular)"
    except Exception as err:  # astropy raises many kinds for a broken WCS
        log.warning("ignoring unusable WCS: %s", _short(err))
        return None, f"the header WCS is unusable ({_short(err)})"
    if not wcs.has_celestial:
        return None, "the header has no celestial WCS"
    wcs = wcs.celestial
    problem = _wcs_problem(wcs)
    if problem is not None:
        log.warning("ignoring unusable WCS: %s", problem)
        return None, f"the header WCS is unusable ({problem})"
    return wcs, None


def _wcs_problem(wcs: WCS) -> str | None:
    """Why a celestial WCS cannot be trusted, or None (see :func:`header_wcs`)."""
    matrix = wcs.pixel_scale_matrix
    det = float(np.linalg.det(matrix)) if np.all(np.isfinite(matrix)) else math.nan
    scale = float(np.max(np.abs(matrix))) if np.all(np.isfinite(matrix)) else math.nan
    if not (math.isfinite(det) and scale > 0 and abs(det) > (WCS_SINGULAR_RTOL * scale) ** 2):
        return "its CD/PC matrix is singular"
    x0, y0 = (float(v) - 1.0 for v in wcs.wcs.crpix)  # 0-based reference pixel
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            ra, dec = wcs.all_pix2world([x0, x0 + 100.0], [y0, y0 + 100.0], 0)
            xb, yb = wcs.all_world2pix(ra, dec, 0)
    except Exception as err:  # astropy's solvers raise several kinds
        return f"pixel -> sky -> pixel fails: {_short(err)}"
    miss = np.hypot(np.asarray(xb) - [x0, x0 + 100.0], np.asarray(yb) - [y0, y0 + 100.0])
    if not np.all(np.isfinite(miss)) or float(np.max(miss)) > WCS_ROUNDTRIP_TOL:
        return "pixel -> sky -> pixel does not return to the pixel"
    return None


def _is_scaled(header: fits.Header) -> bool:
    """True when the data are scaled integers (``BZERO``/``BSCALE``/``BLANK``)."""
    if int(header.get("BITPIX", 0)) < 0:
        return False
    bzero, bscale = header.get("BZERO", 0), header.get("BSCALE", 1)
    return bzero != 0 or bscale != 1 or "BLANK" in header


def _hdu_name(index: int, header: fits.Header) -> str:
    name = str(header.get("EXTNAME", "")).strip() or ("PRIMARY" if index == 0 else "")
    return f"{index}:{name}" if name else str(index)


def _warn_if_constant(data: np.ndarray, mask: np.ndarray | None, path, hdu: str) -> None:
    """Warn when every good pixel has the same value (a DQ plane, an empty image...)."""
    good = None if mask is None else ~mask  # no copy of the pixels
    lo = float(np.min(data, where=good, initial=np.inf) if good is not None else np.min(data))
    hi = float(np.max(data, where=good, initial=-np.inf) if good is not None else np.max(data))
    if lo == hi:
        log.warning("%s: the image (HDU %s) is constant (every pixel %g); is this the right "
                    "HDU?", path, hdu, lo)


def _as_float(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _first_float(header: fits.Header, keys) -> float | None:
    for key in keys:
        value = _as_float(header.get(key))
        if value is not None:
            return value
    return None


def _first_str(header: fits.Header, keys) -> str | None:
    for key in keys:
        value = header.get(key)
        if value not in (None, ""):
            return str(value).strip()
    return None


def _fmt_shape(shape) -> str:
    """``(ny, nx)`` → ``'nx x ny px'`` (FITS order, as users read it)."""
    return " x ".join(str(n) for n in reversed(tuple(shape))) + " px"


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


__all__ = [
    "AB_ZEROPOINT_JY",
    "BAND_KEYWORDS",
    "EXPTIME_KEYWORDS",
    "GRID_TOLERANCE",
    "Image",
    "SCI_EXTNAME",
    "WCS_ROUNDTRIP_TOL",
    "WCS_SINGULAR_RTOL",
    "ZEROPOINT_KEYWORDS",
    "check_fits_file",
    "grid_offset",
    "header_wcs",
    "header_zeropoint",
    "pixel_to_sky",
    "read_image",
    "read_pair",
    "sky_to_pixel",
    "write_image",
]
