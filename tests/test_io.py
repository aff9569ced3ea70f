"""Tests of rtcnn.io: FITS images (HDU choice, zero point, WCS, lazy reads, atomic writes),
truth catalogs, pair finding, and one clear RtcnnInputError per bad input."""

from __future__ import annotations

import datetime
import logging
import os

import numpy as np
import pytest
from astropy import units as u
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn.errors import RtcnnInputError
from rtcnn.io import (
    ZEROPOINT_KEYWORDS,
    Image,
    PairFiles,
    find_pairs,
    header_zeropoint,
    pixel_to_sky,
    read_image,
    read_pair,
    read_truth,
    sky_to_pixel,
    write_image,
)

NY, NX = 40, 50  # px, small test image (ny, nx)
CRVAL = (150.0, 2.0)  # deg
CRPIX = (10.0, 20.0)  # FITS 1-based reference pixel (x, y)
SCALE = 0.11 / 3600  # deg/px, Roman pixel scale


def make_wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = CRVAL
    w.wcs.crpix = CRPIX
    w.wcs.cdelt = [-SCALE, SCALE]
    return w


def make_header(**cards) -> fits.Header:
    hdr = make_wcs().to_header()
    hdr["BUNIT"] = "electron/s"
    hdr["BAND"] = "H158"
    hdr["EXPTIME"] = 139.8
    hdr["MAGZP"] = 26.41
    for key, value in cards.items():
        if value is None:
            del hdr[key]
        else:
            hdr[key] = value
    return hdr


def make_data(seed: int = 0, shape=(NY, NX)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, shape).astype(np.float32)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.fits"
    fits.PrimaryHDU(make_data(), header=make_header()).writeto(path)
    return path


# ----------------------------------------------------------------------------- read_image


def test_read_image_basic(image_file):
    img = read_image(image_file)
    assert img.shape == (NY, NX)
    assert img.data.dtype.kind == "f" and img.data.dtype.itemsize == 4
    assert_array_equal(img.data, make_data())
    assert img.mask is None and img.masked_fraction == 0.0
    assert img.zeropoint == pytest.approx(26.41) and img.zeropoint_source == "MAGZP"
    assert (img.unit, img.band, img.exptime, img.hdu) == ("electron/s", "H158", 139.8, 0)
    assert img.path == image_file and img.wcs is not None


def test_read_image_is_memory_mapped_and_section_is_native(image_file):
    img = read_image(image_file)
    assert not img.data.flags.owndata  # a view of the file's memory map, not a copy
    tile = img.section(5, 7, 16)
    assert tile.shape == (16, 16) and tile.dtype == np.float32 and tile.dtype.isnative
    assert tile.flags.c_contiguous and tile.flags.writeable
    assert_array_equal(tile, make_data()[7:23, 5:21])
    assert_array_equal(img.section(0, 0, NX, NY), img.filled())
    with pytest.raises(ValueError, match="outside the 50x40 px image"):
        img.section(40, 0, 16)


def test_wcs_is_zero_based(image_file):
    """FITS CRPIX (1-based) = 0-based pixel CRPIX - 1 maps to CRVAL."""
    img = read_image(image_file)
    ra, dec = pixel_to_sky(img, CRPIX[0] - 1, CRPIX[1] - 1)
    assert_allclose([ra, dec], CRVAL, atol=1e-10)
    x, y = sky_to_pixel(img, [CRVAL[0]], [CRVAL[1]])
    assert_allclose([x[0], y[0]], [CRPIX[0] - 1, CRPIX[1] - 1], atol=1e-8)


def test_wcs_matches_galsim_roman(tmp_path):
    """A GalSim Roman TAN-SIP WCS written by GalSim (1-based) reads back 0-based."""
    galsim = pytest.importorskip("galsim")
    from galsim import roman

    world = galsim.CelestialCoord(10.0 * galsim.degrees, -30.0 * galsim.degrees)
    wcs = roman.getWCS(world_pos=world, SCAs=[7], date=datetime.datetime(2027, 1, 1))[7]
    im = galsim.ImageF(64, 48, wcs=wcs)
    im.write(str(tmp_path / "g.fits"))
    img = read_image(tmp_path / "g.fits")
    xs_g, ys_g = np.array([1.0, 20.3, 64.0]), np.array([1.0, 33.7, 48.0])  # GalSim 1-based
    ra = [wcs.toWorld(galsim.PositionD(x, y)).ra.deg for x, y in zip(xs_g, ys_g)]
    dec = [wcs.toWorld(galsim.PositionD(x, y)).dec.deg for x, y in zip(xs_g, ys_g)]
    x, y = sky_to_pixel(img, ra, dec)
    assert_allclose(x, xs_g - 1, atol=2e-3)
    assert_allclose(y, ys_g - 1, atol=2e-3)


def test_hdu_choice_sci_extension(tmp_path):
    path = tmp_path / "mef.fits"
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(np.ones((3, 3), np.float32), name="ERR"),
        fits.ImageHDU(make_data(), header=make_header(), name="SCI"),
    ]).writeto(path)
    img = read_image(path)
    assert img.hdu == 2 and img.shape == (NY, NX)
    assert read_image(path, hdu="err").shape == (3, 3)
    assert read_image(path, hdu=1).shape == (3, 3)


def test_hdu_choice_first_image_extension_and_squeeze(tmp_path):
    path = tmp_path / "ext.fits"
    cube1 = make_data()[None]  # NAXIS3 = 1 is an image
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"a": [1]})),
                  fits.ImageHDU(cube1)]).writeto(path)
    img = read_image(path)
    assert img.hdu == 2 and img.shape == (NY, NX)


def test_zeropoint_keyword_order():
    assert ZEROPOINT_KEYWORDS[0] == "MAGZP"
    hdr = fits.Header({"ZP": 20.0, "PHOTZP": 21.0, "MAGZPT": 22.0})
    assert header_zeropoint(hdr) == (22.0, "MAGZPT")
    del hdr["MAGZPT"]
    assert header_zeropoint(hdr) == (21.0, "PHOTZP")
    assert header_zeropoint(fits.Header({"MAGZP": "n/a", "ZP": 25.0})) == (25.0, "ZP")
    assert header_zeropoint(fits.Header({"OBJECT": "x"})) == (None, None)


def test_zeropoint_derived_keywords():
    # HST: 1 e-/s of PHOTFLAM=1e-19 erg/s/cm2/A at PHOTPLAM=15000 A
    zp, src = header_zeropoint(fits.Header({"PHOTFLAM": 1e-19, "PHOTPLAM": 15000.0}))
    assert src == "PHOTFLAM/PHOTPLAM"
    assert zp == pytest.approx(-2.5 * np.log10(1e-19) - 5 * np.log10(15000.0) - 2.408)
    # MJy/sr with the pixel solid angle of a 0.11" pixel: 1 MJy/sr -> F_nu in Jy
    pixar = (0.11 * u.arcsec).to_value(u.rad) ** 2
    zp, src = header_zeropoint(fits.Header({"BUNIT": "MJy/sr", "PIXAR_SR": pixar}))
    assert src == "PIXAR_SR"
    assert zp == pytest.approx((1e6 * pixar * u.Jy).to(u.ABmag).value, abs=1e-6)


def test_nan_pixels_are_masked_and_reported(tmp_path, caplog):
    data = make_data()
    data[:, :5] = np.nan  # a NaN-filled edge: 10 % of the pixels
    data[3, 30] = np.inf
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(data, header=make_header()).writeto(path)
    with caplog.at_level(logging.INFO, logger="rtcnn.io.fits"):
        img = read_image(path)
    assert img.mask is not None and img.mask.sum() == 5 * NY + 1
    assert img.masked_fraction == pytest.approx((5 * NY + 1) / (NX * NY))
    assert "10.1% of pixels are NaN/inf and masked" in caplog.text
    tile = img.section(0, 0, 8)
    assert np.isfinite(tile).all() and (tile[:, :5] == 0).all()


def test_read_pair(tmp_path, image_file):
    other = tmp_path / "new.fits"
    fits.PrimaryHDU(make_data(1), header=make_header()).writeto(other)
    ref, new = read_pair(image_file, other)
    assert ref.shape == new.shape == (NY, NX)


def test_write_image_atomic_and_no_overwrite(tmp_path):
    path = tmp_path / "out.fits"
    write_image(path, make_data(), make_header())
    img = read_image(path)
    assert_array_equal(img.data, make_data())
    assert img.zeropoint == pytest.approx(26.41) and img.wcs is not None
    with pytest.raises(RtcnnInputError, match=r"out.fits: already exists; pass --overwrite to replace it"):
        write_image(path, make_data(1))
    assert_array_equal(read_image(path).data, make_data())  # untouched
    write_image(path, make_data(2), {"MAGZP": 25.0}, overwrite=True)
    assert_array_equal(read_image(path).data, make_data(2))
    assert sorted(os.listdir(tmp_path)) == ["out.fits"]  # no temporary files left


def test_image_from_array():
    data = make_data()
    data[0, 0] = np.nan
    img = Image.from_array(data, zeropoint=26.0)
    assert img.masked_fraction == pytest.approx(1 / (NX * NY))
    with pytest.raises(RtcnnInputError, match="needed to convert RA/Dec to pixels|no WCS"):
        sky_to_pixel(img, [1.0], [2.0])


# ----------------------------------------------------------------------------- bad images


def _truncated(tmp_path, cut):
    good = tmp_path / "good.fits"
    fits.PrimaryHDU(make_data(), header=make_header()).writeto(good)
    raw = good.read_bytes()
    bad = tmp_path / "bad.fits"
    bad.write_bytes(raw[:cut(len(raw))])
    return bad


def _written(name, content: bytes):
    def make(tmp_path):
        (tmp_path / name).write_bytes(content)
        return tmp_path / name
    return make


BAD_IMAGES = {
    "missing file": (lambda t: t / "nope.fits", r"nope.fits: file not found"),
    "directory": (lambda t: t, r"is a directory, not a FITS file"),
    "empty file": (_written("e.fits", b""), r"e.fits: empty file, not a FITS file"),
    "not FITS": (_written("n.fits", b"ra,dec\n1,2\n"),
                 r"n.fits: not a FITS file \(it does not start with a SIMPLE card\)"),
    "truncated data": (lambda t: _truncated(t, lambda n: 2880 + 1000),
                       r"bad.fits: truncated FITS file: HDU PRIMARY needs 10880 bytes, "
                       r"the file has 3880"),
    "truncated header": (lambda t: _truncated(t, lambda n: 1000),
                         r"bad.fits: truncated or corrupt FITS file"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_files(tmp_path, case):
    make, message = BAD_IMAGES[case]
    path = make(tmp_path)
    with pytest.raises(RtcnnInputError, match=message) as info:
        read_image(path)
    assert info.value.path is not None and len(str(info.value).splitlines()) == 1


def test_no_image_hdu(tmp_path):
    path = tmp_path / "table.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU(Table({"a": [1, 2]}), name="CAT")]
                 ).writeto(path)
    with pytest.raises(RtcnnInputError,
                       match=r"table.fits: has no 2-D image HDU \(HDUs: 0:PRIMARY \(empty\), "
                             r"1:CAT \(table\)\)"):
        read_image(path)
    with pytest.raises(RtcnnInputError, match=r"HDU 1 is a table, not an image"):
        read_image(path, hdu="CAT")
    with pytest.raises(RtcnnInputError, match=r"has no HDU named 'SCI'"):
        read_image(path, hdu="SCI")
    with pytest.raises(RtcnnInputError, match=r"has no HDU 7"):
        read_image(path, hdu=7)


def test_3d_image(tmp_path):
    path = tmp_path / "cube.fits"
    fits.PrimaryHDU(np.zeros((3, NY, NX), np.float32)).writeto(path)
    with pytest.raises(RtcnnInputError,
                       match=r"cube.fits: image HDU 0 is 3-D \(shape 50 x 40 x 3 px\); "
                             r"rtcnn needs a 2-D image"):
        read_image(path)


def test_all_nan_image(tmp_path):
    path = tmp_path / "nan.fits"
    fits.PrimaryHDU(np.full((NY, NX), np.nan, np.float32)).writeto(path)
    with pytest.raises(RtcnnInputError, match=r"nan.fits: every pixel is NaN or inf"):
        read_image(path)


def test_shape_mismatch(tmp_path, image_file):
    other = tmp_path / "new.fits"
    fits.PrimaryHDU(make_data(shape=(NY, NX + 1))).writeto(other)
    with pytest.raises(RtcnnInputError,
                       match=r"new.fits: shape 51 x 40 px does not match the reference "
                             r"50 x 40 px \(.*img.fits\)"):
        read_pair(image_file, other)


# ----------------------------------------------------------------------------- catalogs


def _truth_table():
    t = Table()
    t["id"] = [1, 2, 3]
    t["x"] = [3.25, 40.0, 12.5] * u.pix
    t["y"] = [4.0, 30.5, 39.0] * u.pix
    t["mag_ref"] = MaskedColumn([21.0, 22.0, 0.0], mask=[False, False, True])
    t["mag_new"] = [20.0, 23.0, 22.5]
    t["kind"] = ["variable", "variable", "transient"]
    return t


def test_read_truth_ecsv(tmp_path, image_file):
    path = tmp_path / "truth.ecsv"
    _truth_table().write(path)
    img = read_image(image_file)
    t = read_truth(path, img)
    assert_allclose(t["x"], [3.25, 40.0, 12.5])
    assert t["x"].unit == u.pix and list(t["on_image"]) == [True, True, True]
    assert t["mag_ref"].mask.tolist() == [False, False, True]
    ra, dec = pixel_to_sky(img, 3.25, 4.0)
    assert_allclose([t["ra"][0], t["dec"][0]], [ra, dec])  # added from the WCS
    assert len(read_truth(path)) == 3  # no image: no footprint check


def test_read_truth_radec_through_wcs(tmp_path, image_file):
    img = read_image(image_file)
    xs, ys = np.array([0.0, 17.3, 49.4]), np.array([0.0, 8.8, 39.4])
    ra, dec = pixel_to_sky(img, xs, ys)
    path = tmp_path / "cat.csv"
    Table({"RA": ra, "Dec": dec, "mag": [20, 21, 22]}).write(path)
    t = read_truth(path, img)
    assert_allclose(t["x"], xs, atol=1e-6)
    assert_allclose(t["y"], ys, atol=1e-6)


def test_read_truth_one_based_columns(tmp_path, image_file):
    path = tmp_path / "sex.fits"
    Table({"X_IMAGE": [1.0, 10.5], "Y_IMAGE": [1.0, 2.0]}).write(path)
    t = read_truth(path)
    assert_allclose(t["x"], [0.0, 9.5])
    assert_allclose(t["y"], [0.0, 1.0])
    meta = Table({"x": [1.0], "y": [2.0]}, meta={"pixel_origin": 1})
    meta.write(tmp_path / "m.ecsv")
    assert_allclose([read_truth(tmp_path / "m.ecsv")["x"][0]], [0.0])


def test_read_truth_text_with_header(tmp_path):
    path = tmp_path / "cat.txt"
    path.write_text("# a comment\nid x y mag\n1 10.5 20.25 21.0\n2 3 4 22\n")
    t = read_truth(path)
    assert_allclose(t["y"], [20.25, 4.0])


def test_empty_catalog_is_valid(tmp_path, image_file):
    path = tmp_path / "truth.ecsv"
    _truth_table()[:0].write(path)
    t = read_truth(path, read_image(image_file))
    assert len(t) == 0 and {"x", "y", "on_image"} <= set(t.colnames)


def test_partly_off_image(tmp_path, image_file):
    t = _truth_table()
    t["x"][1] = 500.0
    t.write(tmp_path / "t.ecsv")
    out = read_truth(tmp_path / "t.ecsv", read_image(image_file))
    assert list(out["on_image"]) == [True, False, True]


def test_catalog_entirely_off_image(tmp_path, image_file):
    t = _truth_table()
    t["x"] = [100.0, 200.0, -3.0]
    t.write(tmp_path / "t.ecsv")
    with pytest.raises(RtcnnInputError,
                       match=r"t.ecsv: all 3 positions fall outside the 50 x 40 px image "
                             r".*img.fits \(x in \[-3.0, 200.0\], y in \[4.0, 39.0\] px\)"):
        read_truth(tmp_path / "t.ecsv", read_image(image_file))


def test_catalog_without_positions(tmp_path):
    Table({"id": [1], "mag": [20.0]}).write(tmp_path / "t.ecsv")
    with pytest.raises(RtcnnInputError,
                       match=r"t.ecsv: has no position columns \(need x, y or ra, dec; "
                             r"found: id, mag\)"):
        read_truth(tmp_path / "t.ecsv")


def test_catalog_radec_without_wcs(tmp_path):
    Table({"ra": [150.0], "dec": [2.0]}).write(tmp_path / "t.ecsv")
    path = tmp_path / "nowcs.fits"
    fits.PrimaryHDU(make_data()).writeto(path)
    with pytest.raises(RtcnnInputError,
                       match=r"nowcs.fits: the header has no celestial WCS; a WCS is needed "
                             r"to convert the RA/Dec of .*t.ecsv to pixels"):
        read_truth(tmp_path / "t.ecsv", read_image(path))
    with pytest.raises(RtcnnInputError, match=r"t.ecsv: has RA/Dec but no x/y columns"):
        read_truth(tmp_path / "t.ecsv")


def test_catalog_bad_files(tmp_path):
    with pytest.raises(RtcnnInputError, match=r"t.ecsv: file not found"):
        read_truth(tmp_path / "t.ecsv")
    (tmp_path / "e.ecsv").write_text("")
    with pytest.raises(RtcnnInputError, match=r"e.ecsv: empty file, not a catalog"):
        read_truth(tmp_path / "e.ecsv")
    (tmp_path / "g.ecsv").write_text("# %ECSV 1.0\n# ---\n# garbage: [\n")
    with pytest.raises(RtcnnInputError, match=r"g.ecsv: cannot be read as a ascii.ecsv table"):
        read_truth(tmp_path / "g.ecsv")
    fits.PrimaryHDU(make_data()).writeto(tmp_path / "img.fits")
    with pytest.raises(RtcnnInputError, match=r"img.fits: FITS file has no table HDU"):
        read_truth(tmp_path / "img.fits")


# ----------------------------------------------------------------------------- find_pairs


def _touch_pair(d, ref=True, new=True, truth=True):
    d.mkdir(parents=True)
    for name, flag in (("ref.fits", ref), ("new.fits", new), ("truth.ecsv", truth)):
        if flag:
            (d / name).write_bytes(b"")


def test_find_pairs_directory(tmp_path):
    _touch_pair(tmp_path / "pair_0001", truth=False)
    _touch_pair(tmp_path / "pair_0000")
    _touch_pair(tmp_path / "pair_0002", new=False)
    (tmp_path / "notes").mkdir()
    pairs = find_pairs(tmp_path)
    assert [p.name for p in pairs] == ["pair_0000", "pair_0001", "pair_0002"]
    assert pairs[0] == PairFiles(tmp_path / "pair_0000" / "ref.fits",
                                 tmp_path / "pair_0000" / "new.fits",
                                 tmp_path / "pair_0000" / "truth.ecsv", "pair_0000")
    assert pairs[1].truth is None
    assert not pairs[2].new.exists()  # listed, so that reading it names the missing file
    assert [p.name for p in find_pairs(tmp_path / "pair_0001")] == ["pair_0001"]
    assert [p.name for p in find_pairs(str(tmp_path / "pair_000[01]"))] == [
        "pair_0000", "pair_0001"]
    assert len(find_pairs(str(tmp_path / "*" / "new.fits"))) == 2


def test_find_pairs_nested_names_unique(tmp_path):
    _touch_pair(tmp_path / "a" / "p")
    _touch_pair(tmp_path / "b" / "p")
    assert [p.name for p in find_pairs(tmp_path)] == ["a/p", "b/p"]


def test_find_pairs_errors(tmp_path):
    with pytest.raises(RtcnnInputError, match=r"nope: no such file or directory"):
        find_pairs(tmp_path / "nope")
    with pytest.raises(RtcnnInputError, match=r"no image pairs found \(expected ref.fits and "
                                              r"new.fits"):
        find_pairs(tmp_path)
    with pytest.raises(RtcnnInputError, match=r"no image pairs found"):
        find_pairs(str(tmp_path / "x*"))


# --------------------------------------------------------------------------- issue 20
# Inputs read wrong or refused wrongly: scaled integers, 1-plane cubes with SIP, a singular
# CD matrix, a DQ extension placed first.
def test_scaled_integer_images_are_converted(tmp_path):
    raw = np.random.default_rng(1).integers(0, 65535, (NY, NX)).astype(np.uint16)
    path = tmp_path / "u16.fits"
    fits.PrimaryHDU(raw, header=make_header()).writeto(path)  # BITPIX 16, BZERO 32768
    assert fits.getheader(path)["BZERO"] == 32768
    img = read_image(path)
    assert img.data.dtype == np.float32 and img.shape == (NY, NX)
    assert_array_equal(img.data, raw.astype(np.float32))
    assert img.wcs is not None and img.zeropoint == 26.41

    values = make_data(2)
    hdu = fits.PrimaryHDU(values.copy(), header=make_header())
    hdu.scale("int16", bscale=1e-4, bzero=0.0)
    hdu.writeto(tmp_path / "i16.fits")
    assert fits.getheader(tmp_path / "i16.fits")["BSCALE"] == 1e-4
    img = read_image(tmp_path / "i16.fits")
    assert img.data.dtype == np.float32
    assert_allclose(img.data, values, atol=0.6e-4)


def test_one_plane_cube_with_sip_reads_its_wcs(tmp_path):
    hdr = make_header()
    sip = WCS(hdr)
    sip.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    from astropy.wcs import Sip

    a = np.zeros((3, 3))
    b = np.zeros((3, 3))
    a[2, 0], b[0, 2] = 1e-6, -2e-6
    sip.sip = Sip(a, b, None, None, sip.wcs.crpix)
    hdr.update(sip.to_header(relax=True))
    path2, path3 = tmp_path / "plane.fits", tmp_path / "cube.fits"
    fits.PrimaryHDU(make_data(), header=hdr).writeto(path2)
    fits.PrimaryHDU(make_data()[None], header=hdr).writeto(path3)
    assert fits.getheader(path3)["NAXIS"] == 3
    flat, cube = read_image(path2), read_image(path3)
    assert cube.wcs is not None, cube.wcs_problem
    assert cube.wcs.sip is not None
    x, y = np.array([0.0, 17.0, NX - 1.0]), np.array([0.0, 30.0, NY - 1.0])
    assert_allclose(np.array(pixel_to_sky(cube, x, y)), np.array(pixel_to_sky(flat, x, y)),
                    rtol=0, atol=1e-12)


@pytest.mark.parametrize("cd", [(0.0, 0.0, 0.0, 0.0), (1e-5, 2e-5, 1e-5, 2e-5)],
                         ids=["zero", "singular"])
def test_singular_cd_matrix_gives_no_wcs(tmp_path, cd):
    hdr = make_header()
    for key in ("CDELT1", "CDELT2"):
        hdr.remove(key, ignore_missing=True)
    for key, value in zip(("CD1_1", "CD1_2", "CD2_1", "CD2_2"), cd):
        hdr[key] = value
    path = tmp_path / "bad.fits"
    fits.PrimaryHDU(make_data(), header=hdr).writeto(path)
    img = read_image(path)
    assert img.wcs is None
    assert "singular" in img.wcs_problem
    with pytest.raises(RtcnnInputError, match=r"bad\.fits: the header WCS is unusable "
                       r"\(its CD/PC matrix is singular\); a WCS is needed"):
        pixel_to_sky(img, [1.0], [2.0])


def test_dq_extension_first_is_not_the_image(tmp_path, caplog):
    path = tmp_path / "dqfirst.fits"
    sci = make_data()
    fits.HDUList([
        fits.PrimaryHDU(),
        fits.ImageHDU(np.zeros((NY, NX), np.int32), name="DQ"),
        fits.ImageHDU(sci, header=make_header(), name="IMAGE"),
    ]).writeto(path)
    img = read_image(path)
    assert img.hdu == 2
    assert_array_equal(img.data, sci)
    # the primary HDU holding the DQ plane, the image in an extension named SCI
    path = tmp_path / "dqprimary.fits"
    fits.HDUList([
        fits.PrimaryHDU(np.zeros((NY, NX), np.int16)),
        fits.ImageHDU(sci, header=make_header(), name="SCI"),
    ]).writeto(path)
    assert read_image(path).hdu == 1


def test_constant_image_is_read_with_a_warning(tmp_path, caplog):
    path = tmp_path / "flat.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((NY, NX), np.int32), name="DQ")]
                 ).writeto(path)
    with caplog.at_level(logging.WARNING, logger="rtcnn.io.fits"):
        img = read_image(path)
    assert img.hdu == 1
    assert any(r.levelno == logging.WARNING and f"{path}: the image (HDU 1:DQ) is constant "
               "(every pixel 0)" in r.getMessage() for r in caplog.records), caplog.text


def test_pixel_to_sky_takes_an_image_or_a_wcs(image_file):
    """One pixel <-> sky pair of functions: an Image or a WCS, 0-based, RA in [0, 360)."""
    img = read_image(image_file)
    x, y = np.array([0.0, CRPIX[0] - 1, NX - 1.0]), np.array([0.0, CRPIX[1] - 1, NY - 1.0])
    ra, dec = pixel_to_sky(img.wcs, x, y)
    assert_allclose(np.array(pixel_to_sky(img, x, y)), np.array([ra, dec]), rtol=0, atol=0)
    assert_allclose([ra[1], dec[1]], CRVAL, atol=1e-12)  # CRPIX - 1 is the reference pixel
    assert np.all((ra >= 0) & (ra < 360))
    assert_allclose(np.array(sky_to_pixel(img.wcs, ra, dec)), np.array([x, y]), atol=1e-8)
    assert [a.shape for a in pixel_to_sky(img.wcs, [], [])] == [(0,), (0,)]
    with pytest.raises(RtcnnInputError, match=r"^new.fits: no celestial WCS in the header"):
        pixel_to_sky(None, x, y, path="new.fits")
