"""rtcnn.align: references on another pixel grid are put on the new image's grid.

The sky is analytic (:mod:`synthetic_sky`): Gaussian sources at fixed RA/Dec drawn through
each image's own WCS, so "the reference resampled onto the new grid" has an exact truth:
the same sky drawn directly on the new grid. Transients are found with the real
difference-image path (``rtcnn.baseline.run_baseline``), which reads pairs through
:func:`rtcnn.align.read_aligned_pair`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose
from synthetic_sky import SIGMA_PX, draw, make_wcs, sky, write

from rtcnn.align import align_pair, grid_offset, pixel_map, read_aligned_pair, resample
from rtcnn.baseline import main as baseline_main
from rtcnn.baseline import run_baseline
from rtcnn.errors import RtcnnInputError
from rtcnn.io import Image, read_image

SHAPE = (128, 128)  # new image (ny, nx)
FWHM = 2.3548 * SIGMA_PX  # px, of the synthetic PSF (given to the baseline)
NOISE_NEW, NOISE_REF = 0.5, 0.25  # e-/s per pixel
TRANSIENT_FLUX = 1500.0  # e-/s: S/N ~ 500 in the difference


def _pair(tmp_path, rng, ref_wcs, ref_shape, new_wcs=None, transients=((60.3, 70.6),),
          zp_ref=26.0, zp_new=26.0, n_stars=40, header_ref_wcs=None, extra_ref=()):
    """Write ref.fits / new.fits of one sky; transients (new px) only in the new image."""
    new_wcs = make_wcs(SHAPE) if new_wcs is None else new_wcs
    ra, dec, flux = sky(rng, n_stars, new_wcs, SHAPE)
    ref = draw(ref_wcs, ref_shape, ra, dec, flux * 10 ** (0.4 * (zp_ref - zp_new)),
               NOISE_REF, rng)
    new = draw(new_wcs, SHAPE, ra, dec, flux, NOISE_NEW, rng)
    if transients:
        tx, ty = np.array(transients, float).T
    else:
        tx, ty = np.zeros(0), np.zeros(0)
    tra, tdec = new_wcs.all_pix2world(tx, ty, 0)
    new += draw(new_wcs, SHAPE, tra, tdec, np.full(tx.size, TRANSIENT_FLUX))
    ref_path = write(tmp_path / "ref.fits", ref, header_ref_wcs or ref_wcs, zp=zp_ref,
                     extra=extra_ref)
    new_path = write(tmp_path / "new.fits", new, new_wcs, zp=zp_new)
    return ref_path, new_path, (ra, dec, flux)


def _nearest(cat, x, y):
    d = np.hypot(np.asarray(cat["x"]) - x, np.asarray(cat["y"]) - y)
    return int(np.argmin(d)), float(d.min())


def test_rotated_same_shape_pair_is_aligned_and_transient_recovered(tmp_path):
    rng = np.random.default_rng(1)
    ref_wcs = make_wcs(SHAPE, roll=30.0)
    ref_path, new_path, _ = _pair(tmp_path, rng, ref_wcs, SHAPE)
    cat = run_baseline(ref_path, new_path, threshold=5.0, fwhm=FWHM)
    assert cat.meta["align_method"] == "spline3"
    assert cat.meta["align_grid_offset_px"] > 10
    k, dist = _nearest(cat, 60.3, 70.6)
    assert dist < 0.1
    assert k == int(np.argmax(cat["score"]))  # the transient is the strongest change
    # the rotated stars subtract: nothing else comes near the transient's S/N
    others = np.delete(np.asarray(cat["score"]), k)
    assert others.size == 0 or others.max() < 0.1 * cat["score"][k]


def test_coadd_of_another_size_and_origin_is_aligned(tmp_path):
    rng = np.random.default_rng(2)
    ref_shape = (170, 150)
    ref_wcs = make_wcs(ref_shape, roll=0.0, crpix=[40.2, 100.7])  # north-up, other origin
    new_wcs = make_wcs(SHAPE, roll=47.0)
    ra, dec, flux = sky(rng, 40, new_wcs, SHAPE)
    ref = Image.from_array(draw(ref_wcs, ref_shape, ra, dec, flux), wcs=ref_wcs, zeropoint=26.0)
    new = Image.from_array(draw(new_wcs, SHAPE, ra, dec, flux), wcs=new_wcs, zeropoint=26.0)
    on_new, same_new, info = align_pair(ref, new, correct_offset=False)
    assert same_new is new
    assert on_new.shape == SHAPE and on_new.wcs is new.wcs
    assert info.method == "spline3"
    covered = ~on_new.mask if on_new.mask is not None else np.ones(SHAPE, bool)
    assert covered.mean() > 0.5
    # the resampled coadd is the sky drawn on the new grid (cubic spline of a 2.35 px PSF)
    resid = np.abs(on_new.data - new.data)[covered]
    assert resid.max() < 0.03 * new.data.max()
    # and the baseline finds a transient on that pair within 0.1 px
    ref_path, new_path, _ = _pair(tmp_path, rng, ref_wcs, ref_shape, new_wcs,
                                  transients=((70.4, 50.8),))
    cat = run_baseline(ref_path, new_path, threshold=5.0, fwhm=FWHM)
    assert _nearest(cat, 70.4, 50.8)[1] < 0.1


def test_partial_overlap_masks_uncovered_pixels(tmp_path):
    rng = np.random.default_rng(3)
    shift = 50.5  # px: the reference covers new x < 128 - 50.5 - 1 (spline edge)
    ref_wcs = make_wcs(SHAPE, crpix=[(SHAPE[1] + 1) / 2 - shift, (SHAPE[0] + 1) / 2])
    ref_path, new_path, _ = _pair(tmp_path, rng, ref_wcs, SHAPE,
                                  transients=((40.2, 60.7), (110.3, 60.2)))
    ref, _, info = read_aligned_pair(ref_path, new_path)
    # reference x = new x - 50.5: covered where 1 <= x_ref <= 126 (EDGE_PX = 1 px of the
    # spline), i.e. new columns 52..127; the reference's own first/last rows are edge too
    x = np.arange(SHAPE[1])
    cols = (x - shift < 1.0) | (x - shift > SHAPE[1] - 2.0)
    assert np.array_equal(ref.mask[2:-2], np.broadcast_to(cols, (SHAPE[0] - 4, SHAPE[1])))
    assert ref.mask[[0, -1]].all()
    expect = (cols.sum() * SHAPE[0] + 2 * (~cols).sum()) / ref.mask.size
    assert info.uncovered_fraction == pytest.approx(expect, abs=0.01)
    cat = run_baseline(ref_path, new_path, threshold=5.0, fwhm=FWHM)
    assert cat.meta["align_uncovered"] == pytest.approx(info.uncovered_fraction, abs=1e-6)
    assert _nearest(cat, 110.3, 60.2)[1] < 0.1  # covered: found
    assert np.all(np.asarray(cat["x"]) > shift + 1.0 - 0.5)  # nothing where uncovered
    assert len(cat) >= 1


def test_zeropoint_mismatch_is_corrected(tmp_path):
    rng = np.random.default_rng(4)
    ref_wcs = make_wcs(SHAPE, roll=-20.0)
    new_wcs = make_wcs(SHAPE)
    # the reference in units 2.5x larger (zero point 1 mag brighter); a variable star
    # goes from 20.0 to 20.5 mag (AB, zp 26 of the new image: 251 -> 158 e-/s)
    ra, dec, flux = sky(rng, 30, new_wcs, SHAPE, flux=(30.0, 300.0))
    vra, vdec = new_wcs.all_pix2world([64.2], [63.7], 0)
    f_ref, f_new = 10 ** (-0.4 * (20.0 - 26.0)), 10 ** (-0.4 * (20.5 - 26.0))
    zp_ref = 27.0
    ref = draw(ref_wcs, SHAPE, np.r_[ra, vra], np.r_[dec, vdec],
               np.r_[flux, f_ref] * 10 ** (0.4 * (zp_ref - 26.0)), NOISE_REF, rng)
    new = draw(new_wcs, SHAPE, np.r_[ra, vra], np.r_[dec, vdec], np.r_[flux, f_new],
               NOISE_NEW, rng)
    ref_path = write(tmp_path / "ref.fits", ref, ref_wcs, zp=zp_ref)
    new_path = write(tmp_path / "new.fits", new, new_wcs, zp=26.0)
    on_new, new_img, info = read_aligned_pair(ref_path, new_path)
    assert info.zp_scale == pytest.approx(10 ** (-0.4), rel=1e-9)
    assert on_new.zeropoint == new_img.zeropoint == 26.0
    cat = run_baseline(ref_path, new_path, threshold=5.0, fwhm=FWHM)
    k, dist = _nearest(cat, 64.2, 63.7)
    assert dist < 0.1
    assert abs(cat["dmag"][k] - 0.5) < 0.05
    assert not cat["brightened"][k]


@pytest.mark.parametrize(("crpix_shift", "roll", "same"), [
    ((0.0, 0.0), 0.0, True),
    ((0.004, -0.004), 0.0, True),  # 0.006 px <= 0.01 px: one grid
    ((0.02, 0.0), 0.0, False),
    ((0.0, 0.0), 0.02, False),  # 0.02 deg roll: 0.03 px at the corners
    ((0.0, 0.0), 180.0, False),
])
def test_grid_equality_decision(crpix_shift, roll, same):
    rng = np.random.default_rng(5)
    new_wcs = make_wcs(SHAPE)
    c = [(SHAPE[1] + 1) / 2 + crpix_shift[0], (SHAPE[0] + 1) / 2 + crpix_shift[1]]
    ref_wcs = make_wcs(SHAPE, roll=roll, crpix=c)
    data = rng.normal(size=SHAPE).astype(np.float32)
    ref = Image.from_array(data, wcs=ref_wcs, zeropoint=26.0)
    new = Image.from_array(rng.normal(size=SHAPE), wcs=new_wcs, zeropoint=26.0)
    on_new, _, info = align_pair(ref, new)
    if same:
        assert info.method == "same-grid"
        assert on_new is ref and on_new.data is data  # not touched, bit-identical
    else:
        assert info.method == "spline3"
        assert not np.array_equal(on_new.data, data)
    assert (info.grid_offset_px <= 0.01) == same


def test_integer_shift_of_a_larger_reference_is_a_crop():
    rng = np.random.default_rng(6)
    big = (200, 180)
    ref_wcs = make_wcs(big, crpix=[30.0 + (SHAPE[1] + 1) / 2, 50.0 + (SHAPE[0] + 1) / 2])
    data = rng.normal(size=big).astype(np.float32)
    ref = Image.from_array(data, wcs=ref_wcs, zeropoint=26.0)
    new = Image.from_array(rng.normal(size=SHAPE), wcs=make_wcs(SHAPE), zeropoint=26.0)
    on_new, _, info = align_pair(ref, new)
    assert info.method == "crop"
    assert np.array_equal(on_new.data, data[50:50 + SHAPE[0], 30:30 + SHAPE[1]])


def test_missing_wcs_is_a_one_line_error(tmp_path, capsys):
    rng = np.random.default_rng(7)
    ref_path = write(tmp_path / "ref.fits", rng.normal(size=(140, 130)), None)
    new_path = write(tmp_path / "new.fits", rng.normal(size=SHAPE), make_wcs(SHAPE))
    with pytest.raises(RtcnnInputError, match=r"ref.fits: the header has no celestial WCS; "
                       r"the reference \(130 x 140 px\) and the new image \(128 x 128 px\)"):
        align_pair(read_image(ref_path), read_image(new_path))
    with pytest.raises(RtcnnInputError, match=r"new.fits: shape 128 x 128 px does not match "
                       r"the reference 130 x 140 px .* a WCS is missing"):
        read_aligned_pair(ref_path, new_path)
    with pytest.raises(SystemExit) as exit_info:
        baseline_main([str(ref_path), str(new_path), "-o", str(tmp_path / "c.ecsv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rtcnn: error: ") and "WCS" in err[0]
    assert not (tmp_path / "c.ecsv").exists()


def test_residual_wcs_offset_is_measured_and_corrected(tmp_path):
    rng = np.random.default_rng(8)
    true_ref = make_wcs(SHAPE, roll=25.0)
    c = true_ref.wcs.crpix
    wrong = make_wcs(SHAPE, roll=25.0, crpix=[c[0] + 0.3, c[1] - 0.2])  # header off by 0.36 px
    ref_path, new_path, _ = _pair(tmp_path, rng, true_ref, SHAPE, n_stars=60,
                                  header_ref_wcs=wrong)
    _, _, info = read_aligned_pair(ref_path, new_path)
    assert info.nstars >= 10 and info.offset_applied
    assert info.dx == pytest.approx(-0.3, abs=0.03)
    assert info.dy == pytest.approx(0.2, abs=0.03)
    cat = run_baseline(ref_path, new_path, threshold=5.0, fwhm=FWHM)
    assert cat.meta["align_offset_applied"] is True
    k, dist = _nearest(cat, 60.3, 70.6)
    assert dist < 0.1 and k == int(np.argmax(cat["score"]))


def test_spline_map_matches_reproject_interp_bicubic():
    """The coarse-grid map + cubic spline equals reproject's full per-pixel transform."""
    from reproject import reproject_interp

    rng = np.random.default_rng(9)
    ref_wcs, new_wcs = make_wcs((150, 140), roll=33.0, crpix=[60.3, 81.9]), make_wcs(SHAPE)
    ra, dec, flux = sky(rng, 50, new_wcs, SHAPE)
    ref = draw(ref_wcs, (150, 140), ra, dec, flux)
    sx, sy = pixel_map(new_wcs, ref_wcs, SHAPE, step=32)
    ours, uncovered = resample(ref, sx, sy, SHAPE)
    theirs, foot = reproject_interp((ref.astype(np.float64), ref_wcs), new_wcs, shape_out=SHAPE,
                                    order="bicubic")
    inner = ~uncovered & (foot > 0) & np.isfinite(theirs)
    assert inner.mean() > 0.5
    assert_allclose(ours[inner], theirs[inner], atol=2e-4 * ref.max())
    # the interpolated map itself is the exact WCS transform to < 1e-3 px
    from astropy.wcs.utils import pixel_to_pixel
    yy, xx = np.mgrid[0:SHAPE[0]:7, 0:SHAPE[1]:7].astype(float)
    ex, ey = pixel_to_pixel(new_wcs, ref_wcs, xx.ravel(), yy.ravel())
    assert_allclose(sx(yy.ravel(), xx.ravel(), grid=False), ex, atol=1e-3)
    assert_allclose(sy(yy.ravel(), xx.ravel(), grid=False), ey, atol=1e-3)


def test_variance_plane_is_resampled_and_scaled(tmp_path):
    rng = np.random.default_rng(10)
    ref_wcs = make_wcs(SHAPE, roll=12.0)
    var = np.full(SHAPE, 0.04, np.float32)
    ref_path, new_path, _ = _pair(tmp_path, rng, ref_wcs, SHAPE, zp_ref=26.5,
                                  extra_ref=(("VAR", var),))
    on_new, _, info = read_aligned_pair(ref_path, new_path)
    v = info.ref_variance
    assert v is not None and v.shape == SHAPE
    covered = ~on_new.mask
    assert_allclose(v[covered], 0.04 * info.zp_scale**2, rtol=1e-5)


def test_grid_offset_reports_the_shift():
    new_wcs = make_wcs(SHAPE)
    ref_wcs = make_wcs(SHAPE, crpix=[(SHAPE[1] + 1) / 2 + 3.0, (SHAPE[0] + 1) / 2 - 2.0])
    dev, sx, sy = grid_offset(ref_wcs, new_wcs, SHAPE)
    assert dev < 1e-6 and math.isclose(sx, 3.0, abs_tol=1e-6) and math.isclose(sy, -2.0,
                                                                                abs_tol=1e-6)


def test_read_pair_refuses_two_grids_that_were_not_aligned(tmp_path):
    """A same-shape pair with another WCS is never silently taken as aligned."""
    from rtcnn.io import read_pair

    rng = np.random.default_rng(11)
    ref_path, new_path, _ = _pair(tmp_path, rng, make_wcs(SHAPE, roll=30.0), SHAPE)
    with pytest.raises(RtcnnInputError, match=r"new.fits: is on another pixel grid than the "
                       r"reference .*ref.fits \(WCSs [0-9.]+ px apart\); read the pair with "
                       r"rtcnn.align.read_aligned_pair"):
        read_pair(ref_path, new_path)
    ref, new = read_pair(ref_path, new_path, other_grid=True)
    assert ref.shape == new.shape


def test_write_aligned_reference_for_tile_readers(tmp_path):
    """The data layer reads tiles by path: the aligned reference as a file on the new grid."""
    from rtcnn.align import write_aligned_reference
    from rtcnn.io import read_image

    rng = np.random.default_rng(12)
    ref_path, new_path, _ = _pair(tmp_path, rng, make_wcs((150, 140), roll=40.0), (150, 140),
                                  zp_ref=25.5)
    out, _ = write_aligned_reference(ref_path, new_path, tmp_path / "ref_on_new.fits")
    img = read_image(out)
    ref, _, _ = read_aligned_pair(ref_path, new_path)
    assert img.shape == SHAPE and img.zeropoint == 26.0
    assert np.array_equal(img.mask, ref.mask)
    assert np.array_equal(img.filled(0.0), ref.filled(0.0))
    from rtcnn.io import read_pair

    read_pair(out, new_path)  # one grid now: accepted without alignment
    with pytest.raises(RtcnnInputError, match="already exists"):
        write_aligned_reference(ref_path, new_path, out)


def test_detect_aligns_a_rotated_pair(tmp_path, tiny_detector_ckpt):
    """rtcnn.detect reads pairs through the alignment: the catalog says what was done."""
    from astropy.table import Table

    from rtcnn.detect import main as detect_main

    rng = np.random.default_rng(13)
    ref_path, new_path, _ = _pair(tmp_path, rng, make_wcs(SHAPE, roll=30.0), SHAPE)
    out = tmp_path / "det.ecsv"
    assert detect_main([str(ref_path), str(new_path), "--ckpt", str(tiny_detector_ckpt),
                        "-o", str(out), "--no-progress", "--threshold", "0.0"]) == 0
    meta = Table.read(out).meta
    assert meta["align_method"] == "spline3" and meta["align_grid_offset_px"] > 10
