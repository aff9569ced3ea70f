"""The classical baseline on a synthetic pair with Roman-PSF sources at known positions."""

import math

import galsim
import galsim.roman
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose

from rtcnn import baseline
from rtcnn.baseline import run_baseline
from rtcnn.difference import pixel_gauss, psf_sigma, snr_map
from rtcnn.measure import fit_psf

SIZE = 128  # px
SIGMA_PIX = 0.08  # e-/s, background noise per pixel of each image
EXPTIME = 140.0  # s
MAGZP = 26.5  # AB mag of 1 e-/s
STARS = [(15.2, 15.7, 80.0), (64.5, 64.5, 200.0), (110.3, 80.1, 40.0)]  # x, y, e-/s
TRANSIENTS = [(30.3, 40.7, 20.0), (90.6, 100.2, 8.0)]  # only in the new image
FADED = (60.25, 20.5, 15.0)  # only in the reference
VARIABLE = (100.4, 30.8, 30.0, 45.0)  # x, y, flux_ref, flux_new


@pytest.fixture(scope="module")
def roman_psf():
    bp = galsim.roman.getBandpasses()["H158"]
    return galsim.roman.getPSF(1, "H158", pupil_bin=8, wavelength=bp.effective_wavelength)


def render(psf, sources, rng):
    """Noisy e-/s image with point sources drawn by GalSim (pixel-integrated Roman PSF)."""
    img = galsim.ImageF(SIZE, SIZE, scale=galsim.roman.pixel_scale)
    for x, y, flux in sources:
        # GalSim pixels are 1-based: 0-based (x, y) is GalSim (x + 1, y + 1)
        stamp = (psf * flux).drawImage(nx=33, ny=33, scale=galsim.roman.pixel_scale,
                                       center=galsim.PositionD(x + 1, y + 1))  # fmt: skip
        b = stamp.bounds & img.bounds
        img[b] += stamp[b]
    return img.array + rng.normal(0.0, SIGMA_PIX, (SIZE, SIZE)).astype(np.float32)


def header():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crpix = [64.5, 64.5]
    w.wcs.crval = [9.5, -44.0]
    w.wcs.cdelt = [-0.11 / 3600, 0.11 / 3600]
    h = w.to_header()
    h.update({"BUNIT": "electron/s", "BAND": "H158", "EXPTIME": EXPTIME, "MAGZP": MAGZP})
    return h


@pytest.fixture(scope="module")
def pair(tmp_path_factory, roman_psf):
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("pair") / "pair_0000"
    d.mkdir()
    vx, vy, vref, vnew = VARIABLE
    ref = render(roman_psf, STARS + [FADED, (vx, vy, vref)], rng)
    new = render(roman_psf, STARS + TRANSIENTS + [(vx, vy, vnew)], rng)
    new[70, 70] += 6.0  # cosmic ray: one pixel
    ref[110, 20:22] += 4.0  # cosmic ray: a two-pixel track
    fits.PrimaryHDU(ref.astype(np.float32), header()).writeto(d / "ref.fits")
    fits.PrimaryHDU(new.astype(np.float32), header()).writeto(d / "new.fits")
    return d


def test_recovers_changes_rejects_cosmic_rays(pair):
    cat = run_baseline(pair / "ref.fits", pair / "new.fits")
    truth = np.array([t[:2] for t in TRANSIENTS] + [FADED[:2], VARIABLE[:2]])
    assert len(cat) == 4, cat
    xy = np.column_stack([cat["x"], cat["y"]])
    d = np.hypot(*(xy[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    nearest = d.argmin(axis=1)
    assert sorted(nearest.tolist()) == [0, 1, 2, 3]
    assert d.min(axis=1).max() < 0.1  # sub-pixel positions within 0.1 px
    bright = dict(zip(nearest.tolist(), np.asarray(cat["brightened"]).tolist()))
    assert bright == {0: True, 1: True, 2: False, 3: True}
    # variable: |m_ref - m_new| = 2.5 log10(45 / 30) by aperture photometry
    var_row = int(np.flatnonzero(nearest == 3)[0])
    assert_allclose(cat["dmag"][var_row], 2.5 * math.log10(45 / 30), atol=0.05)
    # scores are PSF S/N, sorted, and the metadata says what was done
    assert np.all(np.diff(cat["score"]) <= 0) and cat["score"].min() >= 5
    assert cat.meta["model"] == "baseline" and cat.meta["fwhm_px"] == pytest.approx(1.393)
    assert cat.meta["image_shape"] == [SIZE, SIZE]
    assert_allclose(cat.meta["sigma_bkg"], math.sqrt(2) * SIGMA_PIX, rtol=0.05)


def test_snr_map_is_unit_normal_on_noise():
    rng = np.random.default_rng(0)
    diff = rng.normal(0, 0.1, (400, 400)).astype(np.float32)
    snr = snr_map(diff, np.full(diff.shape, 0.01, np.float32), 1.393)
    inner = snr[10:-10, 10:-10]
    assert abs(inner.std() - 1.0) < 0.03 and abs(inner.mean()) < 0.03


def test_psf_fit_positions_and_flux():
    """The fit recovers positions and fluxes of its own model on a noiseless image."""
    sigma = psf_sigma(1.393)
    truth = [(20.3, 21.8, 5.0), (40.0, 40.45, -3.0)]
    yy, xx = np.mgrid[0:64, 0:64].astype(float)
    img = np.zeros((64, 64))
    for x, y, f in truth:
        img += f * pixel_gauss(xx - x, sigma) * pixel_gauss(yy - y, sigma)
    var = np.full(img.shape, 1e-4)
    fit = fit_psf(img, var, np.array([20, 40]), np.array([22, 40]), sigma)
    assert_allclose(fit["x"], [20.3, 40.0], atol=1e-4)
    assert_allclose(fit["y"], [21.8, 40.45], atol=1e-4)
    assert_allclose(fit["flux"], [5.0, -3.0], rtol=1e-4)
    assert fit["ok"].all()


def test_cli_writes_refuses_overwrite(pair, tmp_path, capsys):
    out, reg = tmp_path / "b.ecsv", tmp_path / "b.reg"
    args = [str(pair / "ref.fits"), str(pair / "new.fits"), "-o", str(out), "--regions", str(reg)]
    assert baseline.main(args) == 0
    assert "4 candidates (3 brightened, 1 faded)" in capsys.readouterr().out
    t = Table.read(out)
    assert len(t) == 4 and t["ra"].unit == "deg" and t.meta["new"].endswith("new.fits")
    assert reg.read_text().count("circle(") == 4
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exc:
        baseline.main(args)
    assert exc.value.code == 2
    assert "b.ecsv: already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert baseline.main(args + ["--overwrite", "--threshold", "50"]) == 0
    assert len(Table.read(out)) < 4


def test_cli_directory_writes_one_catalog_per_pair(pair, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(pair, data / "pair_0000")
    shutil.copytree(pair, data / "pair_0001")
    out = tmp_path / "cats"
    assert baseline.main([str(data), "-o", str(out), "--regions"]) == 0
    for name in ("pair_0000", "pair_0001"):
        assert (out / f"{name}.ecsv").is_file() and (out / f"{name}.reg").is_file()
    (tmp_path / "file.ecsv").write_text("keep")
    with pytest.raises(SystemExit):
        baseline.main([str(data), "-o", str(tmp_path / "file.ecsv")])
    assert "is a file; several pairs need an output directory" in capsys.readouterr().err


def test_cli_bad_inputs(pair, tmp_path, capsys):
    small = tmp_path / "small.fits"  # another shape and no WCS: cannot be put on one grid
    fits.PrimaryHDU(np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)).writeto(small)
    with pytest.raises(SystemExit) as exc:
        baseline.main([str(pair / "ref.fits"), str(small), "-o", str(tmp_path / "x.ecsv")])
    assert exc.value.code == 2
    assert "rtcnn: error:" in capsys.readouterr().err
    assert not (tmp_path / "x.ecsv").exists()
    with pytest.raises(SystemExit):
        baseline.main([str(pair / "ref.fits"), str(pair / "new.fits"), "-o",
                       str(tmp_path / "x.ecsv"), "--fwhm", "0.5"])  # fmt: skip
    assert "--fwhm 0.5 px is too small" in capsys.readouterr().err


def test_scored_against_its_truth(pair, tmp_path):
    """The pair's catalog scores perfectly; the photometric truth dmag of the variable
    is |m_ref - m_new| and the hostless transients' (lower limits) are left out."""
    from rtcnn.scoring import evaluate, pair_score, photometric_dmag

    rows = [(x, y, np.nan, MAGZP - 2.5 * math.log10(f), "transient") for x, y, f in TRANSIENTS]
    rows.append((FADED[0], FADED[1], MAGZP - 2.5 * math.log10(FADED[2]), np.nan, "transient"))
    vx, vy, vref, vnew = VARIABLE
    rows.append((vx, vy, MAGZP - 2.5 * math.log10(vref), MAGZP - 2.5 * math.log10(vnew),
                 "variable"))  # fmt: skip
    truth = Table(rows=rows, names=("x", "y", "mag_ref", "mag_new", "kind"))
    td = photometric_dmag(truth, pair / "ref.fits", pair / "new.fits")
    assert np.isnan(td[:3]).all()  # absent from one image, nothing underneath: limits
    assert_allclose(td[3], 2.5 * math.log10(45 / 30), atol=0.02)
    cat = run_baseline(pair / "ref.fits", pair / "new.fits")
    r = evaluate([pair_score("p", cat, truth, SIZE * SIZE, td)])
    assert r["completeness"] == 1.0 and r["n_false"] == 0 and r["sign_accuracy"] == 1.0
    assert r["n_dmag"] == 1 and r["dmag_median_abs_err"] < 0.05
    assert r["loc_median_px"] < 0.1


def test_noise_peak_counts_follow_gaussian_tails():
    """White noise through the PSF matched filter: the peak counts fall steeply with the
    level (~exp(-X^2/2)), none at 7 sigma in 512^2 px, and the field size is checked."""
    from rtcnn.difference import noise_peak_counts

    counts = noise_peak_counts(1.393, (2.0, 3.0, 4.0, 7.0), shape=(512, 512), seed=3)
    c2, c3, c4, c7 = (counts[k] for k in ("2", "3", "4", "7"))
    assert c2 > c3 > c4 and c7 == 0
    # ratio of X exp(-X^2/2) between 3 and 2 sigma (peak density of a 2-D Gaussian field)
    assert_allclose(c3 / c2, 3 * np.exp(-4.5) / (2 * np.exp(-2.0)), rtol=0.25)
    with pytest.raises(ValueError, match="shape must be 2 sides"):
        noise_peak_counts(1.393, (5.0,), shape=(3, 100))
