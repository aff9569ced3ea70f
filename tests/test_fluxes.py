"""Measured sources (rtcnn.fluxes): flux errors checked by injection, flags, units."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from rtcnn import roman
from rtcnn.difference import psf_sigma
from rtcnn.fluxes import (
    FLAG_BITS,
    MEASURED_COLUMNS,
    add_measurements,
    decode_flags,
    njy_per_unit,
    pixel_variance,
)
from rtcnn.measure import fit_psf

SIZE = 240  # px
SPACING = 20  # px between injected sources
SIGMA_IMG = 0.084  # e-/s per px, background noise of each image (the simulator's BKGSIG)
EXPTIME = 139.8  # s
ZP = 26.51  # AB mag of 1 e-/s (H158)


def _wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -44.0]
    w.wcs.crpix = [SIZE / 2, SIZE / 2]
    w.wcs.cd = [[-0.11 / 3600, 0.0], [0.0, 0.11 / 3600]]
    return w


def _inject(seed: int):
    """A pair with point sources of the Roman PSF (galsim) only in the new image.

    Returns ref, new (e-/s), true x, y, true flux inside the 63 px box (e-/s).
    """
    import galsim

    rng = np.random.default_rng(seed)
    psf = galsim.Convolve(roman.get_psf("H158", 7), galsim.Pixel(roman.PIXEL_SCALE))
    centres = np.arange(SPACING, SIZE - SPACING + 1, SPACING)
    gx, gy = np.meshgrid(centres, centres)
    n = gx.size
    x = gx.ravel() + rng.uniform(-0.5, 0.5, n)
    y = gy.ravel() + rng.uniform(-0.5, 0.5, n)
    snr = rng.uniform(5.0, 40.0, n)
    nea = roman.noise_equivalent_area("H158", 7)
    flux = snr * math.sqrt(2.0) * SIGMA_IMG * math.sqrt(nea)  # e-/s, PSF S/N on the difference
    signal = np.zeros((SIZE, SIZE))
    true = np.zeros(n)
    for k in range(n):
        ix, iy = round(x[k]), round(y[k])
        stamp = psf.drawImage(nx=63, ny=63, scale=roman.PIXEL_SCALE, method="no_pixel",
                              offset=(x[k] - ix, y[k] - iy)).array.astype(np.float64)
        stamp *= flux[k] / stamp.sum()  # flux inside the 63 px box, as rtcnn.sim normalises
        true[k] = flux[k]
        y0, x0 = iy - 31, ix - 31
        sl = (slice(max(y0, 0), min(y0 + 63, SIZE)), slice(max(x0, 0), min(x0 + 63, SIZE)))
        signal[sl] += stamp[sl[0].start - y0:sl[0].stop - y0, sl[1].start - x0:sl[1].stop - x0]
    pois = rng.poisson(signal * EXPTIME) / EXPTIME
    ref = rng.normal(0.0, SIGMA_IMG, (SIZE, SIZE)).astype(np.float32)
    new = (rng.normal(0.0, SIGMA_IMG, (SIZE, SIZE)) + pois).astype(np.float32)
    return ref, new, x, y, true


@pytest.fixture(scope="module")
def injected():
    """Three injected pairs measured at PSF-fitted positions (what the detector reports)."""
    rows = []
    sigma_diff = math.sqrt(2.0) * SIGMA_IMG
    for seed in (1, 2, 3):
        ref, new, x, y, true = _inject(seed)
        diff = new - ref
        var = pixel_variance(ref, new, sigma_diff, (EXPTIME, EXPTIME), residual_fraction=0.0)
        fit = fit_psf(diff, var, np.rint(x).astype(int), np.rint(y).astype(int),
                      psf_sigma(roman.band_fwhm("H158")))
        table = Table({"x": fit["x"], "y": fit["y"], "brightened": np.ones(len(x), bool),
                       "score": np.linspace(0.9, 0.5, len(x))})  # fmt: skip
        add_measurements(table, ref, new, wcs=_wcs(), zeropoint=ZP, band="H158",
                         sigma_diff=sigma_diff, exptime=(EXPTIME, EXPTIME))  # fmt: skip
        table["true_njy"] = true * njy_per_unit(ZP)
        table["x_true"], table["y_true"] = x, y
        table.meta.clear()  # per-pair metadata (timings) does not stack
        rows.append(table)
    from astropy.table import vstack

    return vstack(rows)


@pytest.mark.parametrize("kind", ["psf", "ap"])
def test_flux_pull_by_injection(injected, kind):
    """(flux - true) / err over 363 injected Roman-PSF sources: std within 10 % of 1,
    mean within 0.15 (no bias beyond a small fraction of the error)."""
    t = injected
    pull = (np.asarray(t[f"{kind}_flux"]) - np.asarray(t["true_njy"])) / np.asarray(
        t[f"{kind}_flux_err"])
    assert len(pull) > 300
    assert np.all(np.isfinite(pull))
    std, mean = float(np.std(pull)), float(np.mean(pull))
    print(f"{kind} pull: N={len(pull)} mean={mean:+.3f} std={std:.3f}")
    assert abs(std - 1.0) < 0.10, std
    assert abs(mean) < 0.15, mean


def test_position_errors_by_injection(injected):
    """x_err/y_err describe the PSF-fit scatter: pull std within 25 % of 1 (the fit uses a
    Gaussian PSF model, the error the Roman PSF's Cramer-Rao bound)."""
    t = injected
    for axis in ("x", "y"):
        pull = (np.asarray(t[axis]) - np.asarray(t[f"{axis}_true"])) / np.asarray(t[f"{axis}_err"])
        std = float(np.std(pull))
        print(f"{axis} position pull std={std:.3f}")
        assert 0.75 < std < 1.25, (axis, std)
    # sky errors: 0.11"/px, so ra_err (deg) = x_err * 0.11 / 3600 on this WCS
    np.testing.assert_allclose(np.asarray(t["ra_err"]), np.asarray(t["x_err"]) * 0.11 / 3600,
                               rtol=1e-3)  # fmt: skip
    np.testing.assert_allclose(np.asarray(t["dec_err"]), np.asarray(t["y_err"]) * 0.11 / 3600,
                               rtol=1e-3)  # fmt: skip


def test_columns_units_and_snr(injected):
    t = injected
    for name, (unit, _) in MEASURED_COLUMNS.items():
        assert name in t.colnames
        if unit is not None:
            assert t[name].unit == unit
    np.testing.assert_allclose(t["snr"], np.abs(t["psf_flux"]) / t["psf_flux_err"])
    np.testing.assert_array_equal(t["reliability"], t["score"])
    assert not np.any(t["is_negative"])
    # sources lie >= 20 px from the edge on empty sky: no flag
    assert np.all(t["flags"] == 0)


def test_njy_per_unit():
    """1 e-/s at zero point 31.4 is 1 nJy; AB 23.9 is 1 uJy."""
    assert njy_per_unit(31.4) == pytest.approx(1.0)
    assert njy_per_unit(23.9) == pytest.approx(1000.0)


def test_flags_each_bit():
    """Each named bit is set by its own condition and only by it."""
    rng = np.random.default_rng(0)
    ref = rng.normal(0, SIGMA_IMG, (100, 100)).astype(np.float32)
    new = rng.normal(0, SIGMA_IMG, (100, 100)).astype(np.float32)
    mask = np.zeros((100, 100), bool)
    mask[50, 31] = True  # masked pixel next to source 1
    ref[70, 70] = 500.0  # bright star in the reference next to source 3
    new[30, 70] = 50.0  # single-pixel hit at source 4 (cosmic-ray-like)
    new[50, 50] = 1e5  # saturated pixel at source 2
    x = np.array([5.0, 30.0, 50.0, 72.0, 70.0, 40.0])
    y = np.array([50.0, 50.0, 50.0, 70.0, 30.0, 40.0])
    from rtcnn.fluxes import source_flags

    flags = source_flags(ref, new, x, y, mask=mask, sigma_diff=0.12,
                         saturation=(None, 6e4))  # fmt: skip
    named = decode_flags(flags)
    expected = {
        "edge": [True, False, False, False, False, False],
        "masked": [False, True, False, False, False, False],
        "saturated": [False, False, True, False, False, False],
        "bright_star": [False, False, False, True, False, False],
        "cosmic_ray": [False, False, True, False, True, False],
    }
    for name in FLAG_BITS:
        assert list(named[name]) == expected[name], name
    assert flags[5] == 0
