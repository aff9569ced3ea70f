"""Tests of rtcnn.photometry on synthetic images of Roman PSFs (galsim.roman) at known
sub-pixel positions, fluxes and zero point, with fixed-seed noise."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from rtcnn.errors import RtcnnInputError
from rtcnn.photometry import (
    ApertureCorrection,
    aperture_correction,
    annulus_background,
    aperture_flux,
    flux_to_mag,
    mag_to_flux,
    magdiff,
    roman_aperture_correction,
    zeropoint_from_stars,
)

galsim = pytest.importorskip("galsim")
from galsim import roman  # noqa: E402

ZP = 26.40  # AB mag of 1 e-/s (close to Roman H158)
NOISE = 0.1  # e-/s/px, sky-subtracted Gaussian noise
SHAPE = (160, 160)  # px (ny, nx)
STAMP = 41  # px, size of each drawn PSF stamp


@pytest.fixture(scope="module")
def psf():
    """Monochromatic Roman H158 PSF for SCA 7 (coarse pupil sampling: fast)."""
    wave = roman.getBandpasses()["H158"].effective_wavelength
    return roman.getPSF(7, "H158", wavelength=wave, pupil_bin=8)


def render(profile, xy, flux, shape=SHAPE, stamp=STAMP) -> np.ndarray:
    """Noise-free image (e-/s) of ``profile`` at 0-based ``xy`` with total ``flux`` each."""
    img = galsim.ImageF(shape[1], shape[0], scale=roman.pixel_scale)
    for (x, y), f in zip(np.atleast_2d(xy), np.atleast_1d(flux)):
        st = profile.drawImage(nx=stamp, ny=stamp, scale=roman.pixel_scale,
                               center=galsim.PositionD(x + 1, y + 1))  # GalSim is 1-based
        b = st.bounds & img.bounds
        img[b] += st[b] * float(f)
    return img.array.copy()


def noise(seed, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, NOISE, shape).astype(np.float32)


def grid_positions(n_side, lo=20.0, hi=140.0, seed=0):
    """Star positions on a grid with random sub-pixel offsets, (N, 2) (x, y) in px."""
    rng = np.random.default_rng(seed)
    g = np.linspace(lo, hi, n_side)
    xx, yy = np.meshgrid(g, g)
    return np.column_stack([xx.ravel(), yy.ravel()]) + rng.uniform(-0.5, 0.5, (n_side**2, 2))


@pytest.fixture(scope="module")
def apcorr(psf):
    stamp = psf.drawImage(nx=63, ny=63, scale=roman.pixel_scale).array  # unit flux, centred
    return aperture_correction(3.0, stamp, total=1.0)


@pytest.fixture(scope="module")
def star_field(psf):
    """25 stars of known magnitude 18-21.5 plus noise and a constant sky residual."""
    xy = grid_positions(5)
    mags = np.random.default_rng(1).uniform(18.0, 21.5, len(xy))
    image = render(psf, xy, mag_to_flux(mags, ZP)) + noise(2) + 0.05
    return image, xy, mags


def test_render_convention(psf):
    """The synthetic images follow the package convention: flux centroid at (x, y)."""
    from photutils.centroids import centroid_com

    img = render(galsim.Gaussian(sigma=0.2), [(30.3, 40.7)], [100.0], shape=(64, 64))
    cut = img[30:52, 20:42]
    cx, cy = centroid_com(cut)
    assert_allclose([cx + 20, cy + 30], [30.3, 40.7], atol=0.01)


def test_flux_mag_roundtrip():
    assert flux_to_mag(1.0, ZP) == ZP
    assert_allclose(mag_to_flux(flux_to_mag([0.5, 10.0, 1e4], ZP), ZP), [0.5, 10.0, 1e4])
    assert np.isnan(flux_to_mag(0.0, ZP)) and np.isnan(flux_to_mag(-3.0, ZP))
    assert flux_to_mag(100.0, 25.0) == pytest.approx(20.0)


def test_aperture_flux_recovers_known_flux(star_field, apcorr):
    image, xy, mags = star_field
    phot = aperture_flux(image, xy, 3.0, 8.0, 12.0, effective_gain=100.0)
    true = mag_to_flux(mags, ZP)
    # the constant sky residual is removed by the annulus (which also holds PSF wings,
    # accounted for by the aperture correction measured the same way)
    assert_allclose(aperture_flux(image - 0.05, xy)["flux"], phot["flux"], atol=1e-3)
    pull = (phot["flux"] * apcorr.factor - true) / (phot["flux_err"] * apcorr.factor)
    assert np.abs(pull).max() < 4.0  # errors are honest
    assert_allclose(phot["flux"] * apcorr.factor, true, rtol=0.02, atol=0)
    assert (phot["masked_frac"] == 0).all() and (phot["area"] > 28.0).all()


def test_aperture_flux_scalar_and_empty(star_field):
    image, xy, _ = star_field
    one = aperture_flux(image, xy[0])
    assert len(one) == 1
    assert len(aperture_flux(image, np.zeros((0, 2)))) == 0
    with pytest.raises(ValueError, match=r"need 0 < r_ap <= r_in < r_out"):
        aperture_flux(image, xy, 5.0, 4.0, 8.0)


def test_aperture_flux_masks_nan_pixels(star_field):
    image, xy, _ = star_field
    clean = aperture_flux(image, xy[:1])
    bad = image.copy()
    x, y = np.round(xy[0]).astype(int)
    bad[y - 11:y - 9, x - 2:x + 3] = np.nan  # in the background annulus
    assert_allclose(aperture_flux(bad, xy[:1])["flux"], clean["flux"], rtol=0.01)
    mask = np.zeros(image.shape, bool)
    mask[y, x] = True  # the central pixel is masked
    assert aperture_flux(image, xy[:1], mask=mask)["masked_frac"][0] > 0.03


def test_aperture_correction_from_psf_and_from_stars(psf, star_field):
    stamp = psf.drawImage(nx=63, ny=63, scale=roman.pixel_scale).array
    from_psf = aperture_correction(3.0, stamp, total=1.0)
    assert 1.05 < from_psf.factor < 1.4 and from_psf.mag == pytest.approx(
        2.5 * np.log10(from_psf.factor))
    image, xy, mags = star_field
    bright = xy[mags < 20.0]
    cog = aperture_correction(3.0, data=image, xy=bright, r_max=6.0)
    # the stars' curve of growth equals the PSF's between the same radii
    f3, f6 = (aperture_flux(stamp, (31, 31), r)["flux"][0] for r in (3.0, 6.0))
    assert cog.factor == pytest.approx(f6 / f3, rel=0.01)
    assert cog.n_used >= 5 and cog.scatter < 0.02
    with pytest.raises(ValueError, match=r"needs psf=, or data= and xy="):
        aperture_correction(3.0)


def test_roman_aperture_correction(apcorr):
    roman_ac = roman_aperture_correction("H158", 7)  # SCA centre, as the `psf` fixture
    assert roman_ac.factor == pytest.approx(apcorr.factor, rel=1e-4)
    assert roman_aperture_correction("H158", 7) is roman_ac  # cached
    boxed = roman_aperture_correction("H158", 7, box=64)  # total = light inside 64 px
    assert 0.01 < roman_ac.mag - boxed.mag < 0.04


def test_zeropoint_from_stars(star_field, apcorr, caplog):
    image, xy, mags = star_field
    cat = mags.copy()
    cat[:3] += 1.0  # three wrong catalog magnitudes are clipped
    with caplog.at_level("INFO", logger="rtcnn.photometry"):
        zp = zeropoint_from_stars(image, xy, cat, 3.0, 8.0, 12.0, apcorr=apcorr, path="img.fits")
    assert zp.value == pytest.approx(ZP, abs=0.02)
    assert zp.n_total == 25 and zp.n_used <= 22 and zp.scatter < 0.03
    assert "img.fits: zero point from" in caplog.text
    # without an aperture correction the zero point absorbs it
    zp_raw = zeropoint_from_stars(image, xy, mags, apcorr=1.0)
    assert zp_raw.value == pytest.approx(ZP - apcorr.mag, abs=0.02)


def test_zeropoint_too_few_stars(star_field):
    image, xy, mags = star_field
    with pytest.raises(RtcnnInputError,
                       match=r"img.fits: only 2 of 2 stars are usable for the zero point "
                             r"\(S/N >= 20, unmasked, with a catalog magnitude\); need 5"):
        zeropoint_from_stars(image, xy[:2], mags[:2], path="img.fits")


# ----------------------------------------------------------------------------- magdiff


@pytest.fixture(scope="module")
def pair(psf):
    """A reference and a new image with variables, transients (hostless, on a host) and a
    star that vanished, all at S/N > 50 in the new image; noiseless copies for the truth."""
    xy_var = np.array([[30.3, 30.6], [80.7, 30.2]])
    m_var_ref, m_var_new = np.array([20.0, 21.0]), np.array([20.8, 20.2])
    xy_tr = np.array([[130.4, 30.9], [40.2, 110.6], [110.8, 110.3]])  # hostless, 2 on hosts
    m_tr = np.array([21.5, 21.0, 21.6])
    xy_gone, m_gone = np.array([[80.1, 80.4]]), np.array([21.2])
    host = galsim.Convolve(galsim.Exponential(half_light_radius=0.35).shear(e1=0.3, e2=0.1),
                           psf)
    hosts = render(host, xy_tr[1:] + [0.8, -0.6], mag_to_flux([21.0, 19.8], ZP), stamp=47)
    ref0 = (render(psf, xy_var, mag_to_flux(m_var_ref, ZP)) + hosts
            + render(psf, xy_gone, mag_to_flux(m_gone, ZP)))
    new0 = (render(psf, xy_var, mag_to_flux(m_var_new, ZP)) + hosts
            + render(psf, xy_tr, mag_to_flux(m_tr, ZP)))
    return dict(ref0=ref0, new0=new0, ref=ref0 + noise(10), new=new0 + noise(11),
                xy_var=xy_var, m_var_ref=m_var_ref, m_var_new=m_var_new,
                xy_tr=xy_tr, m_tr=m_tr, xy_gone=xy_gone, m_gone=m_gone)


def test_magdiff_eq1_catalog_both(pair):
    out = magdiff(pair["ref"], pair["new"], pair["xy_var"], pair["m_var_ref"],
                  pair["m_var_new"], ZP)
    assert_allclose(out["dmag"], pair["m_var_ref"] - pair["m_var_new"])
    assert_allclose(out["magdiff"], [0.8, 0.8])
    assert list(out["src_ref"]) == list(out["src_new"]) == ["catalog", "catalog"]
    assert list(out["brightened"]) == [False, True] and list(out["reversed"]) == [True, False]
    assert not out["lower_limit"].any()


def test_magdiff_aperture_matches_truth_for_variables(pair, apcorr):
    """use_catalog=False: both sides by aperture photometry; truth within 0.1 mag."""
    out = magdiff(pair["ref"], pair["new"], pair["xy_var"], [np.nan] * 2, [np.nan] * 2, ZP,
                  apcorr=apcorr, use_catalog=False)
    assert list(out["src_ref"]) == ["aperture"] * 2
    assert_allclose(out["m_ref"], pair["m_var_ref"], atol=0.05)
    assert_allclose(out["dmag"], pair["m_var_ref"] - pair["m_var_new"], atol=0.1)
    truth_change = np.abs(mag_to_flux(pair["m_var_new"], ZP) - mag_to_flux(pair["m_var_ref"], ZP))
    assert_allclose(out["m_diff"], flux_to_mag(truth_change, ZP), atol=0.1)


def test_magdiff_eq2_transients(pair, apcorr):
    """Transients: catalog magnitude in the new image, aperture photometry in the reference
    at the same position; the truth is the noiseless images' aperture magnitudes."""
    xy, m_tr = pair["xy_tr"], pair["m_tr"]
    out = magdiff(pair["ref"], pair["new"], xy, np.ma.masked_all(3), m_tr, ZP, apcorr=apcorr)
    assert (out["snr_diff"] > 50).all()
    assert list(out["src_new"]) == ["catalog"] * 3
    assert list(out["src_ref"]) == ["limit", "aperture", "aperture"]
    assert list(out["lower_limit"]) == [True, False, False]
    assert out["brightened"].all() and not out["reversed"].any()
    # truth: magnitude difference of the light in the aperture, from noiseless images
    f_ref = aperture_flux(pair["ref0"], xy)["flux"]
    f_new = aperture_flux(pair["new0"], xy)["flux"]
    truth = -2.5 * np.log10(f_ref[1:] / f_new[1:])
    assert_allclose(out["dmag"][1:], truth, atol=0.1)
    # the hostless one: a lower limit from the 3-sigma noise in the reference
    lim = flux_to_mag(3 * out["flux_ref_err"][0], ZP)
    assert out["m_ref"][0] == pytest.approx(lim) and out["dmag"][0] > 0
    # the measured flux change is the transient itself
    assert_allclose(out["m_diff"], m_tr, atol=0.1)


def test_magdiff_paper_literal_host_brighter(pair, apcorr):
    """The literal recipe compares the host's aperture magnitude with the transient's
    catalog magnitude, which has the wrong sign for the transient on the bright host."""
    xy, m_tr = pair["xy_tr"][2:], pair["m_tr"][2:]
    literal = magdiff(pair["ref"], pair["new"], xy, [np.nan], m_tr, ZP, apcorr=apcorr,
                      include_underlying=False)
    assert literal["m_new"][0] == pytest.approx(m_tr[0])
    assert literal["dmag"][0] < 0 and literal["reversed"][0]
    ours = magdiff(pair["ref"], pair["new"], xy, [np.nan], m_tr, ZP, apcorr=apcorr)
    assert ours["dmag"][0] > 0 and ours["brightened"][0]


def test_magdiff_eq2_missing_from_ref_catalog(pair, apcorr):
    """A variable whose reference magnitude the catalog lacks: eq. (2) recovers it."""
    out = magdiff(pair["ref"], pair["new"], pair["xy_var"], [np.nan, np.nan],
                  pair["m_var_new"], ZP, apcorr=apcorr)
    assert list(out["src_ref"]) == ["aperture"] * 2
    assert_allclose(out["m_ref"], pair["m_var_ref"], atol=0.05)
    # include_underlying adds the reference light to the new side: same aperture, both
    f_new = mag_to_flux(pair["m_var_new"], ZP) + out["flux_ref"]
    assert_allclose(out["m_new"], flux_to_mag(f_new, ZP))


def test_magdiff_faded_object_is_reversed(pair, apcorr):
    out = magdiff(pair["ref"], pair["new"], pair["xy_gone"], pair["m_gone"], [np.nan], ZP,
                  apcorr=apcorr)
    assert list(out["src_new"]) == ["limit"] and out["lower_limit"][0]
    assert out["reversed"][0] and not out["brightened"][0] and out["dmag"][0] < -1.0
    assert out["m_diff"][0] == pytest.approx(pair["m_gone"][0], abs=0.1)


def test_magdiff_zero_points_differ(pair, apcorr):
    """The new image in units 2x smaller (zp + 0.753): magnitudes are unchanged."""
    dz = 2.5 * np.log10(2.0)
    a = magdiff(pair["ref"], pair["new"], pair["xy_tr"], [np.nan] * 3, pair["m_tr"], ZP,
                apcorr=apcorr)
    b = magdiff(pair["ref"], pair["new"] * 2.0, pair["xy_tr"], [np.nan] * 3, pair["m_tr"], ZP,
                ZP + dz, apcorr=apcorr)
    assert_allclose(b["dmag"], a["dmag"], atol=1e-6)
    assert_allclose(b["m_diff"], a["m_diff"], atol=1e-6)


def test_magdiff_needs_a_zero_point(pair):
    with pytest.raises(RtcnnInputError, match=r"no zero point for magdiff"):
        magdiff(pair["ref"], pair["new"], pair["xy_var"], [1, 2], [1, 2], None)
    with pytest.raises(ValueError, match=r"2 positions but 3 values of mag_ref"):
        magdiff(pair["ref"], pair["new"], pair["xy_var"], [1, 2, 3], [1, 2], ZP)


def test_apcorr_float_and_object_agree(star_field):
    image, xy, mags = star_field
    a = zeropoint_from_stars(image, xy, mags, apcorr=1.2)
    b = zeropoint_from_stars(image, xy, mags, apcorr=ApertureCorrection(1.2, 0.198, 0.0, 1))
    assert a.value == b.value


# ----------------------------------------------------------------------------- simulated pair

SIM_SEED = 0  # data-set seed of the simulated pair
ISOLATION = 12.0  # px, no other object (stars) / change (changes) closer than this
FORCED_STARS = [(60.3, 60.7, 19.0), (190.6, 70.2, 19.6), (70.1, 195.4, 20.2),
                (180.8, 185.5, 20.8)]  # (x px, y px, AB mag) bright stars added to the scene
FORCED_TRANSIENTS = [(128.4, 40.6, 21.5), (40.2, 128.9, 22.0), (215.7, 128.3, 22.5),
                     (128.5, 215.1, 21.0)]  # (x px, y px, AB mag) hostless transients


@pytest.fixture(scope="module")
def sim_pair(tmp_path_factory):
    """One small simulated Roman pair (inject mode), crowded enough for eq. (3)."""
    sim = pytest.importorskip("rtcnn.sim")
    from rtcnn.io import read_pair, read_truth
    from rtcnn.sim.scene import PIXEL_SCALE

    out = tmp_path_factory.mktemp("sim")
    d = sim.simulate_dataset(out, pairs=1, size=256, mode="inject", seed=SIM_SEED,
                             progress=False, n_stars=60, n_transients=12,
                             forced_stars=FORCED_STARS, forced_transients=FORCED_TRANSIENTS)[0]
    ref, new = read_pair(d / "ref.fits", d / "new.fits")
    h = ref.header
    model = sim.psf_model(h["BAND"], h["SCA"], h["PSFSCAX"], h["PSFSCAY"], h["PSFDEFOC"],
                          h["PSFJITT"])
    stamp = model.point.drawImage(nx=63, ny=63, scale=PIXEL_SCALE, method="no_pixel").array
    return dict(ref=ref, new=new, sources=read_truth(d / "sources.ecsv", ref),
                truth=read_truth(d / "truth.ecsv", ref),
                apcorr=aperture_correction(3.0, stamp, total=1.0))


def _nearest_other(xy, others):
    d = np.hypot(xy[:, None, 0] - others[None, :, 0], xy[:, None, 1] - others[None, :, 1])
    d[d == 0] = np.inf
    return d.min(axis=1) if others.size else np.full(len(xy), np.inf)


def _xy(table):
    return np.column_stack([np.asarray(table["x"], float), np.asarray(table["y"], float)])


def test_sim_zeropoint_eq3_matches_header(sim_pair):
    ref, src = sim_pair["ref"], sim_pair["sources"]
    stars = src[src["kind"] == "star"]
    zp = zeropoint_from_stars(ref.data, _xy(stars), stars["mag_ref"], apcorr=sim_pair["apcorr"],
                              mask=ref.mask)
    assert ref.zeropoint_source == "MAGZP"
    assert zp.value == pytest.approx(ref.zeropoint, abs=0.02)
    assert zp.n_used >= 5


def test_sim_roman_aperture_correction(sim_pair):
    """The Roman PSF aperture correction (box = the simulator's 64 px normalisation box)
    matches the one from the simulator's own PSF model of the reference image."""
    h = sim_pair["ref"].header
    ac = roman_aperture_correction(h["BAND"], h["SCA"], (h["PSFSCAX"], h["PSFSCAY"]), box=64)
    assert ac.mag == pytest.approx(sim_pair["apcorr"].mag, abs=0.01)


@pytest.mark.parametrize("writer", ["openuniverse", "roman-asdf"])
def test_aperture_correction_card_both_kinds_of_pair(sim_pair, tmp_path, writer, caplog):
    """Only rtcnn.sim images (card PSFBOX, or the ORIGIN of older ones) get the correction to
    the simulator's 64 px box; the same pair written by rtcnn.io.openuniverse / rtcnn.io.asdf
    (both through write_pair_images, SIMMODE in the header) gets the all-light correction."""
    import dataclasses

    from rtcnn.io import read_pair
    from rtcnn.io.openuniverse import write_pair_images
    from rtcnn.photometry import image_aperture_correction

    ref = sim_pair["ref"]
    h = ref.header
    assert h["PSFBOX"] == 64 and h["SIMMODE"] == "inject"
    pos = (h["PSFSCAX"], h["PSFSCAY"])
    sim_ac = image_aperture_correction(ref)
    assert sim_ac == roman_aperture_correction("H158", h["SCA"], pos, box=64)
    legacy = h.copy()
    del legacy["PSFBOX"]  # an rtcnn.sim image written before the card existed
    assert image_aperture_correction(dataclasses.replace(ref, header=legacy)) == sim_ac

    d, _ = write_pair_images(ref, sim_pair["new"], tmp_path / "pair", SIMMODE=writer)
    ref_w, new_w = read_pair(d / "ref.fits", d / "new.fits")
    assert ref_w.header["SIMMODE"] == writer and "PSFBOX" not in ref_w.header
    ac = image_aperture_correction(new_w)
    assert ac == roman_aperture_correction("H158", h["SCA"], None, box=None)
    assert ac.mag - sim_ac.mag == pytest.approx(0.02, abs=0.01)  # the light beyond 64 px
    # a band that is not Roman's: no correction, said in the log
    other = dataclasses.replace(new_w, band="r")
    assert image_aperture_correction(other) == 1.0
    assert "unknown Roman band 'r'" in caplog.text


def test_sim_bright_star_magnitudes(sim_pair):
    """Header zero point + aperture correction reproduce bright isolated stars' truth."""
    ref, src = sim_pair["ref"], sim_pair["sources"]
    stars = src[(src["kind"] == "star") & (src["mag_ref"] < 21.0)]
    xy = _xy(stars)
    # isolated: no object within 12 px that is brighter than 1 % of the star
    keep = np.array([(_nearest_other(xy[i:i + 1], _xy(src[src["mag_ref"] < m + 5.0])) >
                      ISOLATION)[0] for i, m in enumerate(stars["mag_ref"])])
    phot = aperture_flux(ref.data, xy[keep], mask=ref.mask)
    mags = flux_to_mag(phot["flux"] * sim_pair["apcorr"].factor, ref.zeropoint)
    assert keep.sum() >= 1
    assert_allclose(mags, stars["mag_ref"][keep], atol=0.05)


def test_sim_magdiff_matches_truth(sim_pair):
    """Changes with S/N > 50 and no other change within 12 px: aperture-photometry magdiff
    matches the truth within 0.1 mag."""
    ref, new, truth, ac = sim_pair["ref"], sim_pair["new"], sim_pair["truth"], sim_pair["apcorr"]
    xy = _xy(truth)
    kw = dict(apcorr=ac, mask_ref=ref.mask, mask_new=new.mask)
    cat = magdiff(ref.data, new.data, xy, truth["mag_ref"], truth["mag_new"], ref.zeropoint,
                  new.zeropoint, **kw)
    ap = magdiff(ref.data, new.data, xy, truth["mag_ref"], truth["mag_new"], ref.zeropoint,
                 new.zeropoint, use_catalog=False, **kw)
    good = ((np.asarray(truth["snr"]) > 50) & (_nearest_other(xy, xy) > ISOLATION)
            & (np.asarray(ap["masked_frac"]) == 0))
    kind = np.asarray(truth["kind"]).astype(str)
    tr, var = good & (kind == "transient"), good & (kind == "variable")
    assert tr.sum() >= 3
    # transients: the measured flux change is the transient (truth dflux)
    true_change = flux_to_mag(np.abs(np.asarray(truth["dflux"])), ref.zeropoint)
    assert_allclose(cat["m_diff"][tr], true_change[tr], atol=0.1)
    assert cat["brightened"][tr].all() and not cat["reversed"][tr].any()
    # eq. (2) with the catalog magnitude agrees with aperture photometry on both sides
    both = tr & (np.asarray(ap["src_ref"]) == "aperture")
    assert_allclose(cat["dmag"][both], ap["dmag"][both], atol=0.1)
    # variables: eq. (1) from the catalog, and aperture photometry matches it
    true_dmag = np.asarray(truth["mag_ref"].filled(np.nan)) - np.asarray(truth["mag_new"])
    assert_allclose(cat["dmag"][var], true_dmag[var])
    assert_allclose(ap["dmag"][var], true_dmag[var], atol=0.1)
    assert_allclose(cat["m_diff"][var], true_change[var], atol=0.1)


# --------------------------------------------------------------------------- vectorised = photutils
def _messy_image():
    """Noise, a bright block (clipped in annuli), a NaN pixel, a masked region."""
    rng = np.random.default_rng(1)
    data = rng.normal(10.0, 3.0, (300, 400)).astype(">f4")  # big-endian, as FITS memmaps
    data[50:60, 50:60] += 200.0
    data[150, 150] = np.nan
    mask = np.zeros(data.shape, bool)
    mask[100:120, 200:230] = True
    xy = np.column_stack([rng.uniform(-5, 405, 400), rng.uniform(-5, 305, 400)])
    xy[:40] = np.round(xy[:40])  # integer positions: ring radii hit pixel centres exactly
    xy[40] = (152.0, 150.0)  # the NaN pixel in the aperture
    xy[41] = (215.0, 110.0)  # aperture fully masked
    return data, mask, xy


def test_annulus_background_equals_photutils_aperturestats():
    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus

    data, mask, xy = _messy_image()
    med, std, area = annulus_background(data, xy, 8.0, 12.0, mask=mask)
    ref = ApertureStats(data, CircularAnnulus(xy, 8.0, 12.0), mask=mask,
                        sigma_clip=SigmaClip(sigma=3.0, maxiters=10))  # fmt: skip
    assert_allclose(med, ref.median, rtol=0, atol=1e-9)
    assert_allclose(std, ref.std, rtol=0, atol=1e-9)
    # centre-weighted vs exact-overlap pixel weights: a percent or two where the annulus
    # is whole, more where a mask edge cuts it
    whole = ref.sum_aper_area.value > 200.0
    assert whole.sum() > 300
    assert_allclose(area[whole], ref.sum_aper_area.value[whole], rtol=0.03)
    assert_allclose(area, ref.sum_aper_area.value, rtol=0.15)
    with pytest.raises(ValueError, match="need 0 < r_in < r_out"):
        annulus_background(data, xy, 12.0, 8.0)


def test_aperture_flux_equals_photutils_with_nan_masked_and_off_image_pixels():
    from astropy.stats import SigmaClip
    from photutils.aperture import ApertureStats, CircularAnnulus, CircularAperture

    data, mask, xy = _messy_image()
    tab = aperture_flux(data, xy, 3.0, 8.0, 12.0, mask=mask)
    ann = ApertureStats(data, CircularAnnulus(xy, 8.0, 12.0), mask=mask,
                        sigma_clip=SigmaClip(sigma=3.0, maxiters=10))  # fmt: skip
    bkg = np.where(np.isfinite(ann.median), ann.median, 0.0)
    aps = ApertureStats(data, CircularAperture(xy, 3.0), mask=mask, local_bkg=bkg)
    expect = np.where(np.isfinite(ann.median), aps.sum, np.nan)
    assert_allclose(tab["flux"], expect, rtol=0, atol=1e-6, equal_nan=True)
    usable = np.isfinite(aps.sum_aper_area.value)
    assert_allclose(tab["area"][usable], aps.sum_aper_area.value[usable], rtol=0, atol=1e-9)
    assert np.isfinite(tab["flux"][40]) and np.isnan(tab["flux"][41])
    assert tab["area"][41] == 0.0 and tab["masked_frac"][41] == 1.0  # fully masked
