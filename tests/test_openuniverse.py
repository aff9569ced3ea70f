"""OpenUniverse 2024 reader, pair finder and reprojection on files in the exact layout.

The files are written once per session by :mod:`ou_layout` (galsim.roman WCS and PSF,
Poisson + read noise, gzipped 4-HDU FITS, 1-based non-AB truth, obseq table).
"""

import json
import shutil

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from numpy.testing import assert_allclose
from photutils.aperture import CircularAperture, aperture_photometry
from photutils.centroids import centroid_2dg, centroid_sources

import ou_layout
from rtcnn.errors import RtcnnInputError
from rtcnn.io import find_pairs, read_pair, read_truth
from rtcnn.io import openuniverse as ou

SIZE = 96  # px, chip side of the generated files
STAR_MAG_MAX = 21.0  # AB, stars used for centroids (S/N > 100)
ISOLATION = 6.0  # px, no other object this close to a star used for centroids
EDGE = 6  # px, stars this close to the chip (or footprint) edge are not used


@pytest.fixture(scope="module")
def ou_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("RomanTDS")
    scene = ou_layout.make_ou_directory(root, size=SIZE, n_stars=12, n_galaxies=2,
                                        n_transients=3, seed=3)
    return root, scene


def _key(band, pointing, sca=3):
    return ou.OUKey(band, pointing, sca)


def _isolated_stars(truth, mask=None, shape=(SIZE, SIZE), isolation=ISOLATION):
    """Bright stars far from other objects, the edges and masked pixels."""
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    keep = []
    for i in np.flatnonzero((truth["kind"] == "star") & (truth["mag"] < STAR_MAG_MAX)):
        d = np.hypot(x - x[i], y - y[i])
        d[i] = np.inf
        inside = EDGE <= x[i] < shape[1] - EDGE and EDGE <= y[i] < shape[0] - EDGE
        if d.min() > isolation and inside:
            if mask is None or not mask[int(round(y[i])) - EDGE:int(round(y[i])) + EDGE + 1,
                                        int(round(x[i])) - EDGE:int(round(x[i])) + EDGE + 1].any():
                keep.append(i)
    assert len(keep) >= 2, "the scene needs a few isolated bright stars"
    return truth[keep]


def _centroids(data, stars):
    x, y = centroid_sources(np.nan_to_num(data), np.asarray(stars["x"]),
                            np.asarray(stars["y"]), box_size=9, centroid_func=centroid_2dg)
    return np.asarray(x), np.asarray(y)


# ------------------------------------------------------------------- names, layout


def test_parse_names_and_paths(tmp_path):
    key = ou.parse_ou_name("Roman_TDS_simple_model_H158_12345_17.fits.gz")
    assert key == ou.OUKey("H158", 12345, 17)
    assert ou.parse_ou_name("Roman_TDS_index_F184_7_2.txt") == ou.OUKey("F184", 7, 2)
    assert ou.ou_image_path(tmp_path, key) == (
        tmp_path / "images/simple_model/H158/12345/Roman_TDS_simple_model_H158_12345_17.fits.gz")
    assert ou.ou_truth_path(tmp_path, key) == (
        tmp_path / "truth/H158/12345/Roman_TDS_index_H158_12345_17.txt")
    assert ou.truth_path_for(ou.ou_image_path(tmp_path, key)) == ou.ou_truth_path(tmp_path, key)
    with pytest.raises(RtcnnInputError, match="not an OpenUniverse file name"):
        ou.parse_ou_name("new.fits")


def test_generated_files_have_the_openuniverse_structure(ou_root):
    root, _ = ou_root
    path = ou.ou_image_path(root, _key("H158", 1))
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "SCI", "ERR", "DQ"]
        assert hdul[0].data is None
        assert hdul[1].data.dtype == np.dtype(">f4") and hdul[3].data.dtype == np.dtype(">i4")
        h = hdul[1].header
        assert h["CTYPE1"] == "RA---TAN-SIP" and "CD1_1" in h and "A_2_0" in h
        for key in ("FILTER", "EXPTIME", "MJD-OBS", "ZPTMAG", "SKY_MEAN", "SCA_NUM"):
            assert key in h
    with open(ou.ou_truth_path(root, _key("H158", 1))) as fh:
        assert fh.readline().split() == ["#", *ou.TRUTH_COLUMNS]


# ------------------------------------------------------------------- images


def test_read_image_units_sky_mask_wcs(ou_root):
    root, _ = ou_root
    path = ou.ou_image_path(root, _key("H158", 1))
    img = ou.read_ou_image(path)
    with fits.open(path) as hdul:
        sci, dq, hdr = hdul["SCI"].data.astype(float), hdul["DQ"].data, hdul["SCI"].header
    assert img.data.dtype == np.float32 and img.shape == (SIZE, SIZE)
    assert img.unit == "electron/s" and img.band == "H158" and img.exptime == hdr["EXPTIME"]
    assert_allclose(img.data, (sci - hdr["SKY_MEAN"]) / hdr["EXPTIME"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(img.mask, dq != 0)  # DQ-flagged hot pixels are masked
    assert img.header["SKYLEVEL"] == pytest.approx(ou_layout.SKY_RATE)  # e-/s/pix subtracted
    assert abs(np.median(img.data[~img.mask])) < 0.2 * ou_layout.SKY_RATE  # sources' wings
    assert img.header["POINTING"] == 1 and img.header["SCA"] == 3
    # the astropy TAN-SIP WCS (0-based) agrees with GalSim's (1-based) to 1e-4 px
    gs = ou_layout.chip_wcs(ou_layout.small_sequence()[1], 3, SIZE)
    sky = img.wcs.pixel_to_world([10.0, 50.3, 80.7], [5.0, 40.2, 90.1])
    for k, (px, py) in enumerate([(10.0, 5.0), (50.3, 40.2), (80.7, 90.1)]):
        pos = gs.toImage(ou_layout.galsim.CelestialCoord(sky[k].ra.deg * ou_layout.galsim.degrees,
                                                         sky[k].dec.deg * ou_layout.galsim.degrees))
        assert_allclose([pos.x - 1, pos.y - 1], [px, py], atol=1e-4)


def test_zeropoint_formula():
    zp_b = ou.bandpass_zeropoint("H158")
    area = ou_layout.galsim.roman.collecting_area  # cm^2
    zptmag = 2.5 * np.log10(302.275 * area)
    # zero point of 1 e-/s = Z_b + ZPTMAG - 2.5 log10(EXPTIME) = Z_b + 2.5 log10(area)
    assert_allclose(ou.ou_zeropoint("H158", zptmag, 302.275), zp_b + 2.5 * np.log10(area))
    with pytest.raises(ValueError, match="unknown Roman band 'X999'"):
        ou.bandpass_zeropoint("X999")


def test_ab_zeropoint_from_star_photometry(ou_root):
    """Total flux of bright stars in e-/s with the image zero point gives their AB mag."""
    root, scene = ou_root
    img = ou.read_ou_image(ou.ou_image_path(root, _key("H158", 0)))
    truth = ou.read_ou_truth_for(img, offchip="flag")  # off-chip neighbours count too
    stars = _isolated_stars(truth, img.mask, isolation=15.0)  # Roman PSF wings reach far
    r = 5.0  # px
    # enclosed fraction of the generator's PSF in that aperture (drawn like the stars)
    psf = ou_layout.roman_psf(3, "H158").drawImage(nx=ou_layout.STAMP_PSF,
                                                   ny=ou_layout.STAMP_PSF, scale=0.11).array
    c = (ou_layout.STAMP_PSF - 1) / 2
    ee = aperture_photometry(psf, CircularAperture((c, c), r))["aperture_sum"][0] / psf.sum()
    phot = aperture_photometry(img.filled(), CircularAperture(
        np.column_stack([stars["x"], stars["y"]]), r))
    mag = -2.5 * np.log10(np.asarray(phot["aperture_sum"]) / ee) + img.zeropoint
    want = np.array([scene.mag[scene.ids == i][0] for i in stars["id"]])
    assert_allclose(mag, want, atol=0.03)


def test_read_image_errors(ou_root, tmp_path):
    root, _ = ou_root
    src = ou.ou_image_path(root, _key("H158", 0))
    with pytest.raises(RtcnnInputError, match="file not found"):
        ou.read_ou_image(tmp_path / src.name)
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    del hdul[1].header["EXPTIME"]
    del hdul[0].header["EXPTIME"]
    bad = tmp_path / src.name
    hdul.writeto(bad)
    with pytest.raises(RtcnnInputError, match="header keyword EXPTIME is missing"):
        ou.read_ou_image(bad)
    wrong = tmp_path / "Roman_TDS_simple_model_J129_0_3.fits.gz"
    with fits.open(src) as hdul:
        hdul.writeto(wrong)
    with pytest.raises(RtcnnInputError, match="header FILTER = H158 but the file name says J129"):
        ou.read_ou_image(wrong)


# ------------------------------------------------------------------- truth


def test_truth_positions_are_zero_based_centroids(ou_root):
    """The truth x, y (1-based in the file) match the stars' centroids after x - 1."""
    root, _ = ou_root
    img = ou.read_ou_image(ou.ou_image_path(root, _key("H158", 1)))
    stars = _isolated_stars(ou.read_ou_truth_for(img), img.mask)
    cx, cy = _centroids(img.data, stars)
    assert_allclose(cx, stars["x"], atol=0.1)
    assert_allclose(cy, stars["y"], atol=0.1)
    lines = ou.truth_path_for(img.path).read_text().splitlines()[1:]
    raw_x = {f[0]: float(f[3]) for f in (line.split() for line in lines)}
    assert_allclose([raw_x[str(i)] for i in stars["id"]], np.asarray(stars["x"]) + 1.0)


def test_truth_ab_mags_kinds_and_offchip(ou_root):
    root, scene = ou_root
    img = ou.read_ou_image(ou.ou_image_path(root, _key("H158", 1)))
    path = ou.truth_path_for(img.path)
    zptmag = img.header["ZPTMAG"]
    full = ou.read_ou_truth(path, zptmag)
    flagged = ou.read_ou_truth(path, zptmag, img.shape, offchip="flag")
    dropped = ou.read_ou_truth(path, zptmag, img.shape)
    assert len(full) == len(flagged) > len(dropped) == int(flagged["on_chip"].sum())
    x = np.asarray(dropped["x"])
    assert x.min() >= -0.5 and x.max() < SIZE - 0.5
    assert set(full["kind"]) == {"star", "galaxy", "transient"}
    # file mag + ZPTMAG is the AB magnitude the scene was drawn with
    static = full[full["kind"] != "transient"]
    want = np.array([scene.mag[scene.ids == i][0] for i in static["id"]])
    assert_allclose(static["mag"], want, atol=1e-5)
    tr = full[full["kind"] == "transient"]
    want = np.array([scene.mag_at(62110.0)[scene.ids == i][0] for i in tr["id"]])
    assert_allclose(tr["mag"], want, atol=1e-5)
    assert full["id"].dtype == np.int64


def test_truth_errors(tmp_path):
    p = tmp_path / "Roman_TDS_index_H158_0_3.txt"
    p.write_text("object_id ra dec\n1 2 3\n")
    with pytest.raises(RtcnnInputError, match="first line must be a '#' header"):
        ou.read_ou_truth(p, 17.0)
    p.write_text("# object_id ra dec x y\n1 2 3 4 5\n")
    with pytest.raises(RtcnnInputError, match="missing truth columns realized_flux, flux, mag"):
        ou.read_ou_truth(p, 17.0)
    p.write_text("# " + " ".join(ou.TRUTH_COLUMNS) + "\n")
    assert len(ou.read_ou_truth(p, 17.0)) == 0  # an empty truth table is valid


# ------------------------------------------------------------------- obseq, pairs


def test_read_obseq(ou_root):
    root, _ = ou_root
    seq = ou.read_obseq(ou.find_obseq(root))
    pts = ou_layout.small_sequence()
    assert list(seq["pointing"]) == list(range(len(pts)))
    assert list(seq["band"]) == [p.band for p in pts]
    assert_allclose(seq["mjd"], [p.mjd for p in pts])
    for e in ou.scan_ou(root):  # headers agree with the obseq row of the pointing
        assert e.mjd == pytest.approx(seq["mjd"][e.key.pointing])


def test_select_pairs_quiet(ou_root):
    root, _ = ou_root
    exps = ou.scan_ou(root)
    assert [e.key.pointing for e in exps if e.transients] == [1, 2, 4]
    pairs = ou.select_pairs(exps)
    got = {(r["band"], r["pointing_new"]): r["pointing_ref"] for r in pairs}
    assert got == {("H158", 1): 0, ("H158", 2): 0, ("J129", 4): 3}
    assert np.all(pairs["overlap"] > 0.8) and np.all(pairs["mjd_ref"] < pairs["mjd_new"])
    same = pairs[pairs["pointing_new"] == 1]
    assert same["overlap"][0] == 1.0


def test_select_pairs_modes(ou_root, tmp_path):
    root, scene = ou_root
    exps = ou.scan_ou(root)
    before = ou.select_pairs(exps, mode="before", mjd_cut=62111.0)
    assert {(r["pointing_new"], r["pointing_ref"]) for r in before} == {(2, 0), (4, 3)}
    # activity windows that cover pointings 0 and 3 but end before pointing 1: only
    # pointing 1 is a quiet reference, for pointing 2
    tr = scene.ids[scene.kind == "transient"]
    win = tmp_path / "windows.ecsv"
    Table({"object_id": tr, "start_mjd": np.full(len(tr), 62090.0),
           "end_mjd": np.full(len(tr), 62105.0)}).write(win)
    quiet = ou.select_pairs(exps, windows=win)
    assert {(r["pointing_new"], r["pointing_ref"]) for r in quiet} == {(2, 1)}
    strict = ou.select_pairs(exps, min_overlap=1.0)
    assert set(strict["pointing_new"]) == {1}  # dithered images are not fully covered
    with pytest.raises(RtcnnInputError, match="pair mode 'before' needs mjd_cut"):
        ou.select_pairs(exps, mode="before")
    with pytest.raises(RtcnnInputError, match="pair mode must be one of"):
        ou.select_pairs(exps, mode="latest")


def test_pair_list_roundtrip(ou_root, tmp_path):
    root, _ = ou_root
    pairs = ou.select_pairs(ou.scan_ou(root))
    for name in ("pairs.ecsv", "pairs.csv"):
        back = ou.read_pair_list(ou.write_pair_list(pairs, tmp_path / name))
        assert list(back["name"]) == list(pairs["name"])
        assert list(back["ref"]) == list(pairs["ref"])
    # a hand-written list with only ref and new columns works
    minimal = tmp_path / "mine.csv"
    Table({"ref": pairs["ref"][:1], "new": pairs["new"][:1]}).write(minimal)
    back = ou.read_pair_list(minimal)
    assert back["name"][0] == pairs["name"][0] and back["truth_new"][0] == pairs["truth_new"][0]
    Table({"ref": [pairs["ref"][0]], "new": [pairs["new"][2]]}).write(minimal, overwrite=True)
    with pytest.raises(RtcnnInputError, match="mixes bands J129 and H158"):
        ou.read_pair_list(minimal)


def test_scan_errors(tmp_path):
    with pytest.raises(RtcnnInputError, match="no OpenUniverse images found"):
        ou.scan_ou(tmp_path)


# ------------------------------------------------------------------- reprojection


def test_reprojection_puts_stars_on_the_new_grid(ou_root):
    """A star of the dithered reference lands within 0.1 px of its new-image position."""
    root, _ = ou_root
    new = ou.read_ou_image(ou.ou_image_path(root, _key("H158", 2)))
    ref = ou.read_ou_image(ou.ou_image_path(root, _key("H158", 0)))
    stars_ref = ou.read_ou_truth_for(ref)
    for method in ou.REPROJECT_METHODS:
        on_new = ou.reproject_image(ref, new, method)
        assert on_new.shape == new.shape and on_new.wcs is new.wcs
        stars = _isolated_stars(ou.read_ou_truth_for(new), on_new.mask)
        cx, cy = _centroids(on_new.data, stars)
        assert_allclose(cx, stars["x"], atol=0.1)
        assert_allclose(cy, stars["y"], atol=0.1)
        # the shift is real: the same stars sit > 3 px away on the reference's own grid
        same = stars_ref[np.isin(stars_ref["id"], stars["id"])]
        assert np.all(np.hypot(same["x"] - stars["x"], same["y"] - stars["y"]) > 3.0)
        # the uncovered strip is masked (NaN), the rest is not
        assert on_new.mask is not None and 0.02 < on_new.mask.mean() < 0.3
        assert np.isnan(on_new.data[on_new.mask]).all()
    # flux is conserved by the adaptive resampling (aperture sums, 1%)
    ap = CircularAperture(np.column_stack([stars["x"], stars["y"]]), 6.0)
    on_new = ou.reproject_image(ref, new, "adaptive")
    f_new = aperture_photometry(on_new.filled(), ap)["aperture_sum"]
    ap_ref = CircularAperture(np.column_stack([same["x"], same["y"]]), 6.0)
    f_ref = aperture_photometry(ref.filled(), ap_ref)["aperture_sum"]
    assert_allclose(np.asarray(f_new), np.asarray(f_ref), rtol=0.01)


# ------------------------------------------------------------------- pair directories


@pytest.fixture(scope="module")
def prepared(ou_root, tmp_path_factory):
    """The generated directory's pairs, written once as pair directories."""
    root, _ = ou_root
    out = tmp_path_factory.mktemp("pairs")
    return out, ou.prepare_pairs(root, out)


def test_prepare_pairs_writes_simulator_pair_dirs(ou_root, prepared, tmp_path):
    root, scene = ou_root
    shutil.copytree(prepared[0], tmp_path / "pairs")
    out = tmp_path / "pairs"
    stamp = (out / "H158_1_3_ref0_3" / "ref.fits").stat().st_mtime_ns
    dirs = ou.prepare_pairs(root, out)  # finds the copies complete: writes nothing
    assert [d.name for d in dirs] == ["H158_1_3_ref0_3", "H158_2_3_ref0_3", "J129_4_3_ref3_3"]
    assert (out / "pairs.ecsv").is_file()
    found = find_pairs(out)
    assert [p.name for p in found] == [d.name for d in dirs]
    ref, new = read_pair(found[1].ref, found[1].new)
    assert ref.unit == new.unit == "electron/s" and ref.zeropoint == pytest.approx(new.zeropoint)
    assert ref.mask is not None and new.mask is not None  # footprint edge, hot pixels
    truth = read_truth(found[1].truth, image=new)
    assert set(truth["kind"]) == {"transient"} and truth["mag_ref"].mask.all()
    want = {i: m for i, m in zip(scene.ids, scene.mag_at(62115.0))}
    assert_allclose(truth["mag_new"], [want[i] for i in truth["id"]], atol=1e-5)
    assert np.all(truth["snr"] > 5) and truth["host"].dtype == bool
    params = json.loads((dirs[1] / "params.json").read_text())
    assert params["reproject"] == "adaptive" and params["pointing_ref"] == 0
    assert json.loads((dirs[0] / "params.json").read_text())["reproject"] == "none"
    # transient positions in the pair truth are centroids in the new image
    bright = truth[truth["mag_new"] < 21.0]
    cx, cy = _centroids(new.data, bright)
    assert_allclose(cx, bright["x"], atol=0.15)
    assert_allclose(cy, bright["y"], atol=0.15)

    # cached: a second call rewrites nothing; an edited list drops a pair directory
    edited = tmp_path / "edited.ecsv"
    pairs = ou.read_pair_list(out / "pairs.ecsv")
    ou.write_pair_list(pairs[:2], edited)
    again = ou.prepare_pairs(root, out, pair_list=edited)
    assert [d.name for d in again] == [d.name for d in dirs[:2]]
    assert (dirs[0] / "ref.fits").stat().st_mtime_ns == stamp
    assert not dirs[2].exists()


# ------------------------------------------------------------------- data=openuniverse


def test_data_config_trains_from_the_layout(ou_root, prepared, tmp_path):
    """``data=openuniverse data.root=DIR`` gives the DataModule batches of the contract."""
    import inspect
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from rtcnn.data.openuniverse import OpenUniverseDataModule

    root, _ = ou_root
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[
            "data=openuniverse", f"data.root={root}", f"data.pairs_dir={prepared[0]}",
            "data.num_workers=0", "data.persistent_workers=false", "data.batch_size=4",
            "data.progress=false", f"paths.data_dir={tmp_path}"])
    params = set(inspect.signature(OpenUniverseDataModule.__init__).parameters) - {
        "self", "kwargs"}
    assert params <= set(cfg.data)  # every OpenUniverse option is in the config
    dm = instantiate(cfg.data)
    assert isinstance(dm, OpenUniverseDataModule)
    dm.prepare_data()
    dm.setup()
    assert (prepared[0] / "pairs.ecsv").is_file() and dm.index.n_pairs == 3
    batch = next(iter(dm.train_dataloader()))
    assert tuple(batch["image"].shape[1:]) == (2, 64, 64)
    assert ((batch["target"] >= 0) & (batch["target"] <= 1)).all()
