"""rtcnn.coadd: exposures at other rolls and dithers combined on one grid, cosmic rays rejected.

The sky is analytic (:mod:`synthetic_sky`), so the coadd has an exact truth: the same sky
drawn directly on the coadd grid.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from numpy.testing import assert_allclose
from synthetic_sky import draw, make_wcs, sky, write

from rtcnn.coadd import main as coadd_main
from rtcnn.io import read_image

SHAPE = (96, 96)  # exposures
NOISE = 0.3  # e-/s per pixel per exposure
ROLLS = (0.0, 72.0, 144.0, 216.0, 288.0)
STAR = (47.3, 48.6, 2000.0)  # x, y on the north-up grid (px), flux e-/s
CR_XY = (30, 62)  # exposure-2 pixel hit by a cosmic ray (e-/s), far from the star


@pytest.fixture(scope="module")
def exposures(tmp_path_factory):
    """Five exposures of one sky at five rolls and dithers; exposure 2 has a cosmic ray."""
    d = tmp_path_factory.mktemp("coadd")
    rng = np.random.default_rng(20)
    grid = make_wcs((110, 110))  # the north-up grid the test expects (centre = sky centre)
    ra, dec, flux = sky(rng, 25, grid, (110, 110), flux=(20.0, 300.0))
    sra, sdec = grid.all_pix2world([STAR[0]], [STAR[1]], 0)
    ra, dec, flux = np.r_[ra, sra], np.r_[dec, sdec], np.r_[flux, STAR[2]]
    paths = []
    for k, roll in enumerate(ROLLS):
        dither = rng.uniform(-3, 3, 2)
        w = make_wcs(SHAPE, roll=roll, crpix=[(SHAPE[1] + 1) / 2 + dither[0],
                                              (SHAPE[0] + 1) / 2 + dither[1]])
        img = draw(w, SHAPE, ra, dec, flux, NOISE, rng)
        if k == 2:
            img[CR_XY[1], CR_XY[0]:CR_XY[0] + 3] += 400.0  # a 3-pixel cosmic-ray track
        paths.append(write(d / f"epoch{k}.fits", img, w))
    return d, paths, grid, (ra, dec, flux)


def test_coadd_rejects_cosmic_ray_and_conserves_flux(exposures):
    d, paths, _, (ra, dec, flux) = exposures
    out = d / "ref.fits"
    assert coadd_main([*map(str, paths), "-o", str(out), "--size", "110", "--no-progress"]) == 0
    with fits.open(out) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "VAR", "NEXP", "WHT"]
        data, var, nexp = hdul[0].data, hdul["VAR"].data, hdul["NEXP"].data
        assert hdul[0].header["NCOMBINE"] == 5
        assert hdul[0].header["EXPTIME"] == pytest.approx(500.0)
    ref = read_image(out)
    truth = draw(ref.wcs, ref.shape, ra, dec, flux)  # the sky drawn on the coadd grid
    # the cosmic ray lands where exposure 2's pixel maps on the coadd grid
    w2 = read_image(paths[2]).wcs
    cx, cy = ref.wcs.world_to_pixel(w2.pixel_to_world(CR_XY[0] + 1, CR_XY[1]))
    ix, iy = round(float(cx)), round(float(cy))
    box = (slice(iy - 2, iy + 3), slice(ix - 2, ix + 3))
    sigma = np.sqrt(var[box])
    assert np.all(np.abs(data[box] - truth[box]) < 5 * sigma)  # a plain mean: 80 e-/s
    assert np.all(nexp[iy, ix] == 4)  # the hit exposure was rejected there
    # nothing else is rejected: the centre is covered by all five exposures
    assert nexp[50, 50] == 5
    # the star's flux in a 15x15 box is the truth's within 1 %
    sx, sy = round(STAR[0]), round(STAR[1])
    sbox = (slice(sy - 7, sy + 8), slice(sx - 7, sx + 8))
    assert data[sbox].sum() == pytest.approx(truth[sbox].sum(), rel=0.01)
    assert nexp[sy, sx] == 5  # the star's core was not clipped in any exposure
    # the variance plane is the background noise of a 5-exposure mean (resampling smooths
    # the noise, so the measured scatter is lower than the plane)
    assert_allclose(np.median(var[nexp == 5]), NOISE**2 / 5, rtol=0.5)
    resid = (data - truth)[nexp == 5]
    assert np.std(resid) < np.sqrt(NOISE**2 / 5) * 1.1


def test_coadd_first_grid_and_errors(exposures, capsys):
    d, paths, _, _ = exposures
    out = d / "first.fits"
    assert coadd_main([*map(str, paths[:3]), "-o", str(out), "--grid", "FIRST",
                       "--no-progress"]) == 0
    ref, first = read_image(out), read_image(paths[0])
    assert ref.shape == first.shape
    assert np.allclose(ref.wcs.wcs.crpix, first.wcs.wcs.crpix)
    # an existing output is never replaced without --overwrite; one line, exit 2
    with pytest.raises(SystemExit) as exc:
        coadd_main([*map(str, paths[:3]), "-o", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"rtcnn: error: {out}: already exists; pass --overwrite to replace it"]
    # an exposure without WCS
    bad = write(d / "nowcs.fits", np.zeros(SHAPE), None)
    with pytest.raises(SystemExit):
        coadd_main([str(paths[0]), str(bad), "-o", str(d / "x.fits"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowcs.fits" in err[0] and "WCS" in err[0]
    assert not (d / "x.fits").exists()
