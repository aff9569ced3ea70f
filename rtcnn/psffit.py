"""Point-source measurement on difference images: the PSF model, matched filter and fit.

Pure numpy/scipy (no torch, no I/O), shared by the classical baseline
(:mod:`rtcnn.baseline`) and the detector's PSF refinement (:mod:`rtcnn.inference`).

* The PSF model is a Gaussian integrated over each pixel (:func:`pixel_gauss`), whose
  pixel-convolved FWHM is the Roman PSF's (:func:`rtcnn.roman.band_fwhm`);
  :func:`psf_sigma` removes the pixel's own width.
* :func:`snr_map`: the PSF matched filter ``(D * K) / sqrt(var * K^2)`` of a
  difference image ``D`` with per-pixel variance ``var``.
* :func:`fit_psf`: weighted least-squares fit of position, flux and a constant on a
  small stamp around many peaks at once (vectorised Gauss-Newton).
* :func:`shape_moments`: Gaussian-weighted second moments (size, ellipticity), the
  classical cosmic-ray / artefact test.

Positions follow the package convention (:mod:`rtcnn`): 0-based, integer = pixel
centre, arrays ``[y, x]``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.special import erf

from rtcnn.errors import RtcnnInputError
from rtcnn.roman import SCA_NPIX, band_fwhm  # noqa: F401 - band_fwhm re-exported

PIXEL_VARIANCE = 1.0 / 12.0  # px^2, variance of the unit pixel box (removed from the FWHM)
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # Gaussian sigma per FWHM
MAD_TO_SIGMA = 1.4826  # Gaussian sigma per median absolute deviation
NOISE_SAMPLE = 2_000_000  # pixels sampled (evenly strided) for the background MAD
DEFAULT_MODEL_ERROR = 0.15  # PSF-model error (Gaussian vs Roman PSF) as a fraction of the peak
MOMENT_SIGMA = 1.0  # px, Gaussian weight of the shape moments
FIT_HALF = 2  # px, the PSF fit uses a (2 FIT_HALF + 1)^2 stamp
FIT_ITERATIONS = 8  # Gauss-Newton iterations of the PSF fit
FIT_MAX_SHIFT = 1.5  # px, a fit moving further than this from its peak pixel is rejected


def psf_sigma(fwhm: float) -> float:
    """Gaussian sigma (px) of the optical PSF whose pixel-convolved FWHM is ``fwhm`` px."""
    s2 = (fwhm * FWHM_TO_SIGMA) ** 2 - PIXEL_VARIANCE
    if s2 <= 0.05:
        raise RtcnnInputError(None, f"--fwhm {fwhm} px is too small (must exceed ~0.9 px)")
    return math.sqrt(s2)


def pixel_gauss(u: np.ndarray, sigma: float) -> np.ndarray:
    """Integral over pixel ``[u - 0.5, u + 0.5]`` of a unit 1-D Gaussian centred at 0."""
    k = 1.0 / (math.sqrt(2.0) * sigma)
    return 0.5 * (erf((u + 0.5) * k) - erf((u - 0.5) * k))


def psf_kernel_1d(fwhm: float) -> np.ndarray:
    """1-D factor of the pixel-integrated Gaussian PSF, ``(2h + 1,)``, summing to ~1."""
    sigma = psf_sigma(fwhm)
    half = max(2, int(math.ceil(3.0 * sigma)))
    return pixel_gauss(np.arange(-half, half + 1, dtype=np.float64), sigma)


def background_sigma(diff: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Robust per-pixel noise of a difference image: 1.4826 MAD of an even subsample."""
    flat = diff.ravel()
    good = np.isfinite(flat) if mask is None else (~mask.ravel() & np.isfinite(flat))
    step = max(1, flat.size // NOISE_SAMPLE)
    vals = flat[::step][good[::step]].astype(np.float64)
    if vals.size < 100:
        raise RtcnnInputError(None, "fewer than 100 unmasked pixels; cannot estimate the noise")
    med = np.median(vals)
    sigma = MAD_TO_SIGMA * np.median(np.abs(vals - med))
    if not sigma > 0:
        raise RtcnnInputError(None, "the difference image has zero noise (identical images?)")
    return float(sigma)


def snr_map(diff: np.ndarray, var: np.ndarray, fwhm: float) -> np.ndarray:
    """PSF matched-filter S/N of a point source centred on each pixel, ``(ny, nx) float32``.

    ``(D * K) / sqrt(var * K^2)`` with the separable pixel-integrated Gaussian ``K``;
    positive for brightening, negative for fading. Masked (``var = inf``) pixels add
    nothing to the numerator and give S/N 0 wherever they fall inside ``K``.
    """
    k = psf_kernel_1d(fwhm).astype(np.float32)
    bad = ~np.isfinite(var)
    d = np.where(bad, 0.0, diff).astype(np.float32)
    v = np.where(bad, 0.0, var).astype(np.float32)
    num = ndimage.convolve1d(ndimage.convolve1d(d, k, axis=0, mode="constant"), k, axis=1,
                             mode="constant")  # fmt: skip
    k2 = k * k
    den = ndimage.convolve1d(ndimage.convolve1d(v, k2, axis=0, mode="constant"), k2, axis=1,
                             mode="constant")  # fmt: skip
    if bad.any():
        touched = ndimage.maximum_filter(bad, size=len(k))
        den[touched] = np.inf
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = num / np.sqrt(den)
    snr[~np.isfinite(snr)] = 0.0
    return snr


def noise_peak_counts(fwhm: float, levels, shape: tuple[int, int] = (SCA_NPIX, SCA_NPIX),
                      seed: int = 0, min_distance: int = 2) -> dict[str, float]:
    """Peaks of ``|S/N|`` that pure white noise gives in :func:`snr_map`, per image.

    The false-positive floor of any detector of point sources in a difference image with
    white noise: a noise peak above ``X`` looks like a point source of S/N ``X``. A
    ``shape`` field of unit Gaussian noise (seeded) is matched-filtered with the PSF of
    ``fwhm`` px and the local maxima of ``|S/N|`` in ``(2 min_distance + 1)^2`` boxes
    (brightening and fading) are counted above each level.

    Returns
    -------
    dict
        ``"<X>"`` -> number of peaks with ``|S/N| >= X`` in the field.
    """
    if len(shape) != 2 or min(shape) < 2 * min_distance + 1:
        raise ValueError(f"shape must be 2 sides >= {2 * min_distance + 1} px, got {shape}")
    noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    a = np.abs(snr_map(noise, np.ones(shape, np.float32), fwhm))
    peaks = a[a == ndimage.maximum_filter(a, size=2 * min_distance + 1, mode="nearest")]
    return {f"{x:g}": float(np.count_nonzero(peaks >= x)) for x in levels}


def stamp_index(shape: tuple[int, int], ix: np.ndarray, iy: np.ndarray,
                half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the ``(2 half + 1)^2`` stamps centred on pixels ``(ix, iy)`` of an image.

    Returns
    -------
    rows, cols : (N, S, 1) and (N, 1, S) int64
        Row and column indices, clipped to the image (``image[rows, cols]`` is ``(N, S, S)``).
    inside : (N, S, S) bool
        Where the stamp pixel lies on the image (elsewhere the clipped index repeats an
        edge pixel).
    """
    ny, nx = shape
    off = np.arange(-half, half + 1)
    r = np.asarray(iy, dtype=np.int64)[:, None] + off[None, :]
    c = np.asarray(ix, dtype=np.int64)[:, None] + off[None, :]
    inside = (((r >= 0) & (r < ny))[:, :, None] & ((c >= 0) & (c < nx))[:, None, :])
    return r.clip(0, ny - 1)[:, :, None], c.clip(0, nx - 1)[:, None, :], inside


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
        (:func:`psf_sigma` of the FWHM for the PSF).
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
