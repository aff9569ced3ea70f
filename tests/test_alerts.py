"""Cutouts and LSST Avro alert packets (rtcnn.alerts): validated, round trip, bad inputs."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import Cutout2D
from astropy.table import Table
from astropy.wcs import WCS

from rtcnn.alerts import (
    alert_records,
    alert_schema,
    main,
    midpoint_mjd_tai,
    read_alerts,
    source_ids,
    write_alerts,
    write_cutouts,
)
from rtcnn.catalog import make_catalog, write_catalog
from rtcnn.errors import RtcnnInputError
from rtcnn.fluxes import FLAG_BITS, add_measurements
from rtcnn.io import Image

SIZE = 96  # px
SIGMA = 0.084  # e-/s per px
EXPTIME = 139.8  # s
ZP = 26.51
PROCESSED = 61600.25  # MJD TAI, fixed so that two runs give equal packets
POSITIONS = [(40.3, 50.7, 8.0), (70.0, 30.2, -5.0), (2.0, 60.0, 6.0)]  # x, y, e-/s (last: edge)


def _header(date: bool = True) -> fits.Header:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [9.5, -44.0]
    w.wcs.crpix = [SIZE / 2, SIZE / 2]
    w.wcs.cd = [[-0.11 / 3600, 0.0], [0.0, 0.11 / 3600]]
    h = w.to_header()
    h["BAND"] = "H158"
    h["EXPTIME"] = EXPTIME
    h["MAGZP"] = ZP
    h["SCA"] = 7
    h["BKGSIG"] = SIGMA
    if date:
        h["MJD-OBS"] = 61592.0
    return h


def _pair(date: bool = True):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ref = rng.normal(0, SIGMA, (SIZE, SIZE))
    new = rng.normal(0, SIGMA, (SIZE, SIZE))
    for x, y, f in POSITIONS:
        g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.9**2)) / (2 * np.pi * 0.9**2)
        if f > 0:
            new += f * g
        else:
            ref -= f * g
    h = _header(date)
    wcs = WCS(h)
    imgs = [Image.from_array(a.astype(np.float32), wcs=wcs, zeropoint=ZP, header=h.copy(),
                             band="H158", exptime=EXPTIME, path=name)
            for a, name in ((ref, "ref.fits"), (new, "new.fits"))]  # fmt: skip
    return imgs[0], imgs[1]


def _catalog(ref, new) -> Table:
    x, y, f = (np.array(v) for v in zip(*POSITIONS))
    table = make_catalog(x, y, np.array([0.9, 0.8, 0.7]), np.full(3, 1.0), f > 0, new.wcs,
                         {"model": "det.ckpt"})  # fmt: skip
    add_measurements(table, ref.filled(), new.filled(), wcs=new.wcs, zeropoint=ZP, band="H158",
                     sigma_diff=math.sqrt(2) * SIGMA, exptime=(EXPTIME, EXPTIME),
                     header=new.header)  # fmt: skip
    return table


def _float_fields(schema) -> set[str]:
    field = next(f for f in schema.definition["fields"] if f["name"] == "diaSource")
    return {f["name"] for f in field["type"]["fields"]
            if "float" in (f["type"] if isinstance(f["type"], list) else [f["type"]])}


def _same(a, b, single: bool) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, float):
        a = float(np.float32(a)) if single else a
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_newest_schema():
    """The schema used is the highest version directory the package ships."""
    from lsst.alert.packet import get_latest_schema_version, get_schema_root

    versions = [(int(a.name), int(b.name)) for a in get_schema_root().iterdir()
                if a.name.isdigit() for b in a.iterdir() if b.name.isdigit()]  # fmt: skip
    assert get_latest_schema_version() == max(versions)
    major, minor = max(versions)
    assert alert_schema().definition["name"] == f"lsst.v{major}_{minor}.alert"


def test_packets_validate_and_round_trip(tmp_path):
    """Every packet is written, read back with lsst-alert-packet's reader and equals what
    was written, field by field (floats to Avro's 32-bit precision)."""
    ref, new = _pair()
    table = _catalog(ref, new)
    schema = alert_schema()
    written = [r for r, _ in alert_records(table.copy(), ref, new, schema=schema,
                                           processed_mjd=PROCESSED)]  # fmt: skip
    paths = write_alerts(table, ref, new, tmp_path / "alerts", processed_mjd=PROCESSED)
    assert len(paths) == len(table) == 3
    singles = _float_fields(schema)
    for rec, path in zip(written, paths):
        assert path.name == f"{rec['diaSourceId']}.avro"
        (back,) = read_alerts(path)
        assert schema.validate(back)
        assert set(back) == set(rec)
        for key, value in rec.items():
            if key == "diaSource":
                assert set(back[key]) == set(value)
                for k, v in value.items():
                    assert _same(v, back[key][k], k in singles), (k, v, back[key][k])
            else:
                assert back[key] == value, key
        src = back["diaSource"]
        # time from MJD-OBS (UTC) + EXPTIME/2, in TAI (37 s ahead of UTC in 2027)
        assert src["midpointMjdTai"] == pytest.approx(61592.0 + (37 + EXPTIME / 2) / 86400,
                                                      abs=1e-7)  # fmt: skip
        assert src["band"] == "H158" and src["detector"] == 7
        assert src["diaObjectId"] is None and src["trailFlux"] is None
    # measurements went in: the faded source is negative, fluxes are nJy of the right size
    src = {int(r["diaSourceId"]): r["diaSource"] for r in written}
    row = table[np.argmin(np.abs(table["x"] - 70.0))]
    s = src[int(row["id"])]
    assert s["isNegative"] is True and s["psfFlux"] < 0
    assert s["psfFlux"] == pytest.approx(-5.0 * 10 ** (-0.4 * (ZP - 31.4)), rel=0.25)


def test_cutouts_wcs_variance_and_padding(tmp_path):
    """Three stamps with WCS and variance; the edge candidate's stamp is padded and
    flagged, not an error."""
    ref, new = _pair()
    table = _catalog(ref, new)
    table["flags"] = 0  # the edge bit must come from the padding
    paths = write_cutouts(table, ref, new, tmp_path / "cut", size=31)
    assert len(paths) == 3
    for row, path in zip(table, paths):
        with fits.open(path) as hdul:
            hdul.verify("exception")
            # the stamp WCS is the one astropy's Cutout2D gives (padded stamps too)
            ref_cut = Cutout2D(new.data, (row["x"], row["y"]), 31, wcs=new.wcs, mode="partial")
            for h in hdul[1:]:
                np.testing.assert_allclose(WCS(h.header).wcs.crpix, ref_cut.wcs.wcs.crpix)
            names = [h.name for h in hdul[1:]]
            assert names == ["REF", "REF_VARIANCE", "NEW", "NEW_VARIANCE", "DIFF",
                             "DIFF_VARIANCE"]  # fmt: skip
            for h in hdul[1:]:
                assert h.data.shape == (31, 31)
            w = WCS(hdul["NEW"].header)
            px, py = w.world_to_pixel_values(row["ra"], row["dec"])
            assert px == pytest.approx(15 + row["x"] - round(row["x"]), abs=1e-6)
            assert py == pytest.approx(15 + row["y"] - round(row["y"]), abs=1e-6)
            d = hdul["DIFF"].data
            np.testing.assert_allclose(d, hdul["NEW"].data - hdul["REF"].data, equal_nan=True)
            v = hdul["DIFF_VARIANCE"].data
            good = np.isfinite(v)
            assert np.all(v[good] >= 2 * SIGMA**2 * 0.999)
            padded = hdul[0].header["PADDED"]
            assert padded == (row["x"] < 15)
            assert np.isnan(d).any() == padded
            assert bool(row["flags"] & FLAG_BITS["edge"]) == padded
    # the stamp bytes of a packet carry the same WCS and a VARIANCE extension
    rec, _ = next(alert_records(table, ref, new, size=31))
    with fits.open(io.BytesIO(rec["cutoutDifference"])) as hdul:
        assert hdul[1].name == "VARIANCE" and WCS(hdul[0].header).has_celestial


def test_ids_are_deterministic():
    ref, new = _pair()
    a = source_ids(_catalog(ref, new), new.header)
    b = source_ids(_catalog(*_pair()), _pair()[1].header)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) == 3 and np.all(a > 0)


def test_header_without_date_gives_nan_time(tmp_path):
    """No date card: midpointMjdTai is NaN (the schema has no null), packets still valid."""
    ref, new = _pair(date=False)
    assert midpoint_mjd_tai(new.header) is None
    table = _catalog(ref, new)
    paths = write_alerts(table, ref, new, tmp_path / "a")
    (back,) = read_alerts(paths[0])
    assert math.isnan(back["diaSource"]["midpointMjdTai"])
    with pytest.raises(RtcnnInputError, match="DATE-OBS = 'yesterday' is not a date"):
        midpoint_mjd_tai(fits.Header([("DATE-OBS", "yesterday")]))


def test_bad_inputs(tmp_path, capsys):
    ref, new = _pair()
    table = _catalog(ref, new)
    # an existing --alerts directory without --overwrite
    (tmp_path / "a").mkdir()
    with pytest.raises(RtcnnInputError, match="already exists; pass --overwrite"):
        write_alerts(table, ref, new, tmp_path / "a")
    (tmp_path / "a" / "stale.avro").write_bytes(b"from an earlier run")
    assert len(write_alerts(table, ref, new, tmp_path / "a", overwrite=True)) == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(
        f"{i}.avro" for i in table["id"])  # replaced whole: no stale packet stays
    # a catalog without the measured columns: one line, exit 2
    del table["psf_flux"], table["flags"]
    with pytest.raises(RtcnnInputError, match=re.escape("lacks column(s) psf_flux, flags")):
        write_alerts(table, ref, new, tmp_path / "b")
    cat = tmp_path / "old.ecsv"
    write_catalog(table, cat)
    with pytest.raises(SystemExit) as exc:
        main([str(cat), "-o", str(tmp_path / "c")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"rtcnn: error: {cat}: catalog lacks column(s)")
    assert not Path(tmp_path / "c").exists()


def test_detect_writes_alerts_and_cutouts(small_pairs, tiny_detector_ckpt, tmp_path, capsys):
    """rtcnn.detect --alerts --cutouts on a simulated pair: one valid packet and one cutout
    file per catalog row, the catalog measured and pointing at its cutouts; a rerun without
    --overwrite is refused before any work, with --overwrite it gives the same IDs."""
    from rtcnn.detect import main as detect_main

    pair = small_pairs / "pair_0000"
    cat = tmp_path / "cat.ecsv"
    argv = [str(pair / "ref.fits"), str(pair / "new.fits"), "--ckpt", str(tiny_detector_ckpt),
            "-o", str(cat), "--threshold", "0.0", "--alerts", str(tmp_path / "alerts"),
            "--cutouts", "31", "--no-progress"]  # fmt: skip
    assert detect_main(argv) == 0
    table = Table.read(cat)
    assert len(table) > 0
    for name in ("psf_flux", "ap_flux_err", "snr", "ra_err", "flags", "reliability", "id"):
        assert name in table.colnames
    packets = sorted((tmp_path / "alerts").glob("*.avro"))
    assert {p.stem for p in packets} == {str(i) for i in table["id"]}
    schema = alert_schema()
    for p in packets:
        (rec,) = read_alerts(p)
        assert schema.validate(rec)
    assert table.meta["cutouts"] == "cat_cutouts"
    assert len(list((tmp_path / "cat_cutouts").glob("*.fits"))) == len(table)
    capsys.readouterr()
    other = [a if a != str(cat) else str(tmp_path / "other.ecsv") for a in argv]
    with pytest.raises(SystemExit) as exc:  # a fresh catalog, but the --alerts dir exists
        detect_main(other)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        f"rtcnn: error: {tmp_path / 'alerts'}: already exists; pass --overwrite to replace "
        "its contents")
    assert not (tmp_path / "other.ecsv").exists()
    assert detect_main([*argv, "--overwrite"]) == 0
    np.testing.assert_array_equal(Table.read(cat)["id"], table["id"])
