"""rtcnn.score on hand-built truth/catalog pairs: exactly known numbers."""

import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn import score
from rtcnn.score import (
    SCA_AREA,
    change_magnitude,
    evaluate,
    fit_m50,
    m50_binned,
    match,
    oracle_m50,
    pair_score,
    sweep,
)

SIDE = 2044  # px: a quarter of a 4088x4088 SCA, so FP per SCA = 4 x false positives


def hand_truth():
    """8 transients T0..T7 (absent from the reference) and 2 variables V0, V1."""
    x = np.array([100, 200, 300, 400, 500, 600, 700, 800, 900, 1000], float)
    y = np.full(10, 50.0)
    mag_new = np.array([20.0, 21.0, 22.0, 23.0, 24.0, 25.0, 26.0, 27.0, 21.5, 22.0])
    mag_ref = np.ma.masked_array([0.0] * 8 + [22.0, 21.0], mask=[True] * 8 + [False] * 2)
    t = Table()
    t["id"] = np.arange(10)
    t["x"], t["y"] = x, y
    t["mag_ref"] = MaskedColumn(mag_ref)
    t["mag_new"] = mag_new
    t["kind"] = ["transient"] * 8 + ["variable"] * 2
    t["snr"] = [50.0, 40.0, 30.0, 20.0, 10.0, 6.0, 4.0, 3.0, 30.0, 30.0]
    return t


def hand_catalog():
    """7 matches (T0-T4, T6 at known offsets; V0) and 2 false positives."""
    dx = [0.1, 0.2, 0.3, 0.4, 0.6, 1.5]  # T0, T1, T2, T3, T4, T6
    x = [100 + dx[0], 200 + dx[1], 300 + dx[2], 400, 500, 700, 900.0, 1500.0, 1600.0]
    y = [50.0, 50.0, 50.0, 50 + dx[3], 50 - dx[4], 50 + dx[5], 50.5, 50.0, 10.0]
    return Table({
        "x": x, "y": y,
        "score": [0.99, 0.98, 0.97, 0.96, 0.95, 0.6, 0.9, 0.3, 0.7],
        "dmag": [np.nan] * 6 + [0.7, np.nan, np.nan],  # V0: truth |22.0 - 21.5| = 0.5
        "brightened": [True] * 6 + [True, True, False],
    }, meta={"image_shape": [SIDE, SIDE]})  # fmt: skip


def test_exact_numbers():
    p = pair_score("p", hand_catalog(), hand_truth(), SIDE * SIDE)
    r = evaluate([p])
    assert r["n_transients"] == 8 and r["n_detections"] == 9
    assert r["n_matched"] == 6 and r["n_false"] == 2
    assert r["completeness"] == 6 / 8
    assert r["completeness_snr"] == 5 / 6  # S/N >= 5: T0..T5, T5 missed
    assert r["n_snr"] == 6
    assert r["fp_per_sca"] == 2 * 4  # 2 false positives on a quarter SCA
    assert r["purity"] == 1 - 2 / 9
    assert_allclose(r["loc_median_px"], 0.35)  # median of 0.1 0.2 0.3 0.4 0.6 1.5
    assert r["loc_within_half_px"] == 4 / 6
    assert_allclose(r["dmag_median_abs_err"], 0.2)  # only V0 has both dmags
    assert r["n_dmag"] == 1
    assert r["sign_accuracy"] == 1.0
    # a score cut at 0.65 drops T6's detection (0.6) and the 0.3 false positive
    r = evaluate([p], threshold=0.65)
    assert (r["n_detections"], r["n_matched"], r["n_false"]) == (7, 5, 1)
    assert r["fp_per_sca"] == 4.0 and r["purity"] == 1 - 1 / 7
    # the same pair twice: the same fractions, twice the area
    r2 = evaluate([p, p])
    assert r2["fp_per_sca"] == 8.0 and r2["completeness"] == 0.75 and r2["area_px"] == 2 * SIDE**2


def test_oracle_m50_is_the_magnitude_where_the_true_snr_crosses_the_cut():
    """S/N = 5 at mag 25, x2.512 per magnitude: the S/N >= X oracle's m50 sits where the
    S/N crosses X (a step in completeness); variables and a missing S/N column are ignored."""
    n = 400
    mag = np.linspace(22.0, 28.0, n)
    t = Table()
    t["x"], t["y"] = np.linspace(10, 2000, n), np.full(n, 100.0)
    t["mag_ref"] = MaskedColumn(np.zeros(n), mask=np.ones(n, bool))  # absent: transients
    t["mag_new"] = mag
    t["kind"] = ["transient"] * (n - 1) + ["variable"]
    t["snr"] = 5.0 * 10 ** (-0.4 * (mag - 25.0))
    empty = Table({"x": [0.0], "y": [0.0], "score": [0.1], "dmag": [np.nan],
                   "brightened": [True]}, meta={"image_shape": [SIDE, SIDE]})  # fmt: skip
    p = pair_score("p", empty, t, SIDE * SIDE)
    got = oracle_m50([p], (4.0, 5.0, 6.0))
    for level, value in got.items():
        expect = 25.0 - 2.5 * math.log10(float(level) / 5.0)
        assert abs(value - expect) < 0.03, level
    t.remove_column("snr")
    assert all(np.isnan(v) for v in oracle_m50([pair_score("p", empty, t, SIDE**2)]).values())


def test_hungarian_beats_greedy():
    # D0 is closest to T_a, but only the assignment D0-T_b, D1-T_a matches both
    truth = np.array([[10.0, 10.0], [10.6, 10.0]])  # T_a, T_b
    det = np.array([[10.0, 10.5], [8.7, 10.6]])  # D0 0.5 from T_a, D1 1.43 from T_a only
    di, ti = match(det, truth, radius=1.5)
    assert sorted(zip(di.tolist(), ti.tolist())) == [(0, 1), (1, 0)]
    di, ti = match(det, truth, radius=0.2)
    assert di.size == 0
    assert match(np.zeros((0, 2)), truth)[0].size == 0


def test_change_magnitude():
    m = change_magnitude(np.array([np.nan, 20.0, 21.0, np.nan]), np.array([22.0, 21.0, 20.0, np.nan]))
    assert_allclose(m[0], 22.0)
    assert_allclose(m[1], -2.5 * np.log10(10**-8 - 10**-8.4))
    assert_allclose(m[2], m[1])
    assert np.isnan(m[3])


def test_fit_m50_recovers_logistic():
    rng = np.random.default_rng(0)
    mag = rng.uniform(20, 28, 20000)
    c, m0, w = 0.95, 25.0, 0.3
    p = c / (1 + np.exp((mag - m0) / w))
    det = rng.uniform(size=mag.size) < p
    fit = fit_m50(mag, det)
    truth_m50 = m0 + w * math.log(2 * c - 1)
    assert abs(fit["m50"] - truth_m50) < 0.03
    assert abs(fit["c_max"] - c) < 0.01 and abs(fit["width"] - w) < 0.03
    assert np.isnan(fit_m50(mag[:5], det[:5])["m50"])  # too few objects
    assert np.isnan(fit_m50(mag, np.zeros(mag.size, bool))["m50"])


def test_m50_binned():
    curve = {"lo": np.array([20.0, 21, 22, 23]), "hi": np.array([21.0, 22, 23, 24]),
             "completeness": np.array([1.0, 0.8, 0.2, 0.0])}  # fmt: skip
    assert_allclose(m50_binned(curve), 21.5 + 0.5)  # 0.8 -> 0.2 between 21.5 and 22.5
    curve["completeness"] = np.array([1.0, 0.9, 0.8, 0.7])
    assert np.isnan(m50_binned(curve))


def test_sweep_picks_deepest_m50_within_budget():
    rng = np.random.default_rng(1)
    mag = rng.uniform(20, 28, 400)
    t = Table({"x": np.arange(400) * 10.0, "y": np.full(400, 5.0), "mag_new": mag,
               "kind": ["transient"] * 400})  # fmt: skip
    snr = 10 ** (-0.4 * (mag - 25.0)) * 5  # S/N 5 at mag 25
    found = snr * rng.lognormal(0, 0.2, 400) > 3
    n_fp = 40
    cat = Table({
        "x": np.r_[t["x"][found], 10 * np.arange(n_fp) + 5.0],
        "y": np.r_[np.full(found.sum(), 5.0), np.full(n_fp, 500.0)],
        "score": np.r_[snr[found], np.linspace(3.0, 8.0, n_fp)],
        "brightened": np.ones(found.sum() + n_fp, bool),
    })  # fmt: skip
    p = pair_score("p", cat, t, SCA_AREA)  # one full SCA: FP/SCA = false positives
    res = sweep([p], budget=10)
    assert res["fp_per_sca"] <= 10
    assert 6.5 < res["threshold"] < 7.0  # the 11th-highest FP score is 6.72
    at = evaluate([p], threshold=res["threshold"])
    assert at["n_false"] <= 10 and at["m50"] == pytest.approx(res["m50"])
    looser = evaluate([p], threshold=res["threshold"] - 0.2)
    assert looser["fp_per_sca"] > 10


def write_pair(tmp_path, name="pair_0000"):
    d = tmp_path / "data" / name
    d.mkdir(parents=True)
    for img in ("ref.fits", "new.fits"):  # find_pairs looks for the images; score checks
        # that the truth lies on them (x <= 1000, y = 50 px)
        fits.PrimaryHDU(np.zeros((64, 1100), np.float32)).writeto(d / img)
    hand_truth().write(d / "truth.ecsv", format="ascii.ecsv")
    hand_catalog().write(d / "cat.ecsv", format="ascii.ecsv")
    c2 = hand_catalog()[:5]
    c2.meta = {"image_shape": [SIDE, SIDE]}
    c2.write(d / "other.ecsv", format="ascii.ecsv")
    return d


def test_cli_one_pair_and_many(tmp_path, capsys):
    d = write_pair(tmp_path)
    out = tmp_path / "s.json"
    assert score.main([str(d / "cat.ecsv"), str(d / "other.ecsv"), "--truth",
                       str(d / "truth.ecsv"), "--json", str(out), "--plot",
                       str(tmp_path / "c.png")]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "compl_snr5" in text and "m50@budget" in text
    res = json.loads(out.read_text())
    cat = res["methods"]["cat"]["at_threshold"]
    assert cat["completeness"] == 0.75 and cat["fp_per_sca"] == 8.0
    assert res["methods"]["other"]["at_threshold"]["n_false"] == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    # many pairs: the same pair under two names → same fractions, area doubled
    write_pair(tmp_path, "pair_0001")
    assert score.main(["cat.ecsv", "--data", str(tmp_path / "data"), "--json", str(out),
                       "--overwrite", "--label", "mine"]) == 0  # fmt: skip
    res = json.loads(out.read_text())["methods"]["mine"]["at_threshold"]
    assert res["n_pairs"] == 2 and res["completeness"] == 0.75 and res["fp_per_sca"] == 8.0
    # positional CATALOG TRUTH pairs: one method over both pairs
    d1 = tmp_path / "data" / "pair_0001"
    assert score.main([str(d / "cat.ecsv"), str(d / "truth.ecsv"), str(d1 / "cat.ecsv"),
                       str(d1 / "truth.ecsv"), "--json", str(out), "--overwrite"]) == 0
    res = json.loads(out.read_text())["methods"]["cat"]["at_threshold"]
    assert res["n_pairs"] == 2 and res["n_false"] == 4 and res["fp_per_sca"] == 8.0
    # a {pair} template reaches catalogs outside the pair directories
    assert score.main([str(tmp_path / "data" / "{pair}" / "other.ecsv"), "--data",
                       str(tmp_path / "data")]) == 0  # fmt: skip


def test_cli_errors(tmp_path, capsys):
    d = write_pair(tmp_path)
    out = tmp_path / "s.json"
    out.write_text("keep")
    with pytest.raises(SystemExit) as exc:
        score.main([str(d / "cat.ecsv"), "--truth", str(d / "truth.ecsv"), "--json", str(out)])
    assert exc.value.code == 2
    assert "s.json: already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "keep"
    with pytest.raises(SystemExit):
        score.main([str(d / "nope.ecsv"), "--truth", str(d / "truth.ecsv")])
    assert "nope.ecsv: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score.main([str(d / "cat.ecsv")])
    assert "give CATALOG TRUTH pairs, or catalogs with --truth" in capsys.readouterr().err
    # no image_shape and no FITS beside the truth: the area is unknown unless --shape
    c = hand_catalog()
    c.meta = {}
    c.write(d / "noshape.ecsv", format="ascii.ecsv")
    for img in ("ref.fits", "new.fits"):
        (d / img).unlink()
    with pytest.raises(SystemExit):
        score.main([str(d / "noshape.ecsv"), "--truth", str(d / "truth.ecsv")])
    assert "image area unknown" in capsys.readouterr().err
    assert score.main([str(d / "noshape.ecsv"), "--truth", str(d / "truth.ecsv"), "--shape",
                       str(SIDE), str(SIDE)]) == 0  # fmt: skip


def test_empty_catalog_is_valid():
    t = hand_truth()
    cat = Table({"x": np.zeros(0), "y": np.zeros(0), "score": np.zeros(0),
                 "brightened": np.zeros(0, bool)})  # fmt: skip
    r = evaluate([pair_score("p", cat, t, SIDE * SIDE)])
    assert r["completeness"] == 0 and r["n_false"] == 0 and np.isnan(r["purity"])
    assert_array_equal(r["curve"]["n_det"], 0)


def _old_semantics_matched(p, radius, threshold):
    """The matching at one threshold as defined: drop detections below it, then match()."""
    keep = np.flatnonzero(p.score >= threshold)
    d, t = match(p.det_xy[keep], p._truth_xy, radius)
    return set(zip(keep[d].tolist(), t.tolist()))


def test_one_matching_serves_every_threshold():
    """match_levels (one Hungarian per distinct group of kept detections) gives, at every
    threshold, exactly the matching of the kept detections; crowded so groups are common."""
    rng = np.random.default_rng(3)
    txy = rng.uniform(0, 60, (300, 2))
    cxy = np.concatenate([txy[:200] + rng.normal(0, 0.8, (200, 2)), rng.uniform(0, 60, (80, 2))])
    t = Table({"x": txy[:, 0], "y": txy[:, 1], "mag_new": rng.uniform(20, 27, 300)})
    c = Table({"x": cxy[:, 0], "y": cxy[:, 1], "score": np.round(rng.uniform(0, 1, 280), 2),
               "brightened": np.ones(280, bool)})
    p = pair_score("p", c, t, 60.0 * 60.0)
    _, _, _, _, level = p.levels(2.0)
    assert (level > 0).sum() > 20  # many groups change with the threshold
    for thr in np.unique(c["score"])[::3]:
        d, tt = p.matched(2.0, thr)
        assert set(zip(d.tolist(), tt.tolist())) == _old_semantics_matched(p, 2.0, thr)
    d, tt = p.matched(2.0)
    assert set(zip(d.tolist(), tt.tolist())) == _old_semantics_matched(p, 2.0, -np.inf)
    # the sweep's vectorised counts agree with evaluate at each threshold
    res = sweep([p], budget=1e9, thresholds=np.unique(c["score"]))
    for thr, fp, comp in zip(*(res["curve"][k] for k in ("threshold", "fp_per_sca",
                                                          "completeness"))):
        ev = evaluate([p], threshold=thr)
        assert fp == pytest.approx(ev["fp_per_sca"]) and comp == pytest.approx(ev["completeness"])


def test_large_truth_scores_linearly():
    """1e5 transients (logistic completeness, m50 = 25.5, w = 0.3) and 5e3 false
    positives: the m50, FP and completeness come out right (a 1e5-row score runs in ~1 s;
    the speed is measured by the command in the README, not here)."""
    rng = np.random.default_rng(0)
    n, side = 100_000, 23_600.0
    txy = rng.uniform(0, side, (n, 2))
    mag = rng.uniform(20, 28, n)
    det = rng.uniform(size=n) < 1 / (1 + np.exp((mag - 25.5) / 0.3))
    fxy = rng.uniform(0, side, (5000, 2))
    cxy = np.concatenate([txy[det] + rng.normal(0, 0.3, (det.sum(), 2)), fxy])
    t = Table({"x": txy[:, 0], "y": txy[:, 1], "mag_new": mag, "kind": ["transient"] * n})
    c = Table({"x": cxy[:, 0], "y": cxy[:, 1],
               "score": np.concatenate([rng.uniform(0.5, 1, det.sum()), rng.uniform(0, 0.6, 5000)]),
               "brightened": np.ones(len(cxy), bool)})
    p = pair_score("big", c, t, side * side)
    r = evaluate([p])
    assert r["m50"] == pytest.approx(25.5, abs=0.02)
    assert r["fit"]["width"] == pytest.approx(0.3, abs=0.02)
    assert r["n_matched"] == pytest.approx(det.sum(), rel=0.002)
    assert r["n_false"] == pytest.approx(5000, rel=0.01)
    s = sweep([p], budget=1.0)
    assert 0.55 < s["threshold"] <= 0.61  # just above the highest false positive scores
    c = (1.0 - s["threshold"]) / 0.5  # fraction of the true detections kept
    assert s["m50"] == pytest.approx(25.5 + 0.3 * np.log(2 * c - 1), abs=0.03)


def _bad_pair(tmp_path, truth=None, cat=None):
    d = write_pair(tmp_path)
    if truth is not None:
        truth.write(d / "truth.ecsv", format="ascii.ecsv", overwrite=True)
    if cat is not None:
        cat.write(d / "cat.ecsv", format="ascii.ecsv", overwrite=True)
    return d


def test_nan_masked_and_duplicate_rows_are_warned_and_left_out(tmp_path, capsys):
    t = hand_truth()
    t = Table(t, masked=True)
    t["x"].mask[7] = True  # T7 (undetected) has no position
    t.add_row(t[0])  # T0 twice
    t.add_row(t[1])  # T1 twice
    c = Table(hand_catalog(), masked=True)
    c["x"][8] = np.nan
    c["y"].mask[7] = True  # both false positives lose their position
    d = _bad_pair(tmp_path, t, c)
    out = tmp_path / "s.json"
    assert score.main([str(d / "cat.ecsv"), "--truth", str(d / "truth.ecsv"), "--json",
                       str(out), "--dmag-truth", "catalog"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("cat.ecsv: 2 of 9 candidate rows have no finite x/y" in e for e in err)
    assert any("truth.ecsv: 1 of 12 truth rows have no finite x/y" in e for e in err)
    assert any("truth.ecsv: 2 truth rows repeat another row" in e for e in err)
    assert all(e.startswith("rtcnn: warning: ") for e in err)
    r = json.loads(out.read_text())["methods"]["cat"]["at_threshold"]
    assert r["n_transients"] == 7 and r["n_matched"] == 6  # not halved by the duplicates
    assert r["n_false"] == 0


@pytest.mark.parametrize("where", ["truth", "catalog"])
def test_string_columns_are_one_line_errors(tmp_path, capsys, where):
    t, c = hand_truth(), hand_catalog()
    tab = t if where == "truth" else c
    tab["y"] = [f"{v}px" for v in tab["y"]]
    d = _bad_pair(tmp_path, t, c)
    with pytest.raises(SystemExit) as exc:
        score.main([str(d / "cat.ecsv"), "--truth", str(d / "truth.ecsv")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = "truth.ecsv" if where == "truth" else "cat.ecsv"
    assert len(err) == 1 and err[0].startswith("rtcnn: error: ") and name in err[0]
    assert "'y'" in err[0] and "not numeric" in err[0]


def test_csv_truth_with_strings_is_a_one_line_error(tmp_path, capsys):
    d = write_pair(tmp_path)
    (d / "truth.csv").write_text("x,y,mag_new,kind\n100,50,20.0,transient\nabc,50,21,transient\n")
    with pytest.raises(SystemExit) as exc:
        score.main([str(d / "cat.ecsv"), "--truth", str(d / "truth.csv")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truth.csv" in err[0] and "'x'" in err[0]


@pytest.mark.parametrize("origin", [1.7, "1", True])
def test_pixel_origin_must_be_0_or_1(tmp_path, capsys, origin):
    t = hand_truth()
    t.meta["pixel_origin"] = origin
    d = _bad_pair(tmp_path, t)
    with pytest.raises(SystemExit) as exc:
        score.main([str(d / "cat.ecsv"), "--truth", str(d / "truth.ecsv")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"truth.ecsv: pixel_origin must be 0 or 1, got {origin!r}" in err[0]
