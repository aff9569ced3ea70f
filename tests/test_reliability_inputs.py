"""Bad inputs: every command answers one line ``rtcnn: error: <file>: <problem>``, exit 2.

One tiny simulated pair (128 px) is broken in each of the ways of issue 9 and handed to
each command through its ``main`` (in-process; Hydra's for ``train`` and ``evaluate``):
a missing file, not FITS, truncated FITS, no image HDU, a 3-D image, a ref/new shape
mismatch, no WCS where RA/Dec are needed, a catalog without position columns or entirely
off the image, an unknown option / config key. NaN/inf pixels and an empty truth catalog
are valid input: masked and reported, no crash.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from support import run_hydra

REF, NEW, TRUTH = "ref.fits", "new.fits", "truth.ecsv"
SIZE = 128  # px, side of the simulated pair
NAN_ROWS = 16  # rows of NaN (and one inf) put into the new image by the "nan" case
WCS_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CD1_", "CD2_", "CDELT", "CUNIT", "PC1_", "PC2_",
                "A_", "B_", "AP_", "BP_", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSAXES",
                "MJDREF", "DATEREF")


# --------------------------------------------------------------------------- the cases
def _write_new(d: Path, hdus) -> None:
    (d / NEW).unlink()
    fits.HDUList(hdus).writeto(d / NEW)


def _strip_wcs(path: Path) -> None:
    with fits.open(path) as hdul:
        data, header = hdul[0].data.copy(), hdul[0].header.copy()
    for key in list(header.keys()):
        if key.startswith(WCS_PREFIXES):
            del header[key]
    path.unlink()
    fits.PrimaryHDU(data, header).writeto(path)


def _truth(d: Path) -> Table:
    return Table.read(d / TRUTH, format="ascii.ecsv")


def _save_truth(d: Path, t: Table) -> None:
    (d / TRUTH).unlink()
    t.write(d / TRUTH, format="ascii.ecsv")


def break_missing(d):
    (d / NEW).unlink()


def break_not_fits(d):
    (d / NEW).write_text("this is a text file, not an image\n")


def break_truncated(d):
    with open(d / NEW, "r+b") as fh:
        fh.truncate(2880 * 4 + 1000)  # the header and a few rows of pixels


def break_no_image_hdu(d):
    _write_new(d, [fits.PrimaryHDU(), fits.BinTableHDU(Table({"a": [1, 2]}))])


def break_cube(d):
    data = fits.getdata(d / NEW)
    _write_new(d, [fits.PrimaryHDU(np.stack([data, data]), fits.getheader(d / NEW))])


def break_shape(d):
    """The new image 10 rows shorter, without a WCS (with both WCSs it is resampled)."""
    with fits.open(d / NEW) as hdul:
        data, header = hdul[0].data[:-10].copy(), hdul[0].header.copy()
    _write_new(d, [fits.PrimaryHDU(data, header)])
    _strip_wcs(d / NEW)


def break_no_wcs(d):
    """Images without WCS and a truth catalog with RA/Dec only: RA/Dec cannot be placed."""
    for name in (REF, NEW):
        _strip_wcs(d / name)
    t = _truth(d)
    t.remove_columns(["x", "y"])
    _save_truth(d, t)


def nan_pixels(d):
    with fits.open(d / NEW) as hdul:
        data, header = hdul[0].data.copy(), hdul[0].header.copy()
    data[:NAN_ROWS] = np.nan
    data[NAN_ROWS, 5] = np.inf
    _write_new(d, [fits.PrimaryHDU(data, header)])


def break_no_positions(d):
    t = _truth(d)
    t.remove_columns([c for c in ("x", "y", "ra", "dec") if c in t.colnames])
    _save_truth(d, t)


def break_off_image(d):
    t = _truth(d)
    t["x"] += 10 * SIZE
    t.remove_columns(["ra", "dec"])
    _save_truth(d, t)


def empty_truth(d):
    _save_truth(d, _truth(d)[:0])


#: name -> (mutation of a copy of the good pair directory, file the message names or None
#: for a valid input, a phrase of the problem)
CASES = {
    "missing file": (break_missing, NEW, "file not found"),
    "not FITS": (break_not_fits, NEW, "not a FITS file"),
    "truncated FITS": (break_truncated, NEW, "truncated FITS file"),
    "no image HDU": (break_no_image_hdu, NEW, "has no 2-D image HDU"),
    "3-D image": (break_cube, NEW, "is 3-D"),
    "shape mismatch": (break_shape, NEW, "does not match the reference"),
    "no WCS, RA/Dec catalog": (break_no_wcs, (REF, NEW), "no celestial WCS"),
    "catalog without positions": (break_no_positions, TRUTH, "has no position columns"),
    "catalog off the image": (break_off_image, TRUTH, "fall outside the"),
    "NaN/inf pixels": (nan_pixels, None, None),
    "empty catalog": (empty_truth, None, None),
}
#: cases that concern the images only (the catalog-free commands see these)
IMAGE_CASES = ["missing file", "not FITS", "truncated FITS", "no image HDU", "3-D image",
               "shape mismatch"]
CATALOG_CASES = ["no WCS, RA/Dec catalog", "catalog without positions", "catalog off the image"]


def make_case(good: Path, where: Path, case: str) -> Path:
    """A copy of the good pair directory broken as ``case``; returns the pair directory."""
    d = where / "pair_0000"
    shutil.copytree(good, d)
    CASES[case][0](d)
    return d


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """One 128 px simulated inject-mode pair (rtcnn.sim) with its truth."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("good")
    simulate_dataset(root, 1, SIZE, "inject", 5, progress=False, n_transients=8)
    return root / "pair_0000"


@pytest.fixture(scope="module")
def det_ckpt(tiny_detector_ckpt) -> Path:
    """A real checkpoint of a tiny dense detector (one training step; conftest's)."""
    return tiny_detector_ckpt


#: data module arguments of the tiny runs: one pair (all of it in the training split),
#: no workers
DATA_ARGS = {"batch_size": 2, "num_workers": 0, "persistent_workers": False, "progress": False,
             "min_snr": 3.0}


def data_overrides(root: Path) -> list[str]:
    """Hydra overrides for :data:`DATA_ARGS` and ``root``."""
    return [f"data.root={root}", *(f"data.{k}={str(v).lower()}" for k, v in DATA_ARGS.items())]


@pytest.fixture(scope="module")
def loc_run(good, tmp_path_factory) -> Path:
    """A tiny localisation run: ``<run>/checkpoints/last.ckpt`` and ``<run>/.hydra/``."""
    import hydra.utils
    import lightning as L
    from omegaconf import OmegaConf

    from rtcnn.models.attn5 import Attn5
    from rtcnn.tasks import LocalizationTask

    run = tmp_path_factory.mktemp("locrun")
    data = {"_target_": "rtcnn.data.FitsDataModule", "root": str(good.parent), **DATA_ARGS}
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"data": data}), run / ".hydra" / "config.yaml")
    dm = hydra.utils.instantiate(data)
    task = LocalizationTask(net=Attn5(filters=[4, 4, 4, 4, 4], hidden=8), n_panels=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(task, dm)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


@pytest.fixture(scope="module")
def candidates(good, tmp_path_factory) -> Path:
    """A candidate catalog of the good pair (the baseline's), for ``score``."""
    from rtcnn.baseline import main

    out = tmp_path_factory.mktemp("cands") / "baseline.ecsv"
    assert main([str(good / REF), str(good / NEW), "-o", str(out)]) == 0
    return out


# --------------------------------------------------------------------------- running
def run_cli(main, argv: list[str]) -> int:
    """An argparse command's ``main(argv)``; returns the exit code."""
    try:
        return main([str(a) for a in argv]) or 0
    except SystemExit as exit_:
        return 0 if exit_.code is None else exit_.code


def command(name: str, d: Path, tmp_path: Path, monkeypatch, det_ckpt=None, loc_run=None,
            candidates=None, extra: tuple[str, ...] = ()) -> int:
    """Run command ``name`` on pair directory ``d``; returns its exit code."""
    if name == "train":
        import rtcnn.train as mod

        argv = ["data=fits", *data_overrides(d.parent), "model.net.filters=[4,4,4,4,4]",
                "model.net.hidden=8", "model.n_panels=0", "trainer=debug",
                "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "~logger",
                "callbacks=none", "extras.print_config=false", "optimized_metric=null",
                "test=false", *extra]
        return run_hydra(mod, argv, monkeypatch, tmp_path)
    if name == "evaluate":
        import rtcnn.evaluate as mod

        argv = [f"ckpt_path={loc_run / 'checkpoints' / 'last.ckpt'}", f"data.root={d.parent}",
                f"eval_root={tmp_path / 'eval'}", "n_extremes=1", "views=[identity]",
                "splits=[test]", *extra]
        return run_hydra(mod, argv, monkeypatch, tmp_path)
    if name == "detect":
        from rtcnn.detect import main

        return run_cli(main, [d / REF, d / NEW, "--ckpt", det_ckpt, "-o", tmp_path / "det.ecsv",
                              "--threshold", "0.001", "--no-progress", *extra])
    if name == "baseline":
        from rtcnn.baseline import main

        return run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "base.ecsv", *extra])
    if name == "score":
        from rtcnn.score import main

        return run_cli(main, [candidates, "--truth", d / TRUTH, *extra])
    raise ValueError(name)


def error_line(capsys) -> str:
    """The command's stderr, which must be exactly one ``rtcnn: error:`` line."""
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if ln.startswith("rtcnn: error:")]
    assert len(lines) == 1, err
    return lines[0]


COMMANDS_FOR = {
    **{case: ["train", "evaluate", "detect", "baseline", "score"] for case in IMAGE_CASES},
    "no WCS, RA/Dec catalog": ["train", "evaluate", "detect", "baseline", "score"],
    "catalog without positions": ["train", "evaluate", "score"],
    "catalog off the image": ["train", "evaluate", "score"],
}
# score reads the images beside the truth only when they exist; a missing new.fits is
# no error for it (it uses the reference image instead)
COMMANDS_FOR["missing file"] = ["train", "evaluate", "detect", "baseline"]
PARAMS = [(case, cmd) for case, cmds in COMMANDS_FOR.items() for cmd in cmds]


@pytest.mark.parametrize("case, cmd", PARAMS, ids=[f"{c}-{m}" for c, m in PARAMS])
def test_bad_input_is_one_line_exit_2(case, cmd, good, det_ckpt, loc_run, candidates,
                                      tmp_path, monkeypatch, capsys):
    d = make_case(good, tmp_path / "data", case)
    _, fnames, problem = CASES[case]
    code = command(cmd, d, tmp_path, monkeypatch, det_ckpt, loc_run, candidates)
    line = error_line(capsys)
    assert code == 2, line
    names = (fnames,) if isinstance(fnames, str) else fnames
    assert any(line.startswith(f"rtcnn: error: {d / f}: ") for f in names), line
    assert problem in line, line


def test_missing_file_of_a_catalog_command(good, candidates, tmp_path, capsys):
    from rtcnn.score import main

    code = run_cli(main, [candidates, "--truth", tmp_path / "nope" / TRUTH])
    assert code == 2
    assert error_line(capsys) == f"rtcnn: error: {tmp_path / 'nope' / TRUTH}: file not found"
    code = run_cli(main, [tmp_path / "none.ecsv", "--truth", good / TRUTH])
    assert code == 2 and "none.ecsv: no such file" in error_line(capsys)


@pytest.mark.parametrize("cmd", ["train", "evaluate", "detect", "baseline", "score", "sim"])
def test_unknown_option_or_config_key(cmd, good, det_ckpt, loc_run, candidates, tmp_path,
                                      monkeypatch, capsys):
    if cmd in ("train", "evaluate"):
        code = command(cmd, good, tmp_path, monkeypatch, det_ckpt, loc_run, candidates,
                       extra=("no_such_key=1",))
        assert code == 2
        assert "Could not override 'no_such_key'" in capsys.readouterr().err  # Hydra's
        return
    if cmd == "sim":
        from rtcnn.sim.__main__ import main

        code = run_cli(main, [tmp_path / "out", "--no-such-option"])
    else:
        code = command(cmd, good, tmp_path, monkeypatch, det_ckpt, loc_run, candidates,
                       extra=("--no-such-option",))
    assert code == 2
    assert "unrecognized arguments: --no-such-option" in error_line(capsys)


def test_sim_output_directory_problems(tmp_path, capsys):
    from rtcnn.sim.__main__ import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, problem in ((afile, "exists and is not a directory"),
                         (afile / "sub", "cannot create the output directory")):
        assert run_cli(main, [out, "--pairs", "1", "--size", "64", "--no-progress"]) == 2
        line = error_line(capsys)
        assert line.startswith(f"rtcnn: error: {out}: {problem}"), line


# --------------------------------------------------------------------------- valid input
def test_nan_pixels_are_masked_and_reported(good, det_ckpt, loc_run, candidates, tmp_path,
                                            monkeypatch, capsys, caplog):
    d = make_case(good, tmp_path / "data", "NaN/inf pixels")
    frac = (NAN_ROWS * SIZE + 1) / SIZE**2
    caplog.set_level(logging.INFO)

    # detect and baseline: no candidate on a masked pixel; the fraction in the catalog
    assert command("detect", d, tmp_path, monkeypatch, det_ckpt) == 0
    cat = Table.read(tmp_path / "det.ecsv", format="ascii.ecsv")
    assert cat.meta["masked_fraction"] == pytest.approx(frac)
    assert np.all(np.asarray(cat["y"]) > NAN_ROWS - 0.5)
    assert "masked NaN/inf pixels" in caplog.text
    assert command("baseline", d, tmp_path, monkeypatch) == 0
    base = Table.read(tmp_path / "base.ecsv", format="ascii.ecsv")
    assert base.meta["masked_fraction"] == pytest.approx(frac)
    assert np.all(np.isfinite(base["x"])) and np.all(np.asarray(base["y"]) > NAN_ROWS - 0.5)
    assert "masked" in capsys.readouterr().out

    # the data module: finite tiles for the network, the fraction in the index and the log
    from rtcnn.data import FitsDataModule

    caplog.clear()
    dm = FitsDataModule(str(d.parent), batch_size=2, num_workers=0, progress=False, min_snr=3,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert dm.index.pairs["masked"][0, 1] == pytest.approx(frac)
    assert "pairs have NaN/inf pixels" in caplog.text
    for split in ("train", "val", "test"):
        ds = dm.datasets[split]
        if len(ds):
            batch = ds.__getitems__(list(range(len(ds))))
            assert np.isfinite(np.asarray(batch["image"])).all()

    # train and score run
    assert command("train", d, tmp_path, monkeypatch) == 0
    assert command("score", d, tmp_path, monkeypatch, candidates=candidates) == 0


def test_empty_truth_catalog_is_valid(good, loc_run, candidates, tmp_path, monkeypatch, capsys):
    d = make_case(good, tmp_path / "data", "empty catalog")
    # score: no transients to find; every candidate a false positive, no crash
    assert command("score", d, tmp_path, monkeypatch, candidates=candidates,
                   extra=("--json", tmp_path / "s.json")) == 0
    import json

    res = json.loads((tmp_path / "s.json").read_text())["methods"]["baseline"]["at_threshold"]
    n = len(Table.read(candidates, format="ascii.ecsv"))
    assert res["n_transients"] == 0 and res["n_detections"] == res["n_false"] == n
    # the data layer: a pair without changes; its tiles are valid negatives (samples=all)
    from rtcnn.data import FitsDataModule

    dm = FitsDataModule(str(d.parent), samples="all", batch_size=2, num_workers=0,
                        progress=False, cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert dm.index.changes["x"].size == 0 and len(dm.datasets["train"]) > 0
    # training attn5 needs transients: a clear refusal, not a crash
    capsys.readouterr()
    assert command("train", d, tmp_path, monkeypatch) == 2
    assert "has a transient that passes the visibility cut" in error_line(capsys)


def test_evaluate_on_a_split_without_tiles_is_one_line(good, loc_run, tmp_path, monkeypatch,
                                                       capsys):
    """One pair all in the training split: no val tiles to evaluate, said in one line."""
    d = make_case(good, tmp_path / "data", "NaN/inf pixels")
    import rtcnn.evaluate as mod

    argv = [f"ckpt_path={loc_run / 'checkpoints' / 'last.ckpt'}", f"data.root={d.parent}",
            f"eval_root={tmp_path / 'eval'}", "splits=[val]"]
    assert run_hydra(mod, argv, monkeypatch, tmp_path) == 2
    assert error_line(capsys) == (f"rtcnn: error: {d.parent}: the val split has no tiles (too "
                                  "few pairs for data.val_fraction/test_fraction, or "
                                  "data.split=region for one pair); evaluate other splits "
                                  "with splits=[...]")


# --------------------------------------------------------------------------- issue 20
# Inputs read wrong, or refused wrongly (points 10, 11, 12, 14, 17).
def _rewrite(path: Path, make) -> None:
    """Replace the FITS file ``path`` by ``make(data, header)`` (an HDUList)."""
    with fits.open(path) as hdul:
        data, header = hdul[0].data.copy(), hdul[0].header.copy()
    path.unlink()
    make(data, header).writeto(path)


def _pair_copy(good: Path, where: Path) -> Path:
    d = where / "pair"
    shutil.copytree(good, d)
    return d


@pytest.mark.parametrize("bzero", [0.0, 16.0], ids=["bscale", "bscale-bzero"])
def test_scaled_integer_pair_is_read(bzero, small_pairs, tmp_path, capsys):
    """Valid FITS with BSCALE/BZERO (int16 on disk) give the catalog of the float images
    they encode (an epochs pair: two noise draws). (uint16 with BZERO = 32768 is read
    exactly: tests/test_io.py.)"""
    from rtcnn.baseline import main

    d = _pair_copy(small_pairs / "pair_0000", tmp_path)
    assert run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "float.ecsv"]) == 0

    def scaled(data, header):
        hdu = fits.PrimaryHDU(data.astype(np.float32), header=header)
        hdu.scale("int16", bscale=1e-3, bzero=bzero)  # 0.001 e-/s steps, 5 % of the noise
        return fits.HDUList([hdu])

    for name in (REF, NEW):
        _rewrite(d / name, scaled)
    header = fits.getheader(d / NEW)
    assert header["BITPIX"] == 16 and header["BSCALE"] == 1e-3
    assert run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "int.ecsv"]) == 0, \
        capsys.readouterr().err
    flt, scl = (Table.read(tmp_path / n, format="ascii.ecsv") for n in ("float.ecsv",
                                                                         "int.ecsv"))
    assert len(flt) > 0 and abs(len(scl) - len(flt)) <= 1  # a threshold case may flip
    dist = np.hypot(np.asarray(scl["x"])[:, None] - np.asarray(flt["x"])[None],
                    np.asarray(scl["y"])[:, None] - np.asarray(flt["y"])[None])
    assert int((dist.min(axis=1) < 0.05).sum()) >= min(len(scl), len(flt)) - 1


def test_one_plane_cube_pair_with_sip_header(good, tmp_path, capsys):
    """The simulator's own TAN-SIP header on a NAXIS3 = 1 cube: same catalog, same RA/Dec."""
    from rtcnn.baseline import main

    d = _pair_copy(good, tmp_path)
    assert "A_ORDER" in fits.getheader(d / NEW)
    assert run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "flat.ecsv"]) == 0
    for name in (REF, NEW):
        _rewrite(d / name, lambda data, header: fits.HDUList([fits.PrimaryHDU(data[None],
                                                                              header)]))
    assert fits.getheader(d / NEW)["NAXIS"] == 3
    assert run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "cube.ecsv"]) == 0, \
        capsys.readouterr().err
    flat, cube = (Table.read(tmp_path / n, format="ascii.ecsv") for n in ("flat.ecsv",
                                                                           "cube.ecsv"))
    assert len(flat) > 0 and len(cube) == len(flat)
    for col in ("x", "y", "ra", "dec"):
        np.testing.assert_allclose(cube[col], flat[col], rtol=0, atol=1e-9)


@pytest.mark.parametrize("cmd", ["detect", "baseline"])
def test_singular_cd_matrix_is_one_line(cmd, good, det_ckpt, tmp_path, monkeypatch, capsys):
    """A zero CD matrix: no wrong RA/Dec with exit 0, but one line naming the file."""
    d = _pair_copy(good, tmp_path)

    def zero_cd(data, header):
        for key in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            header[key] = 0.0
        return fits.HDUList([fits.PrimaryHDU(data, header)])

    for name in (REF, NEW):
        _rewrite(d / name, zero_cd)
    assert command(cmd, d, tmp_path, monkeypatch, det_ckpt) == 2
    line = error_line(capsys)
    assert line.startswith(f"rtcnn: error: {d / NEW}: the header WCS is unusable (its CD/PC "
                           "matrix is singular)"), line


def test_dq_extension_placed_first_is_not_the_image(good, tmp_path, capsys):
    from rtcnn.baseline import main

    d = _pair_copy(good, tmp_path)
    ref_cat = tmp_path / "plain.ecsv"
    assert run_cli(main, [d / REF, d / NEW, "-o", ref_cat]) == 0

    def dq_first(data, header):
        return fits.HDUList([fits.PrimaryHDU(np.zeros(data.shape, np.int32)),
                             fits.ImageHDU(data, header, name="SCI")])

    for name in (REF, NEW):
        _rewrite(d / name, dq_first)
    assert run_cli(main, [d / REF, d / NEW, "-o", tmp_path / "mef.ecsv"]) == 0, \
        capsys.readouterr().err
    plain = Table.read(ref_cat, format="ascii.ecsv")
    mef = Table.read(tmp_path / "mef.ecsv", format="ascii.ecsv")
    assert len(plain) > 0 and len(mef) == len(plain)
    np.testing.assert_allclose(mef["x"], plain["x"], rtol=0, atol=1e-9)


@pytest.mark.parametrize("ny, nx", [(10, 4000), (1, 1)])
def test_too_small_image_is_reported_as_it_is(ny, nx, good, det_ckpt, tmp_path, monkeypatch,
                                              capsys):
    """The detector names the new image and its real size (not the size padded to the
    network stride). (The baseline works on a 10 x 4000 px image, and a 1 x 1 px one is
    "fewer than 100 unmasked pixels" for it, already one line naming the file.)"""
    d = _pair_copy(good, tmp_path)
    rng = np.random.default_rng(3)

    def small(data, header):
        return fits.HDUList([fits.PrimaryHDU(rng.normal(0, 1, (ny, nx)).astype(np.float32),
                                             header)])

    for name in (REF, NEW):
        _rewrite(d / name, small)
    assert command("detect", d, tmp_path, monkeypatch, det_ckpt) == 2
    line = error_line(capsys)
    assert line == (f"rtcnn: error: {d / NEW}: image {nx} x {ny} px is too small: the detector "
                    "needs at least 32 x 32 px"), line
