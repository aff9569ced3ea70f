"""Roman Level-2 ASDF images (``roman_datamodels``), read into the same :class:`Image`.

Level-2 ``ImageModel`` files (calibrated rate images, as written by ``romanisim`` and by
the mission pipeline ``romancal``) hold ``data``, ``err`` (float) and ``dq`` (uint32 bit
flags, :mod:`roman_datamodels.dqflags`) arrays and the distortion model as a ``gwcs``
in ``meta.wcs``. :func:`read_asdf_image` returns them as an :class:`rtcnn.io.fits.Image`
so that everything downstream (tiles, photometry, reprojection, pair directories) is
unchanged:

* ``data``: float32, background-subtracted (sigma-clipped median of the good pixels,
  unless ``meta.background.subtracted`` says the pipeline did it), in ``DN/s`` (or
  ``MJy/sr`` once ``meta.cal_step.flux`` is ``COMPLETE``);
* ``mask``: a pixel with any of :data:`DQ_BAD_FLAGS` set, or non-finite;
* ``wcs``: an astropy TAN-SIP :class:`~astropy.wcs.WCS` fitted to the gwcs over the image
  with :meth:`gwcs.wcs.WCS.to_fits_sip` (max error ``max_pix_error`` px, checked), so it
  writes into FITS headers and works with every astropy tool; ``wcs='gwcs'`` keeps the
  native gwcs instead (APE-14 ``pixel_to_world`` / ``world_to_pixel``);
* ``zeropoint``: AB mag of 1 image unit for a point source, from ``meta.photometry``:
  ``-2.5 log10(C * A * 1e6 / 3631)`` with ``C`` = ``conversion_megajanskys`` (MJy/sr per
  DN/s; 1 for MJy/sr data) and ``A`` = ``pixel_area`` (sr). ``None`` when those are not
  filled in (e.g. ``romanisim`` without CRDS); then the zero point comes from stars
  (:func:`rtcnn.photometry.zeropoint_from_stars`) or the ``zeropoint`` argument.

Needs the ``roman`` extra (``pip install rtcnn[roman]``: roman_datamodels, asdf).
"""

from __future__ import annotations

import logging
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import AB_ZEROPOINT_JY, Image

log = logging.getLogger(__name__)

#: DQ flags (roman_datamodels.dqflags.pixel names) that make a pixel unusable.
DQ_BAD_FLAGS = ("DO_NOT_USE", "SATURATED", "DROPOUT", "OUTLIER", "NON_SCIENCE", "DEAD", "HOT",
                "REFERENCE_PIXEL")
MAX_PIX_ERROR = 0.01  # px, largest allowed error of the FITS-SIP fit to the gwcs
SIP_FIT_POINTS = 32  # grid points per axis for the SIP fit
SKY_SIGMA = 3.0  # sigma of the clipping of the sky estimate
WCS_MODES = ("fits", "gwcs")
_DETECTOR_RE = re.compile(r"^WFI(\d{2})$")


def _require_rdm():
    try:
        import roman_datamodels as rdm
    except ImportError:  # pragma: no cover - depends on the environment
        raise RtcnnInputError(None, "reading Roman ASDF files needs roman_datamodels "
                              "(pip install 'rtcnn[roman]')") from None
    return rdm


def dq_bad_mask(dq: np.ndarray, flags=DQ_BAD_FLAGS) -> np.ndarray:
    """True where any of the named ``roman_datamodels.dqflags.pixel`` flags is set."""
    from roman_datamodels import dqflags

    bits = 0
    for name in flags:
        try:
            bits |= int(dqflags.pixel[name])
        except KeyError:
            raise RtcnnInputError(None, f"unknown Roman DQ flag {name!r}") from None
    return (np.asarray(dq).astype(np.uint64) & np.uint64(bits)) != 0


def fit_sip(gwcs_obj, shape: tuple[int, int], max_pix_error: float = MAX_PIX_ERROR):
    """Astropy TAN-SIP WCS fitted to a gwcs over an image of ``shape`` (ny, nx).

    Returns
    -------
    (astropy.wcs.WCS, float)
        The WCS and its largest forward error in px, measured on a 16 x 16 grid against
        the gwcs (converted to px through the local pixel scale).
    """
    from astropy.wcs import WCS, FITSFixedWarning

    ny, nx = shape
    box = ((-0.5, nx - 0.5), (-0.5, ny - 0.5))
    hdr = gwcs_obj.to_fits_sip(bounding_box=box, max_pix_error=max_pix_error,
                               max_inv_pix_error=max_pix_error, npoints=SIP_FIT_POINTS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(hdr)
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 16), np.linspace(0, ny - 1, 16))
    ra, dec = gwcs_obj(gx.ravel(), gy.ravel())
    ra2, dec2 = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
    scale = math.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))  # deg/px
    err = np.hypot((ra - ra2) * np.cos(np.radians(dec)), dec - dec2) / scale
    return wcs, float(np.max(err))


def read_asdf_image(path: str | os.PathLike, dq_flags=DQ_BAD_FLAGS, wcs: str = "fits",
                    subtract_sky: bool = True, zeropoint: float | None = None,
                    max_pix_error: float = MAX_PIX_ERROR) -> Image:
    """Read a Roman Level-2 ASDF image (see the module docstring).

    Parameters
    ----------
    path : str or path-like
        ``*.asdf`` file holding a Level-2 ``ImageModel``.
    dq_flags : sequence of str
        DQ flag names that mask a pixel.
    wcs : {'fits', 'gwcs'}
        TAN-SIP approximation (default) or the native gwcs.
    subtract_sky : bool
        Subtract the sigma-clipped median of the good pixels (skipped when
        ``meta.background.subtracted`` is true).
    zeropoint : float, optional
        AB mag of 1 image unit, overriding ``meta.photometry``.
    max_pix_error : float
        Largest accepted error of the SIP fit, px.

    Returns
    -------
    Image
        ``data`` (ny, nx) float32, ``mask``, ``wcs``, ``zeropoint`` (or None), ``unit``
        ('DN/s' or 'MJy/sr'), ``header`` (WCS, BUNIT, BAND, EXPTIME, MAGZP, SKYLEVEL, SCA,
        MJD-OBS, WCSERR), ``band`` (``meta.instrument.optical_element``), ``exptime`` (s).

    Raises
    ------
    RtcnnInputError
        Missing / unreadable file, not a 2-D image model, no WCS, a SIP fit worse than
        ``max_pix_error``, unknown ``wcs`` mode.
    """
    p = Path(path)
    if wcs not in WCS_MODES:
        raise RtcnnInputError(p, f"wcs must be one of {', '.join(WCS_MODES)}, got {wcs!r}")
    if not p.is_file():
        raise RtcnnInputError(p, "file not found")
    rdm = _require_rdm()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = rdm.open(p)
    except Exception as err:  # asdf / roman_datamodels raise many kinds
        raise RtcnnInputError(p, f"cannot be read as a Roman datamodel ({err})") from None
    with model:
        if not hasattr(model, "data") or np.ndim(model.data) != 2:
            raise RtcnnInputError(p, f"is a {type(model).__name__}, not a 2-D Level-2 image")
        data = np.array(model.data, dtype=np.float32)
        dq = np.asarray(model.dq) if getattr(model, "dq", None) is not None else None
        meta = model.meta
        gw = meta.get("wcs") if hasattr(meta, "get") else getattr(meta, "wcs", None)
        if gw is None:
            raise RtcnnInputError(p, "meta.wcs is missing (run assign_wcs first)")
        flux_done = str(_get(meta, "cal_step", "flux", default="")).upper() == "COMPLETE"
        unit = "MJy/sr" if flux_done else "DN/s"
        conv = 1.0 if flux_done else _num(_get(meta, "photometry", "conversion_megajanskys"))
        area = _num(_get(meta, "photometry", "pixel_area"))
        band = str(_get(meta, "instrument", "optical_element", default="")).strip() or None
        exptime = _num(_get(meta, "exposure", "exposure_time"))
        start, end = _get(meta, "exposure", "start_time"), _get(meta, "exposure", "end_time")
        mjd = 0.5 * (start.mjd + end.mjd) if start is not None and end is not None else None
        det = _DETECTOR_RE.match(str(_get(meta, "instrument", "detector", default="")))
        sky_done = bool(_get(meta, "background", "subtracted", default=False))

    bad = ~np.isfinite(data)
    if dq is not None:
        bad |= dq_bad_mask(dq, dq_flags)
    if bad.all():
        raise RtcnnInputError(p, "every pixel is flagged bad (DQ) or not finite")
    sky = 0.0
    if subtract_sky and not sky_done:
        from astropy.stats import sigma_clipped_stats

        sky = float(sigma_clipped_stats(data[~bad], sigma=SKY_SIGMA, maxiters=10)[1])
        data -= np.float32(sky)

    zp_source = "given"
    if zeropoint is None:
        zp_source = None
        if conv and area and conv > 0 and area > 0:
            zeropoint = -2.5 * math.log10(conv * area * 1e6 / AB_ZEROPOINT_JY)
            zp_source = "meta.photometry"
        else:
            log.warning("%s: meta.photometry has no usable conversion (%s, %s); "
                        "no zero point", p, conv, area)

    if wcs == "fits":
        try:
            wcs_obj, wcs_err = fit_sip(gw, data.shape, max_pix_error)
        except Exception as err:  # gwcs raises many kinds when the fit fails
            raise RtcnnInputError(p, f"cannot fit a FITS-SIP WCS to meta.wcs ({err})") from None
        if wcs_err > max_pix_error:
            raise RtcnnInputError(p, f"the FITS-SIP fit to meta.wcs is off by {wcs_err:.3g} "
                                  f"px (> {max_pix_error}); use wcs='gwcs'")
        header = wcs_obj.to_header(relax=True)
    else:
        wcs_obj, wcs_err, header = gw, 0.0, fits.Header()
    header["BUNIT"] = unit
    if band:
        header["BAND"] = band
    if exptime:
        header["EXPTIME"] = (exptime, "s")
    if zeropoint is not None:
        header["MAGZP"] = (zeropoint, f"AB mag of 1 {unit}")
    header["SKYLEVEL"] = (sky, f"{unit} subtracted (sigma-clipped median)")
    if det:
        header["SCA"] = int(det.group(1))
    if mjd is not None:
        header["MJD-OBS"] = mjd
    header["WCSERR"] = (wcs_err, "px, max error of the SIP fit to the gwcs")
    header["ORIGFILE"] = p.name
    return Image(data=data, mask=bad if bad.any() else None, wcs=wcs_obj,
                 zeropoint=zeropoint, unit=unit, header=header, path=p, band=band,
                 exptime=exptime, hdu=0, zeropoint_source=zp_source)


def _get(meta, *keys, default=None):
    node = meta
    for k in keys:
        try:
            node = node[k]
        except (KeyError, TypeError, AttributeError):
            node = getattr(node, k, None)
        if node is None:
            return default
    return node


def _num(value) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def write_asdf_pair(ref: str | os.PathLike, new: str | os.PathLike, outdir: str | os.PathLike,
                    truth: str | os.PathLike | None = None, method: str = "adaptive",
                    zeropoint: float | None = None) -> Path:
    """Write two Level-2 ASDF images as a pair directory (``ref.fits``, ``new.fits``).

    Both are read with :func:`read_asdf_image` (FITS-SIP WCS); the reference is resampled
    onto the new image's grid when the grids differ
    (:func:`rtcnn.io.openuniverse.pair_images`). A truth catalog, if given, is
    copied as ``truth.ecsv`` (read with :func:`rtcnn.io.read_truth`, so RA/Dec-only
    catalogs get 0-based ``x, y`` on the new image). The files are written together
    (:func:`rtcnn.io.pairdir.write_pair`, replacing those of an existing directory); the
    directory then reads like a simulated pair (``data=fits data.root=...``).

    Returns
    -------
    pathlib.Path
        ``outdir``.
    """
    from rtcnn.io.catalogs import read_truth
    from rtcnn.io.openuniverse.prepare import pair_images
    from rtcnn.io.pairdir import TRUTH_NAME, write_pair

    new_img = read_asdf_image(new, zeropoint=zeropoint)
    ref_img = read_asdf_image(ref, zeropoint=zeropoint)
    if ref_img.unit != new_img.unit:
        raise RtcnnInputError(new, f"unit {new_img.unit} differs from the reference's "
                              f"{ref_img.unit} ({ref})")
    files, _ = pair_images(ref_img, new_img, method, SIMMODE="roman-asdf")
    if truth is not None:
        table = read_truth(truth, image=new_img)
        table.meta["pixel_origin"] = 0
        files[TRUTH_NAME] = table
    return write_pair(outdir, files, overwrite=True)


__all__ = [
    "DQ_BAD_FLAGS",
    "MAX_PIX_ERROR",
    "SIP_FIT_POINTS",
    "SKY_SIGMA",
    "WCS_MODES",
    "dq_bad_mask",
    "fit_sip",
    "read_asdf_image",
    "write_asdf_pair",
]
