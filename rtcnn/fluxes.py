"""Measured sources: PSF and aperture fluxes in nJy with errors, S/N, position errors, flags.

Temporary home (issue 17, point 1): these functions belong in :mod:`rtcnn.measure` once the
detection path is restructured; nothing else lives here.

Given a candidate catalog (``x``, ``y``, ``brightened``, ``score``; :mod:`rtcnn.catalog`) and
the pair's pixels, :func:`add_measurements` adds these columns:

=============== ====== =====================================================================
column          unit   meaning
=============== ====== =====================================================================
psf_flux        nJy    PSF flux on the difference image (signed: negative = fainter in the
                       new image): weighted fit of the Roman effective PSF of the band
                       (:func:`effective_psf`) + a constant, the position free within
                       :data:`PSF_MAX_SHIFT` px of ``(x, y)`` (:func:`measure_psf`; the
                       aperture flux is measured where it lands)
psf_flux_err    nJy    its 1-sigma error from the noise model (:func:`pixel_variance`)
ap_flux         nJy    aperture flux (radius :data:`AP_RADIUS` px, annulus background,
                       :func:`rtcnn.photometry.aperture_flux`), aperture-corrected to total
ap_flux_err     nJy    its 1-sigma error (annulus noise + both images' source Poisson noise)
snr                    ``|psf_flux| / psf_flux_err``
x_err, y_err    pix    position errors of that fit (inverse Fisher matrix of x, y, flux, const)
ra_err          deg    error of ``ra * cos(dec)`` (as LSST's ``raErr``), from x_err/y_err
                       through the local WCS Jacobian
dec_err         deg    error of ``dec``
is_negative            True where the source faded (``not brightened``)
flags                  bit mask, :data:`FLAG_BITS` (below)
reliability            the network score (``score``), 0-1; see the model card on calibration
=============== ====== =====================================================================

Flag bits (``flags & FLAG_BITS[name]``; one table, used by the alerts and the vetting page):

=========== ===== =========================================================================
name        value set when
=========== ===== =========================================================================
edge        1     the measurement footprint (the background annulus, :data:`EDGE_DISTANCE`
                  px) runs off the image
masked      2     a masked (NaN/inf) pixel in either image, or a pixel without reference
                  data (reference exactly 0), within :data:`FLAG_HALF` px of the centre
saturated   4     a pixel within :data:`FLAG_HALF` px at or above the image's saturation
                  level (header ``SATURATE``/``SATLEVEL`` in image units; never set when
                  the header names none)
bright_star 8     the reference's brightest pixel within :data:`BRIGHT_RADIUS` px is so bright
                  that its subtraction residual (:data:`RESIDUAL_FRACTION` of it) exceeds
                  :data:`BRIGHT_RESIDUAL_SNR` x the difference-image noise
cosmic_ray  16    cosmic-ray-like: the difference's centre pixel exceeds :data:`SHARP_MIN_SNR`
                  sigma and holds more than :data:`SHARP_MAX` of the 3x3 flux (of its sign;
                  the Roman PSF puts at most ~0.66 there)
=========== ===== =========================================================================

Units: images in e-/s with an AB zero point ``zp`` (``m = -2.5 log10(F) + zp``); 1 nJy is AB
31.4, so one image unit is ``10**(-0.4 (zp - 31.4))`` nJy (:func:`njy_per_unit`).
Positions follow :mod:`rtcnn` (0-based, integer = pixel centre, arrays ``[y, x]``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping

import astropy.units as u
import numpy as np
from scipy import ndimage

from rtcnn import roman
from rtcnn.difference import RESIDUAL_FRACTION, noise_variance
from rtcnn.photometry import aperture_correction, aperture_flux
from rtcnn.tiles import stamp_index

__all__ = [
    "AB_MAG_NJY", "FLAG_BITS", "MEASURED_COLUMNS", "add_measurements", "aperture_photometry",
    "aperture_source_variance",
    "decode_flags", "effective_psf", "header_psf", "measure_psf", "njy_per_unit", "pixel_variance",
    "psf_photometry",
    "sky_errors", "source_flags",
]

AB_MAG_NJY = 31.4  # AB magnitude of 1 nJy: -2.5 log10(1e-9 Jy / 3631 Jy)
PSF_HALF = 3  # px, the forced PSF fit uses the 7x7 pixels around the source
AP_RADIUS = 3.0  # px, aperture radius (rtcnn.photometry.DEFAULT_R_AP; ~2.2 FWHM in H158)
EDGE_DISTANCE = 12.0  # px, outer radius of the background annulus: closer to an edge = edge
FLAG_HALF = 2  # px, masked/saturated pixels are looked for in the 5x5 around the centre
BRIGHT_RADIUS = 6  # px, half-width of the box searched for a bright reference source
BRIGHT_RESIDUAL_SNR = 3.0  # residual / difference noise above which the flag is set
SHARP_MAX = 0.8  # centre-pixel share of the 3x3 flux above which a peak is cosmic-ray-like
SHARP_MIN_SNR = 3.0  # the centre pixel must exceed this many sigma for the cosmic-ray test
PSF_ITERATIONS = 6  # Gauss-Newton steps of the PSF fit
PSF_MAX_SHIFT = 1.5  # px, a PSF fit further than this from the catalog position is not used
PSF_OVERSAMPLE = 4  # samples per px of the PSF table (8: 13x slower to draw, values within 4e-4)
PSF_BOX = 63  # px, side of the stamp the effective PSF is drawn (and normalised) in
SATURATION_KEYWORDS = ("SATURATE", "SATLEVEL")

FLAG_BITS = {"edge": 1, "masked": 2, "saturated": 4, "bright_star": 8, "cosmic_ray": 16}

MEASURED_COLUMNS = {  # name -> (unit, description)
    "psf_flux": (u.nJy, "PSF-fit flux on the difference image (signed)"),
    "psf_flux_err": (u.nJy, "1-sigma error of psf_flux"),
    "ap_flux": (u.nJy, f"aperture flux (r = {AP_RADIUS:g} px), aperture-corrected to total"),
    "ap_flux_err": (u.nJy, "1-sigma error of ap_flux"),
    "snr": (None, "|psf_flux| / psf_flux_err"),
    "x_err": (u.pix, "1-sigma position error of the PSF fit along x"),
    "y_err": (u.pix, "1-sigma position error of the PSF fit along y"),
    "ra_err": (u.deg, "1-sigma error of ra * cos(dec)"),
    "dec_err": (u.deg, "1-sigma error of dec"),
    "is_negative": (None, "True where the source faded in the new image"),
    "flags": (None, "bit mask: " + ", ".join(f"{k}={v}" for k, v in FLAG_BITS.items())),
    "reliability": (None, "network score (0-1)"),
}


def njy_per_unit(zeropoint: float) -> float:
    """nJy of one image unit for an AB zero point ``zeropoint`` (mag of 1 unit)."""
    return 10.0 ** (-0.4 * (float(zeropoint) - AB_MAG_NJY))


def decode_flags(flags) -> dict[str, np.ndarray]:
    """``{name: bool array}`` of a ``flags`` column (:data:`FLAG_BITS`)."""
    f = np.asarray(flags, dtype=np.int64)
    return {name: (f & bit) != 0 for name, bit in FLAG_BITS.items()}


def pixel_variance(ref: np.ndarray, new: np.ndarray, sigma_bkg: float,
                   exptime: tuple[float | None, float | None] = (None, None),
                   residual_fraction: float = RESIDUAL_FRACTION) -> np.ndarray:
    """Per-pixel variance of ``new - ref`` (e-/s)^2, the noise model of the fluxes.

    :func:`rtcnn.difference.noise_variance` without its residual term (background plus
    both images' source Poisson noise), plus a subtraction-residual floor
    ``(residual_fraction |ref|)**2`` on the *reference* only: residuals come from
    subtracting what both images hold, so a change on empty sky has none. (The detector's
    position refit uses ``max(|ref|, |new|)``, a looser floor; with it the flux errors of
    transients came out ~10 % too large in the injection test.)

    Parameters
    ----------
    ref, new : array, any shape, float
        Pixels (e-/s) of the aligned reference and the new image.
    sigma_bkg : float
        Background noise per pixel of the difference, e-/s.
    exptime : (t_ref, t_new)
        Exposure times in s.

    Returns
    -------
    float64 array of the inputs' shape.
    """
    r = np.asarray(ref, dtype=np.float64)
    var = noise_variance(r, np.asarray(new, dtype=np.float64), sigma_bkg, exptime,
                         residual_fraction=0.0)  # fmt: skip
    if residual_fraction:
        var += (residual_fraction * r) ** 2
    return var


@functools.lru_cache(maxsize=32)
def effective_psf(band: str | None, sca: int = 7, position: tuple[float, float] | None = None,
                  defocus: float = 0.0, jitter: float = 0.0) -> np.ndarray:
    """The Roman effective PSF (optical x pixel) of ``band`` tabulated every 1/4 px.

    :func:`rtcnn.roman.get_psf` at ``sca`` and ``position`` (GalSim 1-based SCA px; default
    the centre) with extra ``defocus`` (waves), convolved with a Gaussian pointing jitter of
    sigma ``jitter`` (mas) and the pixel, drawn in a :data:`PSF_BOX` px square and
    normalised to unit flux inside it (as :mod:`rtcnn.sim` normalises its PSF), so a fit of
    it measures the flux inside that box. Cached.

    Returns
    -------
    (M, M) float64, ``M = PSF_BOX * PSF_OVERSAMPLE``, centred at ``(M - 1) / 2``; a value
    is the fraction of the flux that falls in a native pixel centred there.
    """
    import galsim

    psf = roman.get_psf(roman.canonical_band(band), int(sca), position, float(defocus))
    if jitter > 0:
        psf = galsim.Convolve(psf, galsim.Gaussian(sigma=float(jitter) * 1e-3))
    eff = galsim.Convolve(psf, galsim.Pixel(roman.PIXEL_SCALE))
    n = PSF_BOX * PSF_OVERSAMPLE
    img = eff.drawImage(nx=n, ny=n, scale=roman.PIXEL_SCALE / PSF_OVERSAMPLE, method="no_pixel")
    arr = img.array.astype(np.float64)
    return arr * PSF_OVERSAMPLE**2 / arr.sum()


def header_psf(band: str | None, header: Mapping | None) -> tuple[np.ndarray, float, str]:
    """The PSF table, its aperture correction and a description for an image header.

    The header's SCA (:func:`header_sca`) and, when present, the PSF cards ``rtcnn.sim``
    writes (``PSFSCAX``/``PSFSCAY`` position, ``PSFDEFOC`` defocus, ``PSFJITT`` jitter);
    other images get the SCA-centre optics. The aperture correction (``total / aperture``
    flux at :data:`AP_RADIUS` px, :func:`rtcnn.photometry.aperture_correction`) is measured
    on the same PSF, sampled at native pixels, with total = the flux in :data:`PSF_BOX`.
    """
    h = header or {}
    sca = header_sca(h)

    def card(key, default=0.0):
        try:
            return float(h.get(key, default))
        except (TypeError, ValueError):
            return default

    pos = (card("PSFSCAX"), card("PSFSCAY")) if "PSFSCAX" in h and "PSFSCAY" in h else None
    defocus, jitter = card("PSFDEFOC"), card("PSFJITT")
    epsf = effective_psf(band, sca, pos, defocus, jitter)
    apcorr = _psf_aperture_correction(band, sca, pos, defocus, jitter)
    what = (f"Roman effective PSF, {roman.canonical_band(band)}, SCA {sca}"
            + (f" at {pos[0]:g},{pos[1]:g}" if pos else "")
            + (f", defocus {defocus:g} waves" if defocus else "")
            + (f", jitter {jitter:g} mas" if jitter else ""))  # fmt: skip
    return epsf, apcorr, what


@functools.lru_cache(maxsize=32)
def _psf_aperture_correction(band, sca, pos, defocus, jitter) -> float:
    epsf = effective_psf(band, sca, pos, defocus, jitter)
    half = PSF_BOX // 2
    native = _psf_values(epsf, np.zeros(1), np.zeros(1), half)[0]  # centred, native pixels
    return float(aperture_correction(AP_RADIUS, native, total=1.0).factor)


def _psf_values(epsf: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                half: int = PSF_HALF) -> np.ndarray:
    """Pixel values ``(N, S, S)`` of the unit-flux PSF at offsets ``(dx, dy)`` from the
    stamp centres (``S = 2 half + 1``; cubic interpolation of the table)."""
    centre = (epsf.shape[0] - 1) / 2.0
    off = np.arange(-half, half + 1, dtype=np.float64)
    cols = centre + (off[None, None, :] - dx[:, None, None]) * PSF_OVERSAMPLE
    rows = centre + (off[None, :, None] - dy[:, None, None]) * PSF_OVERSAMPLE
    rows, cols = np.broadcast_arrays(rows, cols)
    return ndimage.map_coordinates(epsf, [rows.ravel(), cols.ravel()], order=3,
                                   mode="constant").reshape(rows.shape)  # fmt: skip


def psf_photometry(diff: np.ndarray, var: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                   epsf: np.ndarray, free: bool = True,
                   iterations: int = PSF_ITERATIONS) -> dict[str, np.ndarray]:
    """PSF photometry of many sources at once: weighted fit of ``F * psf(dx, dy) + b``.

    Weighted (``1 / var``) least squares on each ``(S, S)`` stamp; pixels off the image or
    with infinite variance get no weight. With ``free`` the offsets ``(dx, dy)`` are fitted
    too (Gauss-Newton from the given ones, steps clipped to 0.5 px); otherwise the flux and
    constant are a linear fit at the given offsets (forced photometry). The errors are the
    inverse Fisher matrix of ``(dx, dy, F, b)`` at the solution (PSF derivatives by central
    differences of the table).

    Parameters
    ----------
    diff, var : (N, S, S) float
        Difference-image and variance stamps (e-/s, (e-/s)^2).
    dx, dy : (N,) float
        Source position relative to each stamp's centre pixel, px.
    epsf : (M, M) float
        :func:`effective_psf`.
    free : bool
        Fit the position (True) or keep it (False).
    iterations : int
        Gauss-Newton steps when ``free``.

    Returns
    -------
    dict of (N,) arrays
        ``dx``, ``dy`` (px, fitted or given), ``flux``, ``flux_err`` (image units),
        ``x_err``, ``y_err`` (px), ``chi2`` (reduced) and ``ndata`` (pixels used).
    """
    n = len(dx)
    dx = np.array(dx, np.float64)
    dy = np.array(dy, np.float64)
    w = np.where(np.isfinite(var) & (var > 0), 1.0 / np.where(var > 0, var, 1.0), 0.0)
    d = np.where(w > 0, diff, 0.0).reshape(n, -1)
    wf = w.reshape(n, 1, -1)
    h = 0.05  # px, central-difference step of the PSF derivatives

    def linear(dx, dy):
        p = _psf_values(epsf, dx, dy).reshape(n, -1)
        A = np.stack([p, np.ones_like(p)], axis=-1)
        AtW = A.transpose(0, 2, 1) * wf
        cov = np.linalg.inv(AtW @ A + 1e-12 * np.eye(2))
        return (cov @ (AtW @ d[..., None]))[..., 0], cov

    def jacobian(dx, dy, flux):
        p = _psf_values(epsf, dx, dy).reshape(n, -1)
        px = ((_psf_values(epsf, dx + h, dy) - _psf_values(epsf, dx - h, dy)) / (2 * h)).reshape(n, -1)
        py = ((_psf_values(epsf, dx, dy + h) - _psf_values(epsf, dx, dy - h)) / (2 * h)).reshape(n, -1)
        F = flux[:, None]
        return p, np.stack([F * px, F * py, p, np.ones_like(p)], axis=-1)

    params, cov2 = linear(dx, dy)
    flux, bkg = params[:, 0], params[:, 1]
    for _ in range(iterations if free else 0):
        p, J = jacobian(dx, dy, flux)
        r = d - flux[:, None] * p - bkg[:, None]
        JtW = J.transpose(0, 2, 1) * wf
        step = np.linalg.solve(JtW @ J + 1e-9 * np.eye(4), (JtW @ r[..., None]))[..., 0]
        step[:, :2] = np.clip(np.nan_to_num(step[:, :2]), -0.5, 0.5)
        dx, dy = dx + step[:, 0], dy + step[:, 1]
        flux, bkg = flux + step[:, 2], bkg + step[:, 3]
    p, J = jacobian(dx, dy, flux)
    if free:  # the flux error at the fitted position, as for a fit of flux + constant there
        cov2 = linear(dx, dy)[1]
    with np.errstate(invalid="ignore"):
        cov4 = np.linalg.inv((J.transpose(0, 2, 1) * wf) @ J + 1e-12 * np.eye(4))
        ferr = np.sqrt(np.clip(cov2[:, 0, 0], 0.0, None))
        ndata = (w > 0).reshape(n, -1).sum(axis=1)
        chi2 = (((d - flux[:, None] * p - bkg[:, None]) ** 2) * w.reshape(n, -1)).sum(axis=1)
        return {"dx": dx, "dy": dy, "flux": flux, "flux_err": ferr,
                "x_err": np.sqrt(np.clip(cov4[:, 0, 0], 0.0, None)),
                "y_err": np.sqrt(np.clip(cov4[:, 1, 1], 0.0, None)),
                "chi2": chi2 / np.maximum(ndata - (4 if free else 2), 1), "ndata": ndata}


def _difference_stamps(ref, new, mask, ix, iy, sigma_diff, exptime):
    """Difference and variance stamps ``(N, S, S)`` around pixels, and the ref/new stamps."""
    rows, cols, inside = stamp_index(new.shape, ix, iy, PSF_HALF)
    r = np.asarray(ref[rows, cols], np.float64)
    s = np.asarray(new[rows, cols], np.float64)
    var = pixel_variance(r, s, sigma_diff, exptime)
    bad = ~inside | ~np.isfinite(r) | ~np.isfinite(s)
    if mask is not None:
        bad |= mask[rows, cols]
    return np.where(bad, 0.0, s - r), np.where(bad, np.inf, var), r, s


def measure_psf(ref, new, x, y, *, sigma_diff: float, epsf: np.ndarray,
                exptime=(None, None), mask=None) -> dict[str, np.ndarray]:
    """PSF fluxes and position errors of sources near ``(x, y)`` (:func:`psf_photometry`).

    The position is fitted from ``(x, y)`` on the ``(2 PSF_HALF + 1)^2`` stamp around it,
    then once more on the stamp around the fitted pixel (so a detection up to
    :data:`PSF_MAX_SHIFT` px off still has the source in the middle of its stamp). Where
    the fit fails or moves further than :data:`PSF_MAX_SHIFT`, the flux is the forced fit
    at ``(x, y)`` (``fitted`` False).

    Returns
    -------
    dict of (N,) arrays
        ``x``, ``y`` (px, where the flux was measured), ``flux``, ``flux_err``,
        ``x_err``, ``y_err``, ``chi2``, ``ndata`` and ``fitted`` (bool).
    """
    ny, nx = new.shape
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    fx, fy = x.copy(), y.copy()
    for _ in range(2):
        ix = np.clip(np.rint(fx).astype(np.int64), 0, nx - 1)
        iy = np.clip(np.rint(fy).astype(np.int64), 0, ny - 1)
        d, v, _, _ = _difference_stamps(ref, new, mask, ix, iy, sigma_diff, exptime)
        fit = psf_photometry(d, v, fx - ix, fy - iy, epsf, free=True)
        fx, fy = ix + fit["dx"], iy + fit["dy"]
    ok = (np.hypot(fx - x, fy - y) <= PSF_MAX_SHIFT) & np.isfinite(fit["flux"]) & (
        fit["flux_err"] > 0)
    if not ok.all():
        bad = ~ok
        ix = np.clip(np.rint(x[bad]).astype(np.int64), 0, nx - 1)
        iy = np.clip(np.rint(y[bad]).astype(np.int64), 0, ny - 1)
        d, v, _, _ = _difference_stamps(ref, new, mask, ix, iy, sigma_diff, exptime)
        forced = psf_photometry(d, v, x[bad] - ix, y[bad] - iy, epsf, free=False)
        for key in ("flux", "flux_err", "x_err", "y_err", "chi2", "ndata"):
            fit[key] = np.asarray(fit[key], np.float64)
            fit[key][bad] = forced[key]
        fx, fy = np.where(ok, fx, x), np.where(ok, fy, y)
    return {"x": fx, "y": fy, "flux": fit["flux"], "flux_err": fit["flux_err"],
            "x_err": fit["x_err"], "y_err": fit["y_err"], "chi2": fit["chi2"],
            "ndata": fit["ndata"], "fitted": ok}  # fmt: skip


def aperture_photometry(diff: np.ndarray, x, y, mask: np.ndarray | None,
                        source_var: np.ndarray | None = None,
                        apcorr: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Aperture flux of the difference image with its error, aperture-corrected.

    :func:`rtcnn.photometry.aperture_flux` (radius :data:`AP_RADIUS`, local annulus
    background, its noise term from the annulus scatter) plus, in quadrature,
    ``source_var`` (the source Poisson noise of both images in the aperture,
    :func:`aperture_source_variance`), all times ``apcorr``.

    Returns
    -------
    flux, flux_err : (N,) float64, image units
    """
    xy = np.column_stack([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    ph = aperture_flux(diff, xy, r_ap=AP_RADIUS, mask=mask)
    var = np.asarray(ph["flux_err"], np.float64) ** 2
    if source_var is not None:
        var = var + source_var
    flux = np.asarray(ph["flux"], np.float64)
    return apcorr * flux, apcorr * np.sqrt(var)


def aperture_source_variance(ref_st: np.ndarray, new_st: np.ndarray, x, y,
                             exptime: tuple[float | None, float | None]) -> np.ndarray:
    """Source Poisson variance ``sum max(I, 0) / t`` of both images over the pixels whose
    centres lie within :data:`AP_RADIUS` of ``(x, y)``; stamps ``(N, S, S)`` centred on
    the rounded positions (``S >= 2 AP_RADIUS + 1``)."""
    half = ref_st.shape[1] // 2
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx = off[None, None, :] - (np.asarray(x, np.float64) - np.rint(x))[:, None, None]
    dy = off[None, :, None] - (np.asarray(y, np.float64) - np.rint(y))[:, None, None]
    inside = dx**2 + dy**2 <= AP_RADIUS**2
    var = np.zeros(len(ref_st))
    for st, t in ((ref_st, exptime[0]), (new_st, exptime[1])):
        if t:
            var += np.where(inside, np.clip(np.nan_to_num(st), 0.0, None), 0.0).sum(axis=(1, 2)) / t
    return var


def sky_errors(wcs, x, y, x_err, y_err) -> tuple[np.ndarray, np.ndarray]:
    """Errors of ``ra * cos(dec)`` and ``dec`` in deg from pixel errors (independent x, y),
    through the WCS's local Jacobian (central differences of half a pixel)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if len(x) == 0:
        return np.zeros(0), np.zeros(0)

    def radec(a, b):
        c = wcs.pixel_to_world(a, b)
        return c.spherical.lon.deg, c.spherical.lat.deg

    _, dec0 = radec(x, y)
    cosd = np.cos(np.radians(dec0))
    jac = []
    for ax, ay in ((0.5, 0.0), (0.0, 0.5)):
        r1, d1 = radec(x + ax, y + ay)
        r0, d0 = radec(x - ax, y - ay)
        dra = ((r1 - r0 + 180.0) % 360.0 - 180.0) * cosd
        jac.append((dra, d1 - d0))  # per px
    (ra_x, de_x), (ra_y, de_y) = jac
    sx2, sy2 = np.asarray(x_err) ** 2, np.asarray(y_err) ** 2
    return np.sqrt(ra_x**2 * sx2 + ra_y**2 * sy2), np.sqrt(de_x**2 * sx2 + de_y**2 * sy2)


def source_flags(ref: np.ndarray, new: np.ndarray, x, y, *, mask: np.ndarray | None = None,
                 sigma_diff: float, saturation: tuple[float | None, float | None] = (None, None)
                 ) -> np.ndarray:
    """The :data:`FLAG_BITS` mask of each position (see the module docstring's table).

    Parameters
    ----------
    ref, new : (ny, nx) float
        Aligned reference and new image (e-/s), bad pixels any value (``mask`` says).
    x, y : (N,) float
        Positions in px.
    mask : (ny, nx) bool, optional
        True = masked pixel in either image.
    sigma_diff : float
        Background noise per pixel of the difference image.
    saturation : (ref level, new level)
        Saturation levels in image units, None = unknown.

    Returns
    -------
    (N,) int64
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    ny, nx = ref.shape
    flags = np.zeros(len(x), np.int64)
    if len(x) == 0:
        return flags
    ix = np.clip(np.rint(x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.rint(y).astype(np.int64), 0, ny - 1)
    e = EDGE_DISTANCE
    edge = (x < e - 0.5) | (y < e - 0.5) | (x > nx - 0.5 - e) | (y > ny - 0.5 - e)
    flags |= np.where(edge, FLAG_BITS["edge"], 0)
    rows, cols, inside = stamp_index(ref.shape, ix, iy, FLAG_HALF)
    r = np.asarray(ref[rows, cols], np.float64)
    s = np.asarray(new[rows, cols], np.float64)
    bad = inside & ((r == 0.0) | ~np.isfinite(r) | ~np.isfinite(s))
    if mask is not None:
        bad |= inside & mask[rows, cols]
    flags |= np.where(bad.any(axis=(1, 2)), FLAG_BITS["masked"], 0)
    sat = np.zeros(len(x), bool)
    for st, level in ((r, saturation[0]), (s, saturation[1])):
        if level is not None and np.isfinite(level):
            sat |= (inside & (st >= level)).any(axis=(1, 2))
    flags |= np.where(sat, FLAG_BITS["saturated"], 0)
    rows, cols, inside = stamp_index(ref.shape, ix, iy, BRIGHT_RADIUS)
    rb = np.where(inside, np.nan_to_num(np.asarray(ref[rows, cols], np.float64)), 0.0)
    bright = RESIDUAL_FRACTION * rb.max(axis=(1, 2)) > BRIGHT_RESIDUAL_SNR * sigma_diff
    flags |= np.where(bright, FLAG_BITS["bright_star"], 0)
    d = np.nan_to_num(s - r)
    c = d[:, FLAG_HALF, FLAG_HALF]
    sign = np.where(c >= 0, 1.0, -1.0)[:, None, None]
    core = np.clip(sign * d[:, FLAG_HALF - 1:FLAG_HALF + 2, FLAG_HALF - 1:FLAG_HALF + 2], 0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = core[:, 1, 1] / core.sum(axis=(1, 2))
    sharp = (np.nan_to_num(share) > SHARP_MAX) & (np.abs(c) > SHARP_MIN_SNR * sigma_diff)
    flags |= np.where(sharp, FLAG_BITS["cosmic_ray"], 0)
    return flags


def saturation_level(header: Mapping | None) -> float | None:
    """Saturation level (image units) from ``SATURATE``/``SATLEVEL``, or None."""
    for key in SATURATION_KEYWORDS:
        try:
            value = float((header or {}).get(key))
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            return value
    return None


SCA_KEYWORDS = ("SCA", "SCA_NUM", "DETECTOR")  # header cards naming the Roman SCA


def header_sca(header: Mapping | None, default: int = 7) -> int:
    """Roman SCA (1-18) named by a header (:data:`SCA_KEYWORDS`; ``7`` and ``'WFI07'`` both
    read as 7), else ``default``."""
    for key in SCA_KEYWORDS:
        try:
            value = int(str((header or {}).get(key)).strip().upper().removeprefix("WFI"))
        except (TypeError, ValueError):
            continue
        if 1 <= value <= roman.N_SCA:
            return value
    return default


def add_measurements(table, ref: np.ndarray, new: np.ndarray, *, wcs, zeropoint: float | None,
                     band: str | None, sigma_diff: float,
                     exptime: tuple[float | None, float | None] = (None, None),
                     mask: np.ndarray | None = None, header: Mapping | None = None,
                     ref_header: Mapping | None = None) -> None:
    """Add the :data:`MEASURED_COLUMNS` to a candidate catalog, in place.

    Parameters
    ----------
    table : astropy.table.Table
        With ``x``, ``y`` (px), ``brightened`` and ``score``.
    ref, new : (ny, nx) float32
        Aligned reference and new image (e-/s), bad pixels 0 (``mask`` marks them).
    wcs : astropy.wcs.WCS
        Celestial WCS of the new image.
    zeropoint : float or None
        AB zero point of one image unit; None gives NaN fluxes in nJy (the table's
        ``flux_unit`` metadata then says so).
    band : str or None
        Roman band (either spelling) for the PSF and the aperture correction.
    sigma_diff : float
        Background noise per pixel of ``new - ref`` (e-/s).
    exptime : (t_ref, t_new)
        Exposure times in s (source Poisson noise).
    mask : (ny, nx) bool, optional
        Masked pixels of either image.
    header, ref_header : mapping, optional
        Headers of the new and reference images (SCA, saturation level).
    """
    t0 = time.perf_counter()
    n = len(table)
    x = np.asarray(table["x"], np.float64)
    y = np.asarray(table["y"], np.float64)
    ny, nx = new.shape
    if n:
        epsf, apcorr, psf_model = header_psf(band, header)
        psf = measure_psf(ref, new, x, y, sigma_diff=sigma_diff, epsf=epsf, exptime=exptime,
                          mask=mask)  # fmt: skip
        px, py = psf["x"], psf["y"]  # the aperture goes where the PSF fit found the source
        diff = np.subtract(new, ref, dtype=np.float32)
        pix, piy = (np.clip(np.rint(a).astype(np.int64), 0, m - 1) for a, m in ((px, nx), (py, ny)))
        _, _, r, s = _difference_stamps(ref, new, mask, pix, piy, sigma_diff, exptime)
        pois = aperture_source_variance(r, s, px, py, exptime)
        ap, ap_err = aperture_photometry(diff, px, py, mask, pois, apcorr)
        ra_err, dec_err = sky_errors(wcs, x, y, psf["x_err"], psf["y_err"])
    else:
        z = np.zeros(0)
        psf = {"flux": z, "flux_err": z, "x_err": z, "y_err": z}
        ap = ap_err = ra_err = dec_err = z
    scale = njy_per_unit(zeropoint) if zeropoint is not None else np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.abs(psf["flux"]) / psf["flux_err"]
    values = {
        "psf_flux": psf["flux"] * scale, "psf_flux_err": psf["flux_err"] * scale,
        "ap_flux": ap * scale, "ap_flux_err": ap_err * scale,
        "snr": np.nan_to_num(snr), "x_err": psf["x_err"], "y_err": psf["y_err"],
        "ra_err": ra_err, "dec_err": dec_err,
        "is_negative": ~np.asarray(table["brightened"], bool),
        "flags": source_flags(ref, new, x, y, mask=mask, sigma_diff=sigma_diff,
                              saturation=(saturation_level(ref_header),
                                          saturation_level(header))),
        "reliability": np.asarray(table["score"], np.float64),
    }  # fmt: skip
    for name, (unit, description) in MEASURED_COLUMNS.items():
        table[name] = values[name]
        table[name].unit = unit
        table[name].description = description
    table.meta["flags"] = dict(FLAG_BITS)
    table.meta["seconds_measure"] = round(time.perf_counter() - t0, 3)
    if n:
        table.meta["psf_model"] = psf_model
    if zeropoint is None:
        table.meta["flux_unit"] = "no zero point: fluxes in nJy are NaN"
