"""A tiny analytic sky for the alignment and coadd tests (imported by tests/test_align.py,
tests/test_coadd.py).

Sources are pixel-integrated circular Gaussians placed at fixed RA/Dec and drawn through
any TAN WCS, so every image of one sky agrees on the sky to float precision whatever its
roll, origin or size: the truth for "resampled reference == directly drawn image".
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy.special import erf

PIXEL_SCALE = 0.11  # arcsec / px (Roman)
SIGMA_PX = 1.0  # px, Gaussian PSF sigma (FWHM 2.35 px, well sampled)
STAMP_HALF = 8  # px, half side of the drawn stamps


def make_wcs(shape, ra=9.5, dec=-44.0, roll=0.0, crpix=None, scale=PIXEL_SCALE) -> WCS:
    """TAN WCS of a ``shape = (ny, nx)`` image, rotated by ``roll`` deg (0 = north up).

    ``crpix`` (1-based FITS, default the image centre) moves the pixel origin.
    """
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2] if crpix is None else list(crpix)
    c, s = np.cos(np.radians(roll)), np.sin(np.radians(roll))
    d = scale / 3600.0
    w.wcs.cd = np.array([[-d * c, d * s], [d * s, d * c]])
    w.wcs.radesys = "ICRS"
    return w


def sky(rng, n, wcs, shape, flux=(30.0, 3000.0), margin=30.0):
    """``n`` sources uniform over ``wcs``'s image (plus ``margin`` px): ra, dec, flux."""
    ny, nx = shape
    x = rng.uniform(-margin, nx + margin, n)
    y = rng.uniform(-margin, ny + margin, n)
    ra, dec = wcs.all_pix2world(x, y, 0)
    f = 10 ** rng.uniform(np.log10(flux[0]), np.log10(flux[1]), n)
    return np.asarray(ra), np.asarray(dec), f


def draw(wcs, shape, ra, dec, flux, noise=0.0, rng=None, sigma=SIGMA_PX) -> np.ndarray:
    """Pixel-integrated Gaussians at ``(ra, dec)`` with total ``flux``; float32 ``shape``."""
    ny, nx = shape
    x, y = wcs.all_world2pix(np.atleast_1d(ra), np.atleast_1d(dec), 0)
    img = np.zeros(shape)
    k = np.sqrt(2.0) * sigma
    h = STAMP_HALF
    for xi, yi, fi in zip(x, y, np.atleast_1d(flux)):
        ix, iy = round(xi), round(yi)
        xs = np.arange(max(0, ix - h), min(nx, ix + h + 1))
        ys = np.arange(max(0, iy - h), min(ny, iy + h + 1))
        if xs.size == 0 or ys.size == 0:
            continue
        gx = 0.5 * (erf((xs + 0.5 - xi) / k) - erf((xs - 0.5 - xi) / k))
        gy = 0.5 * (erf((ys + 0.5 - yi) / k) - erf((ys - 0.5 - yi) / k))
        img[np.ix_(ys, xs)] += fi * np.outer(gy, gx)
    if noise:
        img += rng.normal(0.0, noise, shape)
    return img.astype(np.float32)


def write(path, data, wcs=None, zp=26.0, exptime=100.0, band="H158", extra=()):
    """Write ``data`` as a FITS primary HDU with ``wcs``, MAGZP, EXPTIME, BAND."""
    hdr = wcs.to_header() if wcs is not None else fits.Header()
    hdr["MAGZP"] = zp
    hdr["EXPTIME"] = exptime
    hdr["BAND"] = band
    hdr["BUNIT"] = "electron/s"
    hdus = [fits.PrimaryHDU(np.asarray(data, np.float32), header=hdr)]
    for name, plane in extra:
        hdus.append(fits.ImageHDU(np.asarray(plane, np.float32), name=name))
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path
