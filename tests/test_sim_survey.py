"""rtcnn.sim survey and dither modes, and bands drawn per pair.

* A galaxy is the same on the sky in every exposure: drawn at roll A and resampled to
  roll B (:mod:`rtcnn.align`) it matches the galaxy drawn at roll B (and does not without
  the Jacobian: the test can fail).
* ``--mode survey`` writes a north-up coadd reference of another size and grid, with its
  planes; aligned, the difference is at the expected noise and a bright transient is
  found where the truth (new grid) puts it.
* ``--mode dither`` pairs are on two grids (``read_pair`` refuses them unaligned).
* ``bands`` draws the band per pair, in either spelling, without touching other modes.
"""

from __future__ import annotations

import math

import galsim
import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import mad_std

from rtcnn.align import align_pair, read_aligned_pair
from rtcnn.errors import RtcnnInputError
from rtcnn.io import Image, read_pair, read_truth
from rtcnn.roman import BANDS, magzp
from rtcnn.sim import render
from rtcnn.sim.dataset import simulate_dataset
from rtcnn.sim.scene import Pointing, Scene, pair_band, resolve_params
from rtcnn.sim.survey import astropy_wcs, exposure_wcs, frame_positions, render_frame

SIZE = 96


def _one_galaxy(size: int) -> Scene:
    c = (size - 1) / 2.0 + 0.3
    f = np.array
    return Scene(id=f([0]), kind=f(["galaxy"]).astype("<U9"), x=f([c]), y=f([c - 0.2]),
                 mag_ref=f([19.0]), mag_new=f([19.0]), hlr=f([0.45]), g1=f([0.35]),
                 g2=f([-0.2]), host_id=f([-1]))  # fmt: skip


def _round_psf() -> render.PsfModel:
    """A round, well-sampled PSF: the test isolates the galaxy's own shape."""
    g = galsim.Gaussian(fwhm=0.25)
    return render.PsfModel(point=g, optical=g, epsf=np.zeros((1, 1)), key=("test",))


def test_galaxy_is_the_same_on_the_sky_at_two_rolls():
    size, zp = 64, 26.0
    scene, psf = _one_galaxy(size), _round_psf()
    a = Pointing(ra=9.5, dec=-44.0, pa=20.0, sca=7, x0=1500, y0=1700)
    wcs_a = render.cutout_wcs(a, 61587.0)
    centre = wcs_a.toWorld(galsim.PositionD((size + 1) / 2, (size + 1) / 2))
    wcs_b, _ = exposure_wcs(centre, 20.0 + 73.0, 7, 1500, 1700, size, 61587.0)
    aw_a, aw_b = astropy_wcs(wcs_a, size), astropy_wcs(wcs_b, size)
    drawn_a = render.render_static(size, psf, scene, scene.mag_ref, zp)
    fx, fy, jac = frame_positions(wcs_a, aw_b, scene.x, scene.y, jacobian=True)
    assert np.allclose(np.linalg.det(jac), 1.0, atol=2e-3)  # a rotation: same pixel area
    drawn_b = render_frame(size, psf, scene, scene.mag_ref, zp, fx, fy, jac)
    on_b, _, info = align_pair(Image.from_array(drawn_a, wcs=aw_a, zeropoint=zp),
                               Image.from_array(drawn_b, wcs=aw_b, zeropoint=zp),
                               correct_offset=False)
    assert info.method == "spline3" and info.grid_offset_px > 5
    covered = ~on_b.mask if on_b.mask is not None else np.ones((size, size), bool)
    peak = drawn_b.max()
    resid = np.abs(on_b.data - drawn_b)[covered]
    assert resid.max() < 0.02 * peak
    assert on_b.data[covered].sum() == pytest.approx(drawn_b[covered].sum(), rel=0.005)
    # the old way (the scene's shape copied into the other frame unrotated) does not match
    unrotated = render_frame(size, psf, scene, scene.mag_ref, zp, fx, fy,
                             np.broadcast_to(np.eye(2), jac.shape))
    assert np.abs(on_b.data - unrotated)[covered].max() > 0.1 * peak


@pytest.fixture(scope="module")
def survey_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("survey")
    d = simulate_dataset(root, 1, SIZE, "survey", 11, progress=False, n_epochs=3,
                         forced_transients=[(40.3, 52.6, 22.0)])[0]
    return d


def test_survey_pair_reference_is_a_coadd_on_another_grid(survey_pair):
    d = survey_pair
    with fits.open(d / "ref.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "VAR", "NEXP", "WHT"]
        side = math.ceil(SIZE * math.sqrt(2)) + 2
        assert hdul[0].data.shape == (side, side)
        assert hdul[0].header["NCOMBINE"] == 3
        assert hdul[0].header["CTYPE1"].startswith("RA---TAN")
    with pytest.raises(RtcnnInputError, match="another pixel grid"):
        read_pair(d / "ref.fits", d / "new.fits")
    ref, new, info = read_aligned_pair(d / "ref.fits", d / "new.fits")
    assert info.method == "spline3"
    assert info.uncovered_fraction == 0.0  # every exposure covers the new image
    assert info.ref_variance is not None and info.ref_variance.shape == new.shape
    truth = read_truth(d / "truth.ecsv")
    assert np.all((truth["x"] >= -0.5) & (truth["x"] < SIZE - 0.5))
    # the difference is at the expected noise (the resampled coadd's noise is correlated
    # and lower per pixel, so the difference is at most as noisy as sigma_diff)
    diff = new.data - ref.data
    sigma = truth.meta["sigma_diff"]
    assert 0.6 * sigma < mad_std(diff) < 1.15 * sigma
    # the bright forced transient is found at its truth position (new grid)
    from rtcnn.baseline import run_baseline

    cat = run_baseline(d / "ref.fits", d / "new.fits", threshold=5.0)
    dist = np.hypot(np.asarray(cat["x"]) - 40.3, np.asarray(cat["y"]) - 52.6)
    assert dist.min() < 0.1


def test_survey_is_reproducible(tmp_path):
    kw = {"progress": False, "n_epochs": 2, "n_galaxies": 5, "n_stars": 5, "n_transients": 2}
    a = simulate_dataset(tmp_path / "a", 1, 64, "survey", 4, **kw)[0]
    b = simulate_dataset(tmp_path / "b", 1, 64, "survey", 4, **kw)[0]
    for name in ("ref.fits", "new.fits", "truth.ecsv", "params.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_dither_pair_is_two_single_exposures_on_two_grids(tmp_path):
    d = simulate_dataset(tmp_path, 1, SIZE, "dither", 12, progress=False, n_galaxies=20,
                         n_stars=10)[0]
    ref, new = read_pair(d / "ref.fits", d / "new.fits", other_grid=True)
    assert ref.shape == new.shape == (SIZE, SIZE)
    assert "NCOMBINE" not in ref.header
    _, _, info = align_pair(ref, new)
    assert info.method == "spline3" and info.grid_offset_px > 1


def test_bands_drawn_per_pair_in_either_spelling():
    p = resolve_params("epochs", 64, bands="all")
    assert p["bands"] == list(BANDS)
    drawn = {pair_band(p, 0, i) for i in range(60)}
    assert drawn == set(BANDS)
    assert pair_band(p, 0, 5) == pair_band(p, 0, 5)
    assert resolve_params("inject", 64, bands="F106,f129")["bands"] == ["Y106", "J129"]
    with pytest.raises(RtcnnInputError, match="Q999"):
        resolve_params("inject", 64, bands="Q999")
    # the other modes' parameters (and so their params.json) are what they were
    assert "bands" not in resolve_params("inject", 64) and "n_epochs" not in resolve_params(
        "epochs", 64)


def test_band_of_a_pair_reaches_its_files(tmp_path):
    d = simulate_dataset(tmp_path, 1, 64, "inject", 2, progress=False, bands=["Y106"],
                         n_galaxies=3, n_stars=3, n_transients=1)[0]
    with fits.open(d / "new.fits") as hdul:
        assert hdul[0].header["BAND"] == "Y106"
        assert hdul[0].header["MAGZP"] == pytest.approx(magzp("Y106"))
