"""Tests of rtcnn.truth (the truth-measurement stage) against analytic truth: pixel-integrated
Gaussian point sources of known flux on a noise-free or fixed-seed noisy pair."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from numpy.testing import assert_allclose
from scipy.special import erf

from rtcnn.errors import RtcnnInputError
from rtcnn.io.fits import Image
from rtcnn.photometry import aperture_dmag
from rtcnn.truth import (
    in_footprint,
    measure_changes,
    pair_zeropoints,
    truth_changes,
    truth_dmag,
    truth_on_image,
)

ZP = 26.0  # AB mag of 1 image unit
SIGMA = 1.0  # px, Gaussian PSF
SHAPE = (120, 160)  # (ny, nx)
NOISE = 0.02  # image units per px


def gauss_image(sources, shape=SHAPE) -> np.ndarray:
    """Sum of pixel-integrated unit Gaussians, ``sources`` = [(x, y, flux)], [y, x] array."""
    ny, nx = shape
    img = np.zeros(shape)
    k = 1.0 / (math.sqrt(2.0) * SIGMA)
    for x, y, f in sources:
        gx = 0.5 * (erf((np.arange(nx) - x + 0.5) * k) - erf((np.arange(nx) - x - 0.5) * k))
        gy = 0.5 * (erf((np.arange(ny) - y + 0.5) * k) - erf((np.arange(ny) - y - 0.5) * k))
        img += f * np.outer(gy, gx)
    return img


def image(data, zp=ZP, path="img.fits") -> Image:
    return Image(data=np.asarray(data, np.float32), mask=None, wcs=None, zeropoint=zp,
                 unit="electron/s", header=fits.Header(), path=path)


def flux(mag):
    return 10 ** (-0.4 * (mag - ZP))


# Known pair: a variable star (both truth magnitudes), a transient on a host galaxy
# (absent from the reference's truth), a hostless transient, and constant stars for eq. 3.
VARIABLE = (40.3, 30.6, 19.0, 18.5)  # x, y, mag_ref, mag_new
HOSTED = (100.2, 40.4, 18.0, 19.5)  # x, y, host mag (both images), transient mag (new)
HOSTLESS = (60.7, 90.2, 20.0)  # x, y, mag (new only)
STARS = [(20.0 + 25 * i, 105.0 - 12 * (i % 2), 18.5 + 0.3 * i) for i in range(6)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    rng = np.random.default_rng(5)
    const = [(x, y, flux(m)) for x, y, m in STARS] + [(HOSTED[0], HOSTED[1], flux(HOSTED[2]))]
    ref = gauss_image(const + [(VARIABLE[0], VARIABLE[1], flux(VARIABLE[2]))])
    new = gauss_image(const + [(VARIABLE[0], VARIABLE[1], flux(VARIABLE[3])),
                               (HOSTED[0], HOSTED[1], flux(HOSTED[3])),
                               (HOSTLESS[0], HOSTLESS[1], flux(HOSTLESS[2]))])
    ref += rng.normal(0, NOISE, SHAPE)
    new += rng.normal(0, NOISE, SHAPE)
    d = tmp_path_factory.mktemp("truthpair")
    t = Table()
    t["id"] = ["var", "hosted", "hostless"]
    t["x"] = [VARIABLE[0], HOSTED[0], HOSTLESS[0]]
    t["y"] = [VARIABLE[1], HOSTED[1], HOSTLESS[1]]
    t["mag_ref"] = MaskedColumn([VARIABLE[2], 0.0, 0.0], mask=[False, True, True])
    t["mag_new"] = [VARIABLE[3], HOSTED[3], HOSTLESS[2]]
    t["kind"] = ["variable", "transient", "transient"]
    t.write(d / "truth.ecsv", format="ascii.ecsv")
    stars = Table({"x": [s[0] for s in STARS], "y": [s[1] for s in STARS],
                   "mag": [s[2] for s in STARS], "kind": ["star"] * len(STARS)})
    stars.write(d / "stars.ecsv", format="ascii.ecsv")
    return dict(ref=ref, new=new, dir=d, truth=t)


def test_in_footprint_edges():
    x = np.array([-0.5, -0.51, 159.49, 159.5, np.nan, 10.0])
    y = np.array([0.0, 0.0, 119.0, 0.0, 0.0, 119.5])
    assert in_footprint(x, y, SHAPE).tolist() == [True, False, True, False, False, False]


def test_truth_on_image(caplog):
    t = Table({"x": [10.0, 500.0], "y": [10.0, 10.0]})
    with caplog.at_level(logging.INFO, logger="rtcnn.truth"):
        assert len(truth_on_image(t, SHAPE, "t.ecsv")) == 1
    assert "1 of 2 catalog positions fall outside" in caplog.text
    with pytest.raises(RtcnnInputError, match=r"t.ecsv: all 1 catalog positions fall outside "
                       r"the image \(160 x 120 px"):
        truth_on_image(t[1:], SHAPE, "t.ecsv", "ref.fits")


def test_eq1_eq2_and_limits(pair):
    ref, new, t = image(pair["ref"]), image(pair["new"]), pair["truth"]
    ch, zps = truth_changes(ref, new, pair["dir"] / "truth.ecsv")
    assert zps == (ZP, ZP)
    assert ch["id"].tolist() == ["var", "hosted", "hostless"]
    # eq. 1: both truth magnitudes
    assert ch["dmag"][0] == pytest.approx(VARIABLE[2] - VARIABLE[3], abs=1e-9)
    assert ch["dmag_method"][0] == "catalog"
    # eq. 2 on a host: the host's aperture flux (fraction f of a Gaussian within r = 3 px)
    # in the reference, and the transient's catalog flux plus that light in the new image
    f = 1 - math.exp(-9 / (2 * (SIGMA**2 + 1 / 12)))
    expect = 2.5 * math.log10(1 + flux(HOSTED[3]) / (f * flux(HOSTED[2])))
    assert ch["dmag"][1] == pytest.approx(expect, abs=0.01)
    assert ch["dmag_method"][1] == "aperture"
    # hostless: the reference side is a 3-sigma limit, and the measured flux change is
    # the transient's (S/N of the difference-image aperture flux)
    assert ch["dmag_method"][2] == "limit"
    assert ch["dflux"][2] == pytest.approx(flux(HOSTLESS[2]), rel=0.01)
    assert ch["snr"][2] > 100
    # the score's truth dmag: the same numbers, the limit is not a value
    td = truth_dmag(t, ref, new, pair["dir"] / "truth.ecsv")
    assert_allclose(td[:2], ch["dmag"][:2])
    assert np.isnan(td[2])


def test_detection_dmag_helper_matches_truth(pair):
    """aperture_dmag (both sides measured, no catalog) agrees with eq. 1 for the bright
    variable: the aperture correction cancels in the ratio."""
    d = aperture_dmag(pair["ref"], pair["new"], [VARIABLE[:2]], ZP, ZP)
    assert d[0] == pytest.approx(VARIABLE[2] - VARIABLE[3], abs=0.005)


def test_zero_point_fallbacks(pair, caplog):
    d = pair["dir"]
    ref, new = image(pair["ref"], zp=None), image(pair["new"], zp=None)
    t = pair["truth"]
    # eq. 3 from the stars beside the truth
    with caplog.at_level(logging.INFO, logger="rtcnn.truth"):
        zps = pair_zeropoints(ref, new, np.array([19.0, np.nan]), np.array([18.5, 19.5]),
                              d / "truth.ecsv")
    # eq. 3 without an aperture correction absorbs the light outside r = 3 px (fraction 1 - f)
    f = 1 - math.exp(-9 / (2 * (SIGMA**2 + 1 / 12)))
    assert_allclose(zps, ZP + 2.5 * math.log10(f), atol=0.01)
    assert "eq. (3) from 6 stars" in caplog.text
    # no stars: only eq. 1 rows can do without a zero point
    lone = d / "lone"
    lone.mkdir()
    t.write(lone / "truth.ecsv", format="ascii.ecsv")
    assert pair_zeropoints(ref, new, np.array([19.0]), np.array([18.5]),
                           lone / "truth.ecsv") == (None, None)
    with pytest.raises(RtcnnInputError, match="img.fits: no zero point in the header"):
        measure_changes(ref, new, t["x"], t["y"], np.array([19.0, np.nan, np.nan]),
                        np.array(t["mag_new"]), lone / "truth.ecsv")
    with caplog.at_level(logging.WARNING, logger="rtcnn.truth"):
        assert truth_dmag(t, ref, new, lone / "truth.ecsv") is None
    assert "truth dmag from the catalog magnitudes" in caplog.text


def test_a_truth_with_strings_is_skipped_by_the_index(pair, tmp_path):
    """A pair whose truth has a non-numeric position column is one input error naming the
    column, and the training index leaves that pair out (listed) instead of aborting."""
    from rtcnn.data.index import IndexConfig, build_index
    from rtcnn.io import find_pairs

    for name, bad in (("good", False), ("bad", True)):
        d = tmp_path / name
        d.mkdir()
        for role in ("ref", "new"):
            fits.PrimaryHDU(pair[role].astype(np.float32),
                            fits.Header([("MAGZP", ZP)])).writeto(d / f"{role}.fits")
        t = pair["truth"].copy()
        if bad:
            t["x"] = [f"{v:.1f}px" for v in t["x"]]
        t.write(d / "truth.ecsv", format="ascii.ecsv")
    with pytest.raises(RtcnnInputError, match=r"bad/truth.ecsv: column 'x' is not numeric"):
        truth_changes(image(pair["ref"]), image(pair["new"]), tmp_path / "bad" / "truth.ecsv")
    idx = build_index(find_pairs(tmp_path), IndexConfig(tile_size=64, tile_overlap=0),
                      progress=False)
    assert idx.n_pairs == 1 and [b.name for b in idx.broken] == ["bad"]
    assert "column 'x' is not numeric" in str(idx.broken[0])
