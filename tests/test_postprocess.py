"""Post-processing on synthetic score maps: peaks, NMS, offsets, stitching, pixel ↔ sky."""

import numpy as np
import pytest
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn.errors import RtcnnInputError
from rtcnn.postprocess import (
    TileStitcher,
    extract_sources,
    find_peaks,
    nms,
    pixel_to_sky,
    refine_positions,
    sky_to_pixel,
    stitch_tiles,
)
from rtcnn.tiles import tile_origins

SIGMA = 1.2  # px, width of the synthetic score blobs


def blob_maps(shape, xy, amp=None, sigma=SIGMA, radius=3):
    """Score map of Gaussian blobs and the exact offset map towards the nearest source."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    score = np.zeros(shape)
    offset = np.zeros((2, ny, nx))
    best = np.full(shape, np.inf)
    amp = np.ones(len(xy)) if amp is None else amp
    for (x, y), a in zip(xy, amp):
        d2 = (xx - x) ** 2 + (yy - y) ** 2
        score = np.maximum(score, a * np.exp(-d2 / (2 * sigma**2)))
        near = (d2 < best) & (d2 <= radius**2)
        offset[0][near] = (x - xx)[near]
        offset[1][near] = (y - yy)[near]
        best = np.where(near, d2, best)
    return score.astype(np.float32), offset.astype(np.float32)


def test_find_peaks_positions_order_and_threshold():
    xy = np.array([[10.0, 12.0], [30.0, 8.0], [20.0, 30.0]])
    score, _ = blob_maps((40, 40), xy, amp=np.array([0.6, 0.9, 0.3]))
    ix, iy, s = find_peaks(score, threshold=0.5)
    assert_array_equal(ix, [30, 10])  # sorted by decreasing score, 0.3 below threshold
    assert_array_equal(iy, [8, 12])
    assert_allclose(s, [0.9, 0.6], rtol=1e-6)
    ix, _, _ = find_peaks(score, threshold=0.1)
    assert len(ix) == 3
    ix, _, _ = find_peaks(score, threshold=0.95)
    assert ix.shape == (0,)


def test_find_peaks_mask_nan_and_edges():
    score, _ = blob_maps((20, 20), np.array([[0.0, 0.0], [10.0, 10.0], [15.0, 4.0]]))
    score[4, 15] = np.nan  # a NaN pixel is never a peak (and does not poison neighbours)
    mask = np.zeros(score.shape, bool)
    mask[10, 10] = True
    ix, iy, _ = find_peaks(score, 0.5, mask=mask)
    # corner peak found (outside the image counts as -inf); masked and NaN peaks not
    assert (0, 0) in set(zip(ix.tolist(), iy.tolist()))
    assert (10, 10) not in set(zip(ix.tolist(), iy.tolist()))
    assert (15, 4) not in set(zip(ix.tolist(), iy.tolist()))


def test_find_peaks_min_distance_and_errors():
    score = np.zeros((20, 20), np.float32)
    score[10, 10] = 1.0
    score[10, 12] = 0.8  # 2 px away: a separate peak with a 3x3 box, not with a 5x5 box
    assert len(find_peaks(score, 0.5, min_distance=1)[0]) == 2
    assert len(find_peaks(score, 0.5, min_distance=2)[0]) == 1
    with pytest.raises(RtcnnInputError, match="min_distance must be >= 1 px, got 0"):
        find_peaks(score, 0.5, min_distance=0)
    with pytest.raises(RtcnnInputError, match="score map must be 2-D"):
        find_peaks(score[None], 0.5)


def test_nms_radius():
    x = np.array([10.0, 11.5, 20.0, 22.9, 40.0])
    y = np.array([10.0, 10.0, 5.0, 5.0, 40.0])
    s = np.array([0.7, 0.9, 0.5, 0.6, 0.1])
    assert_array_equal(nms(x, y, s, radius=3.0), [1, 3, 4])
    assert_array_equal(nms(x, y, s, radius=1.0), [1, 0, 3, 2, 4])
    assert_array_equal(nms(x, y, s, radius=0.0), [1, 0, 3, 2, 4])
    # a chain: 0 suppresses 1, so 2 (only near 1) survives
    assert_array_equal(nms([0.0, 2.0, 4.0], [0.0, 0.0, 0.0], [3.0, 2.0, 1.0], 2.5), [0, 2])
    assert nms([], [], [], 3.0).shape == (0,)


def test_subpixel_offsets_recover_truth():
    rng = np.random.default_rng(1)
    xy = np.column_stack([rng.uniform(5, 59, 6), rng.uniform(5, 59, 6)])
    xy = xy[np.argsort(xy[:, 0])]
    xy[:, 0] += np.arange(6) * 2.0  # keep them > 6 px apart in x
    score, offset = blob_maps((64, 80), xy)
    src = extract_sources(score, 0.5, offset_map=offset)
    assert len(src) == 6
    got = np.column_stack([src.x, src.y])
    got = got[np.argsort(got[:, 0])]
    assert_allclose(got, xy, atol=1e-5)
    # without an offset map the 3x3 centroid is within 0.3 px, the peak pixel within 0.71
    src = extract_sources(score, 0.5)
    got = np.column_stack([src.x, src.y])[np.argsort(src.x)]
    assert_allclose(got, xy, atol=0.3)
    x, y = refine_positions(np.array([3]), np.array([4]))
    assert_allclose([x[0], y[0]], [3.0, 4.0])


def test_extract_sources_dmag_and_sign_maps():
    xy = np.array([[10.3, 10.6], [30.2, 20.1]])
    score, offset = blob_maps((32, 48), xy, amp=np.array([0.9, 0.8]))
    dmag = np.zeros((32, 48), np.float32)
    dmag[11, 10] = 1.25
    dmag[20, 30] = 2.5
    sign = np.full((32, 48), 0.9, np.float32)
    sign[20, 30] = 0.1
    src = extract_sources(score, 0.5, offset, dmag, sign)
    assert_allclose(src.dmag, [1.25, 2.5])
    assert_array_equal(src.brightened, [True, False])
    assert_allclose(src.score, [0.9 * np.exp(-(0.3**2 + 0.4**2) / (2 * SIGMA**2)),
                                0.8 * np.exp(-(0.2**2 + 0.1**2) / (2 * SIGMA**2))], rtol=1e-5)  # fmt: skip
    assert len(extract_sources(score, 0.5, max_sources=1)) == 1
    with pytest.raises(RtcnnInputError, match=r"offset map has shape \(2, 32, 47\), expected"):
        extract_sources(score, 0.5, offset[:, :, :47])


def cut_tiles(full, origins, size):
    return np.stack([full[..., y0 : y0 + size, x0 : x0 + size] for x0, y0 in origins])


@pytest.mark.parametrize("mode", ["owner", "blend"])
@pytest.mark.parametrize("shape", [(150, 150), (100, 77), (64, 64)])
def test_stitch_consistent_tiles_is_exact(mode, shape):
    rng = np.random.default_rng(0)
    full = rng.normal(size=(3, *shape)).astype(np.float32)
    origins = tile_origins(shape, 64, 54)
    tiles = cut_tiles(full, origins, 64)
    assert_allclose(stitch_tiles(tiles, origins, shape, mode=mode), full, rtol=1e-6, atol=1e-6)
    # 3-D input gives a 2-D map; batches added in any order give the same result
    assert stitch_tiles(tiles[:, 0], origins, shape, mode=mode).shape == shape
    st = TileStitcher(shape, channels=3, size=64, mode=mode)
    perm = rng.permutation(len(origins))
    for chunk in np.array_split(perm, 3):
        st.add(tiles[chunk], origins[chunk])
    assert_allclose(st.result(), full, rtol=1e-6, atol=1e-6)


def test_stitch_owner_takes_pixel_furthest_from_edge():
    shape = (64, 118)  # two tiles in x: [0, 64) and [54, 118), overlap 54..63
    origins = tile_origins(shape, 64, 54)
    tiles = np.stack([np.full((64, 64), i, np.float32) for i in range(len(origins))])
    full = stitch_tiles(tiles, origins, shape)
    assert_array_equal(full[0, :59], 0)  # pixel 58 is 5.5 px from tile 0's edge, 4.5 from 1's
    assert_array_equal(full[0, 59:], 1)


def test_seam_source_reported_once():
    """Two tiles disagree by 2.4 px about a source on their seam: one detection."""
    shape = (64, 118)
    origins = tile_origins(shape, 64, 54)
    truth = np.array([58.5, 30.0])
    seen = [truth - [1.2, 0.0], truth + [1.2, 0.0]]  # tile 0 sees it left, tile 1 right
    tiles = []
    for (x0, y0), xy in zip(origins, seen):
        s, o = blob_maps(shape, xy[None])
        tiles.append(cut_tiles(np.concatenate([s[None], o]), [(x0, y0)], 64)[0])
    full = stitch_tiles(np.stack(tiles), origins, shape)
    # both tiles' peaks survive the 5x5 local-maximum test on the stitched map ...
    assert len(find_peaks(full[0], 0.5)[0]) == 2
    # ... and NMS on the refined positions reports the source once, near the truth
    src = extract_sources(full[0], 0.5, offset_map=full[1:])
    assert len(src) == 1
    assert abs(src.x[0] - truth[0]) <= 1.2 + 1e-5 and abs(src.y[0] - truth[1]) < 1e-5


def test_stitch_errors():
    with pytest.raises(RtcnnInputError, match="stitch mode 'mean' is not one of"):
        TileStitcher((64, 64), mode="mean")
    st = TileStitcher((100, 100), channels=2, size=64)
    with pytest.raises(RtcnnInputError, match=r"tile origin \(3, 0\) is not on the grid"):
        st.add(np.zeros((1, 2, 64, 64)), [[3, 0]])
    with pytest.raises(RtcnnInputError, match=r"expected \(B, 2, 64, 64\)"):
        st.add(np.zeros((1, 64, 64)), [[0, 0]])
    with pytest.raises(RtcnnInputError, match="do not form a product grid"):
        TileStitcher((100, 100), origins=[[0, 0], [36, 36]])
    with pytest.raises(RtcnnInputError, match="leaves pixels uncovered"):
        TileStitcher((200, 200), origins=[[0, 0], [136, 0], [0, 136], [136, 136]])
    # an empty grid spot stays NaN
    assert np.isnan(st.result()).all()


def sip_wcs():
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    w.wcs.crpix = [50.5, 60.5]  # 1-based FITS
    w.wcs.crval = [10.0, -44.0]
    w.wcs.cd = np.array([[-0.11, 0.002], [0.001, 0.11]]) / 3600.0
    from astropy.wcs import Sip

    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1] = 2e-6, -1e-6, 3e-6
    b[2, 0], b[0, 2], b[3, 0] = -1e-6, 2e-6, 1e-9
    w.sip = Sip(a, b, None, None, w.wcs.crpix)
    return w


def test_pixel_sky_round_trip_and_zero_based():
    w = sip_wcs()
    ra, dec = pixel_to_sky(np.array([49.5]), np.array([59.5]), w)  # CRPIX - 1 (0-based)
    assert_allclose([ra[0], dec[0]], [10.0, -44.0], atol=1e-12)
    rng = np.random.default_rng(3)
    x, y = rng.uniform(-0.5, 4087.5, 50), rng.uniform(-0.5, 4087.5, 50)
    ra, dec = pixel_to_sky(x, y, w)
    assert np.all((ra >= 0) & (ra < 360))
    x2, y2 = sky_to_pixel(ra, dec, w)
    assert_allclose(x2, x, atol=1e-6)
    assert_allclose(y2, y, atol=1e-6)
    # astropy's 1-based entry point agrees once shifted: no hidden half-pixel
    ra1, dec1 = w.all_pix2world(x + 1, y + 1, 1)
    assert_allclose(ra, ra1, atol=1e-10)
    assert_allclose(dec, dec1, atol=1e-10)
    with pytest.raises(RtcnnInputError, match="new.fits: no celestial WCS"):
        pixel_to_sky(x, y, None, path="new.fits")
