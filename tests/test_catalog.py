"""Candidate catalog: columns, units, metadata, atomic writes, overwrite refusal, DS9."""

import os

import astropy.units as u
import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn.catalog import (
    CATALOG_COLUMNS,
    catalog_from_sources,
    make_catalog,
    read_catalog,
    write_catalog,
    write_ds9_regions,
)
from rtcnn.errors import RtcnnInputError
from rtcnn.io import sky_to_pixel
from rtcnn.postprocess import Sources


def tan_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [33.0, 17.0]
    w.wcs.crval = [359.9999, 2.0]  # straddles RA = 0
    w.wcs.cdelt = [-0.11 / 3600, 0.11 / 3600]
    return w


def small_catalog():
    return make_catalog(
        x=[3.25, 10.0, 40.5],
        y=[4.0, 20.75, 1.0],
        score=[0.6, 0.95, 0.2],
        dmag=[1.5, 0.25, np.nan],
        brightened=[True, False, True],
        wcs=tan_wcs(),
        meta={"ref": "pair/ref.fits", "new": "pair/new.fits", "model": "m.ckpt", "threshold": 0.1},
    )


def test_make_catalog_columns_units_meta_order():
    t = small_catalog()
    assert tuple(t.colnames) == CATALOG_COLUMNS
    assert t["x"].unit == u.pix and t["ra"].unit == u.deg and t["dmag"].unit == u.mag
    assert t["score"].unit is None and t["brightened"].dtype == bool
    assert_allclose(t["score"], [0.95, 0.6, 0.2])  # decreasing score
    assert_array_equal(t["brightened"], [False, True, True])
    assert t.meta["new"] == "pair/new.fits" and t.meta["model"] == "m.ckpt"
    assert t.meta["threshold"] == 0.1
    assert np.all((t["ra"] >= 0) & (t["ra"] < 360))
    x, y = sky_to_pixel(tan_wcs(), t["ra"], t["dec"])
    assert_allclose(x, t["x"], atol=1e-6)
    assert_allclose(y, t["y"], atol=1e-6)


def test_make_catalog_errors_and_empty():
    with pytest.raises(RtcnnInputError, match="different lengths"):
        make_catalog([1.0], [1.0, 2.0], [0.5], None, None, tan_wcs())
    with pytest.raises(RtcnnInputError, match="b/new.fits: no celestial WCS"):
        make_catalog([1.0], [1.0], [0.5], None, None, None, meta={"new": "b/new.fits"})
    t = make_catalog([], [], [], None, None, tan_wcs())
    assert len(t) == 0 and tuple(t.colnames) == CATALOG_COLUMNS
    src = Sources(np.array([1.0]), np.array([2.0]), np.array([0.7]), np.array([0.5]),
                  np.array([False]))  # fmt: skip
    t = catalog_from_sources(src, tan_wcs())
    assert t["x"][0] == 1.0 and not t["brightened"][0]


def test_write_read_round_trip(tmp_path):
    t = small_catalog()
    path = write_catalog(t, tmp_path / "c.ecsv")
    back = read_catalog(path)
    assert tuple(back.colnames) == CATALOG_COLUMNS
    for c in CATALOG_COLUMNS:
        assert back[c].unit == t[c].unit
        assert_allclose(np.asarray(back[c], float), np.asarray(t[c], float), equal_nan=True)
    assert back.meta["model"] == "m.ckpt"
    assert os.listdir(tmp_path) == ["c.ecsv"]  # no temporary file left behind


def test_overwrite_refused_and_allowed(tmp_path):
    path = tmp_path / "c.ecsv"
    path.write_text("precious\n")
    with pytest.raises(RtcnnInputError, match=r"c.ecsv: already exists; pass --overwrite"):
        write_catalog(small_catalog(), path)
    assert path.read_text() == "precious\n"
    with pytest.raises(RtcnnInputError, match="already exists"):
        write_ds9_regions(small_catalog(), path)
    write_catalog(small_catalog(), path, overwrite=True)
    assert len(Table.read(path)) == 3
    with pytest.raises(RtcnnInputError, match="output directory .* does not exist"):
        write_catalog(small_catalog(), tmp_path / "nope" / "c.ecsv")
    with pytest.raises(RtcnnInputError, match="is a directory"):
        write_catalog(small_catalog(), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["c.ecsv"]


def test_failed_write_leaves_nothing(tmp_path):
    t = small_catalog()
    t["bad"] = [object(), object(), object()]  # ECSV cannot serialise this
    with pytest.raises(Exception):
        write_catalog(t, tmp_path / "c.ecsv")
    assert os.listdir(tmp_path) == []


def test_read_catalog_errors(tmp_path):
    with pytest.raises(RtcnnInputError, match="nope.ecsv: no such file"):
        read_catalog(tmp_path / "nope.ecsv")
    bad = tmp_path / "bad.ecsv"
    bad.write_bytes(b"\x00\x01 not a table")
    with pytest.raises(RtcnnInputError, match="not a readable ECSV catalog"):
        read_catalog(bad)
    nopos = tmp_path / "nopos.ecsv"
    Table({"ra": [1.0], "dec": [2.0]}).write(nopos, format="ascii.ecsv")
    with pytest.raises(RtcnnInputError, match="catalog has no x/y column"):
        read_catalog(nopos)
    minimal = tmp_path / "min.ecsv"
    Table({"x": [1.0], "y": [2.0]}).write(minimal, format="ascii.ecsv")
    t = read_catalog(minimal)
    assert t["score"][0] == 1.0 and np.isnan(t["dmag"][0]) and t["brightened"][0]


def test_ds9_regions_one_based(tmp_path):
    path = write_ds9_regions(small_catalog(), tmp_path / "c.reg")
    lines = path.read_text().splitlines()
    assert lines[0] == "# Region file format: DS9 version 4.1"
    assert "image" in lines
    circles = [ln for ln in lines if ln.startswith("circle(")]
    assert circles[0] == "circle(11.000,21.750,3) # color=red text={0.95}"
    assert circles[1] == "circle(4.250,5.000,3) # color=green text={0.6}"
    assert len(circles) == 3
