"""Roman Level-2 ASDF images (romanisim, offline) through the same Image interface."""

import numpy as np
import pytest
from astropy.table import Table
from numpy.testing import assert_allclose
from photutils.centroids import centroid_2dg, centroid_sources

import galsim
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.time import Time

from rtcnn.errors import RtcnnInputError
from rtcnn.io import find_pairs, read_pair, read_truth, sky_to_pixel
from rtcnn.io.asdf import read_asdf_image, write_asdf_pair

N_PIX = 128  # px, romanisim.parameters.n_pix for the test (an SCA is 4088)
FILTER = "F158"
STAR_XY = np.array([[30.2, 40.7], [90.6, 30.1], [60.3, 95.8], [100.1, 100.4], [20.5, 110.2]])
STAR_MAG = np.array([19.0, 20.0, 20.5, 21.0, 19.5])  # AB
TRANSIENT_XY = (70.4, 60.7)  # px
TRANSIENT_MAG = 20.0  # AB
BAD_PIXELS = ((5, 7), (64, 12))  # (y, x) flagged DO_NOT_USE in the new image


def _catalog(imwcs, xy, mags):
    pos = [imwcs.toWorld(galsim.PositionD(x, y)) for x, y in xy]
    t = Table()
    t["ra"] = [p.ra.deg for p in pos]
    t["dec"] = [p.dec.deg for p in pos]
    t["type"] = ["PSF"] * len(xy)
    t["n"] = -1.0
    t["half_light_radius"] = 0.0
    t["pa"] = 0.0
    t["ba"] = 1.0
    t[FILTER] = 10 ** (-0.4 * np.asarray(mags))  # maggies
    return t


def _memoized(fn):
    """``fn`` with its results kept per arguments (romanisim recomputes its bandpasses,
    thinning GalSim tables, for every PSF: ~1 s each on a test machine)."""
    cache = {}

    def wrapper(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = fn(*args, **kwargs)
        return dict(cache[key])

    return wrapper


@pytest.fixture(scope="module")
def roman_files(tmp_path_factory):
    """ref.asdf: 5 stars (romanisim L2, galsim PSF, no CRDS); new.asdf: + a transient."""
    pytest.importorskip("romanisim")  # the test extra installs it; only these tests need it
    import asdf
    import roman_datamodels as rdm
    import romanisim.models.bandpass
    from roman_datamodels import dqflags
    import romanisim.psf
    from romanisim import image, util
    from romanisim.image import inject_sources_into_l2
    from romanisim.models import parameters
    from romanisim.models import wcs as rwcs

    out = tmp_path_factory.mktemp("roman")
    cached = _memoized(romanisim.models.bandpass.getBandpasses)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(parameters, "n_pix", N_PIX)
        mp.setattr(romanisim.models.bandpass, "getBandpasses", cached)
        mp.setattr(romanisim.psf, "getBandpasses", cached)
        coord = SkyCoord(270 * u.deg, 66 * u.deg)
        meta = util.default_image_meta(time=Time("2026-10-31T00:00:00"), filter_name=FILTER,
                                       coord=coord)
        rwcs.fill_in_parameters(meta, coord)
        imwcs = rwcs.get_wcs(meta, usecrds=False)
        stars = _catalog(imwcs, STAR_XY, STAR_MAG)
        # <= 100 point sources: romanisim draws each one (its fast path, with a galsim
        # PSF, tabulates a huge ePSF grid first)
        ref, _ = image.simulate(meta, stars, usecrds=False, psftype="galsim", level=2,
                                rng=galsim.BaseDeviate(3), crparam=None,
                                psf_keywords={"pupil_bin": 8})
        af = asdf.AsdfFile()
        af.tree = {"roman": ref}
        af.write_to(out / "ref.asdf")
        model = rdm.datamodels.ImageModel(ref)
        tr = _catalog(imwcs, [TRANSIENT_XY], [TRANSIENT_MAG])
        new = inject_sources_into_l2(model, tr, x=[TRANSIENT_XY[0]], y=[TRANSIENT_XY[1]],
                                     psftype="galsim", rng=galsim.BaseDeviate(5))
        for y, x in BAD_PIXELS:
            new.dq[y, x] |= dqflags.pixel["DO_NOT_USE"]
        new.save(out / "new.asdf")
    return out, stars, tr


def test_read_asdf_image(roman_files):
    out, stars, _ = roman_files
    img = read_asdf_image(out / "new.asdf")
    assert img.data.dtype == np.float32 and img.shape == (N_PIX, N_PIX)
    assert img.unit == "DN/s" and img.band == FILTER and img.exptime > 100
    assert img.header["WCSERR"] < 0.01 and img.header["SCA"] >= 1
    assert img.header["MJD-OBS"] == pytest.approx(Time("2026-10-31").mjd, abs=0.01)
    assert {tuple(p) for p in np.argwhere(img.mask)} == set(BAD_PIXELS)
    assert abs(np.median(img.data[~img.mask])) < 0.02 * img.header["SKYLEVEL"]
    # romanisim without CRDS leaves meta.photometry unset: no zero point unless given
    assert img.zeropoint is None
    assert read_asdf_image(out / "new.asdf", zeropoint=26.1).zeropoint == 26.1


def test_asdf_wcs_puts_stars_on_their_centroids(roman_files):
    """Catalog RA/Dec through the FITS-SIP WCS land on the stars within 0.1 px."""
    out, stars, _ = roman_files
    img = read_asdf_image(out / "ref.asdf")
    x, y = sky_to_pixel(img, stars["ra"], stars["dec"])
    cx, cy = centroid_sources(img.data, x, y, box_size=9, centroid_func=centroid_2dg)
    assert_allclose(cx, x, atol=0.1)
    assert_allclose(cy, y, atol=0.1)
    # the native gwcs agrees with the SIP fit (forward, 0-based)
    native = read_asdf_image(out / "ref.asdf", wcs="gwcs")
    a = native.wcs.pixel_to_world(STAR_XY[:, 0], STAR_XY[:, 1])
    b = img.wcs.pixel_to_world(STAR_XY[:, 0], STAR_XY[:, 1])
    assert np.all(a.separation(b).arcsec < 1e-3)


@pytest.mark.filterwarnings("ignore:meta.filename")
def test_asdf_zeropoint_from_photometry_metadata(roman_files, tmp_path):
    import roman_datamodels as rdm

    out, _, _ = roman_files
    model = rdm.open(out / "ref.asdf")
    model.meta.photometry.conversion_megajanskys = 0.5  # MJy/sr per DN/s
    model.meta.photometry.pixel_area = 2.8e-13  # sr
    model.save(tmp_path / "cal.asdf")
    img = read_asdf_image(tmp_path / "cal.asdf")
    # (meta values are stored as float32)
    assert img.zeropoint == pytest.approx(-2.5 * np.log10(0.5 * 2.8e-13 * 1e6 / 3631.0), abs=1e-4)
    assert img.zeropoint_source == "meta.photometry"


def test_asdf_pair_directory(roman_files, tmp_path):
    """Two ASDF files make a pair directory that the FITS pair readers accept."""
    out, _, tr = roman_files
    truth = tmp_path / "truth_in.ecsv"
    t = Table({"id": [1], "ra": tr["ra"], "dec": tr["dec"], "mag_new": [TRANSIENT_MAG],
               "kind": ["transient"]})
    t.write(truth)
    d = write_asdf_pair(out / "ref.asdf", out / "new.asdf", tmp_path / "pair", truth=truth)
    (pair,) = find_pairs(d)
    ref, new = read_pair(pair.ref, pair.new)
    assert ref.unit == new.unit == "DN/s" and ref.header["REPROJ"] == "none"
    got = read_truth(pair.truth, image=new)
    diff = new.filled() - ref.filled()
    iy, ix = np.unravel_index(np.argmax(diff), diff.shape)
    assert np.hypot(ix - got["x"][0], iy - got["y"][0]) <= 1.0
    cx, cy = centroid_sources(diff, got["x"], got["y"], box_size=9,
                              centroid_func=centroid_2dg)
    assert_allclose([cx[0], cy[0]], [got["x"][0], got["y"][0]], atol=0.1)


def test_asdf_errors(tmp_path):
    with pytest.raises(RtcnnInputError, match="file not found"):
        read_asdf_image(tmp_path / "missing.asdf")
    with pytest.raises(RtcnnInputError, match="wcs must be one of fits, gwcs"):
        read_asdf_image(tmp_path / "missing.asdf", wcs="sip")


def test_asdf_unreadable_file(tmp_path):
    pytest.importorskip("roman_datamodels")  # without it: "needs roman_datamodels"
    bad = tmp_path / "bad.asdf"
    bad.write_text("not asdf\n")
    with pytest.raises(RtcnnInputError, match="cannot be read as a Roman datamodel"):
        read_asdf_image(bad)
