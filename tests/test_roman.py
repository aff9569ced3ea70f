"""Tests of rtcnn.roman, the one home of Roman facts, against galsim.roman and analytic truth."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from rtcnn import roman
from rtcnn.errors import RtcnnInputError

galsim = pytest.importorskip("galsim")
import galsim.roman as gr  # noqa: E402


def test_constants_are_galsims():
    assert roman.SCA_NPIX == gr.n_pix == 4088
    assert roman.PIXEL_SCALE == gr.pixel_scale == 0.11
    assert roman.N_SCA == gr.n_sca == 18
    assert roman.SCA_AREA == 4088**2
    # the SCA centre in GalSim's 1-based frame is the true centre of pixels 1..4088
    assert roman.SCA_CENTRE == galsim.BoundsI(1, 4088, 1, 4088).true_center.x == 2044.5
    assert set(roman.BANDS) == set(roman.FWHM_PX)
    assert set(roman.BANDS) <= set(gr.getBandpasses())


@pytest.mark.parametrize("l2, gs", list(zip(roman.L2_BANDS, roman.BANDS)))
def test_both_spellings_any_case(l2, gs):
    assert roman.canonical_band(l2) == gs
    assert roman.canonical_band(gs.lower()) == gs
    assert roman.canonical_band(f" {l2.lower()} ") == gs
    assert roman.band_fwhm(l2) == roman.band_fwhm(gs) == roman.FWHM_PX[gs]


@pytest.mark.parametrize("bad", ["X999", "r", "H159", "F999"])
def test_unknown_band_is_an_error_naming_it(bad):
    with pytest.raises(RtcnnInputError, match=f"img.fits: unknown Roman band '{bad}'"):
        roman.canonical_band(bad, "img.fits")
    with pytest.raises(RtcnnInputError, match=f"unknown Roman band '{bad}'.*F158"):
        roman.band_fwhm(bad)
    with pytest.raises(RtcnnInputError, match=f"unknown Roman band '{bad}'"):
        roman.magzp(bad)


@pytest.mark.parametrize("missing", [None, "", "  "])
def test_missing_band_is_h158_with_a_warning(missing, caplog):
    with caplog.at_level(logging.WARNING, logger="rtcnn.roman"):
        assert roman.canonical_band(missing, "img.fits") == "H158"
    assert "img.fits: no band given; assuming the Roman H158 band" in caplog.text


@pytest.mark.parametrize("band", ["F158", "J129", "F087"])
def test_magzp_is_one_electron_per_second(band):
    """A flat-f_nu source of AB mag 22 gives 10**(-0.4 (22 - magzp)) e-/s (GalSim's own
    photon count through the bandpass x collecting area)."""
    bp = roman.bandpass(band)
    sed = galsim.SED(lambda w: 1.0, "nm", "fnu").withMagnitude(22.0, bp)
    rate = sed.calculateFlux(bp) * gr.collecting_area  # photons = e- / s
    assert -2.5 * math.log10(rate) + roman.magzp(band) == pytest.approx(22.0, abs=1e-6)
    assert roman.magzp(band) == pytest.approx(
        roman.bandpass_zeropoint(band) + 2.5 * math.log10(gr.collecting_area), abs=1e-12)
    assert roman.magzp("H158") == pytest.approx(26.51, abs=0.01)  # the documented value


def test_get_psf_is_cached_and_centred():
    a = roman.get_psf("H158", 7)
    assert roman.get_psf("H158", 7) is a  # one cache
    explicit = roman.get_psf("F158", 7, (roman.SCA_CENTRE, roman.SCA_CENTRE))
    stamp_a = a.drawImage(nx=31, ny=31, scale=0.11).array
    assert_allclose(explicit.drawImage(nx=31, ny=31, scale=0.11).array, stamp_a, atol=1e-7)
    st = roman.psf_stamp("H158", 7, size=63)
    assert st.shape == (63, 63) and st.dtype == np.float64
    assert 0.95 < st.sum() < 1.0  # unit-flux profile minus the wings beyond the stamp
    assert np.unravel_index(np.argmax(st), st.shape) == (31, 31)  # peak on the centre pixel
    with pytest.raises(RtcnnInputError, match="SCA must be 1..18, got 19"):
        roman.get_psf("H158", 19)


@pytest.mark.parametrize("band", ["F062", "H158", "K213"])
def test_fwhm_table_is_the_roman_psfs(band):
    """The tabulated FWHM is that of getPSF (SCA 1) convolved with the pixel, to 3 %."""
    fine = 8
    eff = galsim.Convolve(roman.get_psf(band, 1), galsim.Pixel(roman.PIXEL_SCALE))
    img = eff.drawImage(nx=64 * fine, ny=64 * fine, scale=roman.PIXEL_SCALE / fine,
                        method="no_pixel")
    fwhm_px = img.calculateFWHM() / roman.PIXEL_SCALE
    assert roman.band_fwhm(band) == pytest.approx(fwhm_px, rel=0.03)


def test_noise_equivalent_area_of_a_gaussian_scale():
    """NEA = 1/sum(p^2) >= 4 pi sigma^2 of the Gaussian with the PSF's FWHM (the Roman
    PSF has wings: a Gaussian has the smallest NEA for its FWHM), within a factor 3."""
    nea = roman.noise_equivalent_area("H158", 7)
    sigma = roman.band_fwhm("H158") / (2 * math.sqrt(2 * math.log(2)))
    assert 4 * math.pi * sigma**2 < nea < 3 * 4 * math.pi * sigma**2
