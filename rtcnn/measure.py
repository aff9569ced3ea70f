"""Measurement of detected changes on the difference image: PSF fit, shape, dmag (numpy/scipy).

The stage after :mod:`rtcnn.postprocess` and before :mod:`rtcnn.catalog`, shared by the
detector (:mod:`rtcnn.pipeline`) and the classical baseline (:mod:`rtcnn.baseline`):

* :func:`fit_psf` — weighted least-squares fit of position, flux and a constant on a
  small stamp around many peaks at once (vectorised Gauss-Newton; photutils' per-source
  fitters take milliseconds per source and a full SCA has thousands of candidates). The
  PSF model is the pixel-integrated Gaussian of :func:`rtcnn.difference.psf_sigma`.
* :func:`shape_moments` — Gaussian-weighted second moments (size, ellipticity), the
  classical cosmic-ray / artefact test.
* :func:`psf_refine` — the detector's positions refined by that fit where it is bright
  enough, with the weights of :func:`rtcnn.difference.noise_variance`.
* :func:`photometric_dmag` — ``|m_ref - m_new|`` by aperture photometry of both images
  (:func:`rtcnn.photometry.magdiff`, paper eq. 1-2), the data layer's definition of dmag.
* :class:`Measurement` — the per-detection measurements of the detector in one call.

Positions follow the package convention (:mod:`rtcnn`): 0-based, integer = pixel
centre, arrays ``[y, x]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from rtcnn.difference import Difference, noise_variance, psf_sigma
from rtcnn.postprocess import Sources, drop_masked
from rtcnn.tiles import stamp_index

__all__ = [
    "DEFAULT_MODEL_ERROR",
    "DMAG_SOURCES",
    "FIT_HALF",
    "Measurement",
    "fit_psf",
    "photometric_dmag",
    "psf_refine",
    "shape_moments",
    "stamps",
]

DEFAULT_MODEL_ERROR = 0.15  # PSF-model error (Gaussian vs Roman PSF) as a fraction of the peak
MOMENT_SIGMA = 1.0  # px, Gaussian weight of the shape moments
FIT_HALF = 2  # px, the PSF fit uses a (2 FIT_HALF + 1)^2 stamp
FIT_ITERATIONS = 8  # Gauss-Newton iterations of the PSF fit
FIT_MAX_SHIFT = 1.5  # px, a fit moving further than this from its peak pixel is rejected
REFINE_MAX_SHIFT = 1.0  # px, a PSF fit further than this from the network's position is unused
REFINE_MIN_SNR = 5.0  # PSF-fit S/N below which the network's position is kept (it is better)
WIDE_FIT_HALF = 5  # px, stamp half-width of the refit of bright detections (11x11)
WIDE_FIT_SNR = 20.0  # |S/N| of the first fit above which the wide refit is used
DMAG_SOURCES = ("photometry", "network")  # where the detector's catalog dmag comes from


# --------------------------------------------------------------------------- PSF fit
def stamps(arr: np.ndarray, ix: np.ndarray, iy: np.ndarray, half: int, fill: float) -> np.ndarray:
    """``(N, 2 half + 1, 2 half + 1)`` float64 stamps centred on pixels ``(ix, iy)``;
    ``fill`` beyond the image edge (no padded copy of the image)."""
    rows, cols, inside = stamp_index(arr.shape, ix, iy, half)
    return np.where(inside, np.asarray(arr[rows, cols], dtype=np.float64), fill)


def shape_moments(
    diff: np.ndarray, x: np.ndarray, y: np.ndarray, sign: np.ndarray,
    half: int = FIT_HALF, weight_sigma: float = MOMENT_SIGMA,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted second moments of each candidate (the classical shape test).

    On the ``(2 half + 1)^2`` stamp around ``(x, y)``, with the data multiplied by
    ``sign`` (so a fading source is positive) and clipped at 0, weights
    ``exp(-r^2 / 2 weight_sigma^2)`` about ``(x, y)``:
    ``size = Ixx + Iyy`` (px^2) and ``ellipticity = sqrt((Ixx - Iyy)^2 + 4 Ixy^2) / size``.
    A point source has the PSF's size and ellipticity near 0; a cosmic ray is smaller
    (a sharp hit) or elongated (a track).

    Returns
    -------
    size, ellipticity : (N,) float64
        NaN where the stamp has no positive flux.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ny, nx = diff.shape
    ix = np.clip(np.round(x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.round(y).astype(np.int64), 0, ny - 1)
    st = stamps(diff, ix, iy, half, 0.0) * np.asarray(sign, dtype=np.float64)[:, None, None]
    off = np.arange(-half, half + 1, dtype=np.float64)
    dx = off[None, None, :] - (x - ix)[:, None, None]
    dy = off[None, :, None] - (y - iy)[:, None, None]
    w = np.exp(-(dx**2 + dy**2) / (2.0 * weight_sigma**2)) * np.clip(st, 0.0, None)
    with np.errstate(invalid="ignore", divide="ignore"):
        tot = w.sum(axis=(1, 2))
        ixx = (w * dx * dx).sum(axis=(1, 2)) / tot
        iyy = (w * dy * dy).sum(axis=(1, 2)) / tot
        ixy = (w * dx * dy).sum(axis=(1, 2)) / tot
        size = ixx + iyy
        ellip = np.sqrt((ixx - iyy) ** 2 + 4.0 * ixy**2) / size
    return size, ellip


def fit_psf(
    diff: np.ndarray,
    var: np.ndarray,
    ix: np.ndarray,
    iy: np.ndarray,
    sigma: float,
    half: int = FIT_HALF,
    iterations: int = FIT_ITERATIONS,
    model_error: float = DEFAULT_MODEL_ERROR,
) -> dict[str, np.ndarray]:
    """Weighted least-squares PSF fit of all candidates at once.

    Model on the ``(2 half + 1)^2`` stamp around pixel ``(ix, iy)``:
    ``F * gx(i - x) * gy(j - y) + b``, with ``g`` the pixel-integrated Gaussian of the
    PSF's sigma, weights ``1 / var``; Gauss-Newton from the peak pixel.

    Parameters
    ----------
    diff, var : (ny, nx) float
        Difference image and its variance (``inf`` = masked).
    ix, iy : (N,) int
        Peak pixels.
    sigma : float
        Gaussian sigma (px) of the profile before pixel integration
        (:func:`rtcnn.difference.psf_sigma` of the FWHM for the PSF).
    half, iterations : int
        Stamp half-width (px) and number of Gauss-Newton steps.
    model_error : float
        PSF model error as a fraction of the model's peak pixel, added in quadrature
        to every pixel's noise in ``chi2``.

    Returns
    -------
    dict of (N,) arrays
        ``x``, ``y`` (px), ``flux``, ``flux_err`` (e-/s, total PSF flux), ``snr``
        (``flux / flux_err``, signed), ``chi2`` (reduced, with the model error) and
        ``ok`` (bool: converged within :data:`FIT_MAX_SHIFT` of the peak).
    """
    ix = np.asarray(ix, dtype=np.int64)
    iy = np.asarray(iy, dtype=np.int64)
    n = len(ix)
    if n == 0:
        z = np.zeros(0)
        return {"x": z, "y": z, "flux": z, "flux_err": z, "snr": z, "chi2": z,
                "ok": np.zeros(0, dtype=bool)}  # fmt: skip
    d = stamps(diff, ix, iy, half, 0.0)  # (N, S, S)
    v = stamps(var, ix, iy, half, np.inf)
    w = np.where(np.isfinite(v), 1.0 / v, 0.0)
    u = np.arange(-half, half + 1, dtype=np.float64)
    k = 1.0 / (math.sqrt(2.0) * sigma)
    c = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)

    def profile(t):  # t: (N,) sub-pixel centre relative to the peak pixel
        a = u[None, :] - t[:, None]
        g = 0.5 * (erf((a + 0.5) * k) - erf((a - 0.5) * k))
        dg = -c * (np.exp(-((a + 0.5) ** 2) * k * k) - np.exp(-((a - 0.5) ** 2) * k * k))
        return g, dg  # (N, S): value and d/dt

    x = np.zeros(n)
    y = np.zeros(n)
    params = np.zeros((n, 2))  # flux, background
    for it in range(iterations + 1):
        gx, dgx = profile(x)
        gy, dgy = profile(y)
        p = gy[:, :, None] * gx[:, None, :]
        ones = np.ones_like(p)
        if it == 0:  # linear start: flux and constant at the peak pixel
            A = np.stack([p, ones], axis=-1).reshape(n, -1, 2)
            AtW = A.transpose(0, 2, 1) * w.reshape(n, 1, -1)
            M = AtW @ A + 1e-12 * np.eye(2)
            params = np.linalg.solve(M, (AtW @ d.reshape(n, -1, 1)))[..., 0]
            continue
        F = params[:, 0][:, None, None]
        J = np.stack([
            F * gy[:, :, None] * dgx[:, None, :],  # d/dx
            F * dgy[:, :, None] * gx[:, None, :],  # d/dy
            p,  # d/dF
            ones,  # d/db
        ], axis=-1).reshape(n, -1, 4)  # fmt: skip
        model = (F * p + params[:, 1][:, None, None]).reshape(n, -1)
        r = d.reshape(n, -1) - model
        JtW = J.transpose(0, 2, 1) * w.reshape(n, 1, -1)
        H = JtW @ J + 1e-9 * np.eye(4)
        step = np.linalg.solve(H, (JtW @ r[..., None]))[..., 0]
        step[:, :2] = np.clip(step[:, :2], -0.5, 0.5)
        x = np.clip(x + step[:, 0], -FIT_MAX_SHIFT - 0.5, FIT_MAX_SHIFT + 0.5)
        y = np.clip(y + step[:, 1], -FIT_MAX_SHIFT - 0.5, FIT_MAX_SHIFT + 0.5)
        params = params + step[:, 2:]
    # final covariance and chi^2 at the solution
    gx, dgx = profile(x)
    gy, dgy = profile(y)
    p = gy[:, :, None] * gx[:, None, :]
    F = params[:, 0][:, None, None]
    J = np.stack([F * gy[:, :, None] * dgx[:, None, :], F * dgy[:, :, None] * gx[:, None, :],
                  p, np.ones_like(p)], axis=-1).reshape(n, -1, 4)  # fmt: skip
    JtW = J.transpose(0, 2, 1) * w.reshape(n, 1, -1)
    cov = np.linalg.inv(JtW @ J + 1e-9 * np.eye(4))
    flux = params[:, 0]
    flux_err = np.sqrt(np.clip(cov[:, 2, 2], 0.0, None))
    model = F * p + params[:, 1][:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        peak = np.abs(F * p).reshape(n, -1).max(axis=1)[:, None, None]
        v_model = np.where(w > 0, 1.0 / w, np.inf) + (model_error * peak) ** 2
        chi = ((d - model) ** 2 / v_model).reshape(n, -1).sum(axis=1)
        dof = np.maximum((w > 0).reshape(n, -1).sum(axis=1) - 4, 1)
        snr = flux / flux_err
    ok = (np.abs(x) <= FIT_MAX_SHIFT) & (np.abs(y) <= FIT_MAX_SHIFT) & np.isfinite(snr)
    return {"x": ix + x, "y": iy + y, "flux": flux, "flux_err": flux_err,
            "snr": np.where(np.isfinite(snr), snr, 0.0), "chi2": chi / dof, "ok": ok}  # fmt: skip


# --------------------------------------------------------------------------- positions
def psf_refine(diff: np.ndarray, sources: Sources, fwhm: float, *,
               ref: np.ndarray | None = None, new: np.ndarray | None = None,
               exptime: tuple[float | None, float | None] = (None, None),
               sigma_bkg: float | None = None, max_shift: float = REFINE_MAX_SHIFT,
               min_snr: float = REFINE_MIN_SNR) -> tuple[Sources, np.ndarray]:
    """Refine detected positions by a PSF fit to the difference image.

    The network's positions (cell centre + offset head) come within about 0.07 px for
    bright sources; a weighted least-squares fit of the pixel-integrated Gaussian PSF of
    FWHM ``fwhm`` (px) on the 5x5 pixels of ``new - ref`` around each detection
    (:func:`fit_psf`, the classical measurement) does better wherever the source is bright
    enough. The weights are the noise model :func:`rtcnn.difference.noise_variance` when
    ``ref``, ``new``, ``exptime`` and ``sigma_bkg`` are given (uniform weights otherwise).
    Detections whose fit has ``|S/N| >= WIDE_FIT_SNR`` are refitted on a wider stamp
    (:data:`WIDE_FIT_HALF`): on the validation SCA (seed 5151) that took the median error
    of S/N > 30 transients from 0.037 to 0.036 px, on the test SCAs (seed 7777) from 0.026
    to 0.021 px, with the Gaussian PSF model's mismatch to the Roman PSF as the floor. A fit
    with ``|S/N| < min_snr``, that fails, or that lands more than ``max_shift`` px from the
    network's position is not used: the network's position is kept.

    Returns
    -------
    sources : Sources
        With refined ``x``, ``y`` (other fields unchanged).
    used : (N,) bool
        Where the fit was used.
    """
    n = len(sources)
    if n == 0:
        return sources, np.zeros(0, dtype=bool)
    fit = None
    x, y = sources.x, sources.y
    for _ in range(2):  # refit on the stamp centred on the first fit's pixel
        fit = _fit_stamps(diff, x, y, fwhm, ref, new, exptime, sigma_bkg)
        ok = fit["ok"] & (np.hypot(fit["x"] - sources.x, fit["y"] - sources.y) <= max_shift)
        x, y = np.where(ok, fit["x"], x), np.where(ok, fit["y"], y)
    # bright sources: refit on a wider stamp (more of the PSF's wings constrain the centre)
    wide = fit["ok"] & (np.abs(fit["snr"]) >= WIDE_FIT_SNR)
    if wide.any():
        fw = _fit_stamps(diff, x[wide], y[wide], fwhm, ref, new, exptime, sigma_bkg,
                         half=WIDE_FIT_HALF)  # fmt: skip
        for key in fit:
            fit[key][wide] = np.where(fw["ok"], fw[key], fit[key][wide])
    used = (fit["ok"] & (np.abs(fit["snr"]) >= min_snr)
            & (np.hypot(fit["x"] - sources.x, fit["y"] - sources.y) <= max_shift))  # fmt: skip
    x = np.where(used, fit["x"], sources.x)
    y = np.where(used, fit["y"], sources.y)
    return sources.replace(x=x, y=y), used


def _fit_stamps(diff, x, y, fwhm, ref, new, exptime, sigma_bkg,
                half: int = FIT_HALF) -> dict[str, np.ndarray]:
    """:func:`fit_psf` on the ``(2 half + 1)^2`` stamps around ``(x, y)``."""
    n = len(x)
    ny, nx = diff.shape
    ix = np.clip(np.round(x).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.round(y).astype(np.int64), 0, ny - 1)
    # the fit reads the pixels around each detection: lay those stamps side by side in
    # a strip (zero data, zero weight beyond the image edge), with the noise model's
    # variance computed on the stamps only
    w = 2 * half + 1
    rows, cols, inside = stamp_index(diff.shape, ix, iy, half)
    var = np.ones((n, w, w))
    if ref is not None and new is not None and sigma_bkg is not None:
        var = noise_variance(ref[rows, cols].astype(np.float64),
                             new[rows, cols].astype(np.float64), sigma_bkg, exptime)

    def strip(a):
        return a.transpose(1, 0, 2).reshape(w, n * w)

    d = np.where(inside, diff[rows, cols], 0.0)
    var = np.where(inside, var, np.inf)
    sx = np.arange(n) * w + half
    fit = fit_psf(strip(d), strip(var), sx, np.full(n, half), psf_sigma(fwhm), half=half)
    fit["x"] = fit["x"] - sx + ix
    fit["y"] = fit["y"] - half + iy
    return fit


# --------------------------------------------------------------------------- dmag
def photometric_dmag(d: Difference, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``|m_ref - m_new|`` (mag) by aperture photometry of both images at ``(x, y)``.

    Paper eq. 1-2 with local-annulus backgrounds (:func:`rtcnn.photometry.magdiff`, both
    sides measured on the reference scaled to the new zero point, a lower limit where the
    object is below 3 sigma in one image) — the measurement the data layer and the score
    define dmag with. NaN everywhere when the pair has no zero point.
    """
    from rtcnn.photometry import magdiff

    x = np.asarray(x, np.float64)
    if d.zeropoint is None or len(x) == 0:
        return np.full(len(x), np.nan)
    nan = np.full(len(x), np.nan)
    xy = np.column_stack([x, np.asarray(y, np.float64)])
    ph = magdiff(d.ref, d.new, xy, nan, nan, d.zeropoint, d.zeropoint, use_catalog=False,
                 mask_ref=d.mask, mask_new=d.mask, effective_gain=d.exptime[1])  # fmt: skip
    return np.asarray(ph["magdiff"], dtype=np.float64)


# --------------------------------------------------------------------------- detector
@dataclass
class Measurement:
    """The detector's per-detection measurements on one pair (callable on any batch).

    ``measurement(sources)``: drops detections on bad pixels
    (:func:`rtcnn.postprocess.drop_masked`), refines positions by the PSF fit
    (:func:`psf_refine`, when ``refine``) and replaces the network's dmag by
    :func:`photometric_dmag` (when ``photometry``). Thread-safe: it only reads ``d``.

    Attributes
    ----------
    d : Difference
    fwhm : float
        PSF FWHM in px.
    sigma_bkg : float
        Background noise of the difference (e-/s), for the fit weights.
    refine, photometry : bool
    refined : int
        Number of detections whose position the fit replaced so far.
    """

    d: Difference
    fwhm: float
    sigma_bkg: float
    refine: bool = True
    photometry: bool = True
    refined: int = 0

    def __call__(self, sources: Sources) -> Sources:
        sources = drop_masked(sources, self.d.mask)
        if self.refine:
            sources, used = psf_refine(self.d.diff, sources, self.fwhm, ref=self.d.ref,
                                       new=self.d.new, exptime=self.d.exptime,
                                       sigma_bkg=self.sigma_bkg)  # fmt: skip
            self.refined += int(used.sum())
        if self.photometry and len(sources):
            sources = sources.replace(dmag=photometric_dmag(self.d, sources.x, sources.y))
        return sources
