"""The catalog command ``python -m rtcnn.detect`` and the full-image inference behind it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.table import Table
from numpy.testing import assert_allclose
from torch.utils.data import DataLoader

from rtcnn.catalog import CATALOG_COLUMNS
from rtcnn.checkpoint import load_model
from rtcnn.detect import main
from rtcnn.difference import find_candidates, psf_sigma
from rtcnn.errors import RtcnnInputError
from rtcnn.inference import (
    TileStitcher,
    dense_detections,
    extract_stamps,
    native_bf16,
    prepare_detector,
    stamp_detections,
    stamp_origins,
)
from rtcnn.io import Image
from rtcnn.measure import WIDE_FIT_HALF, WIDE_FIT_SNR, _fit_stamps, psf_refine
from rtcnn.models.detector import DenseDetector
from rtcnn.pipeline import detect_pair
from rtcnn.postprocess import Sources, best_per_candidate, finalize
from rtcnn.tiles import tile_origins

SIZE = 128  # px, side of the simulated test pair
LOW = "0.001"  # a threshold low enough that an untrained net reports candidates


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Two small simulated epochs-mode pairs (cosmic rays, variables, transients)."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("sim")
    simulate_dataset(root, pairs=2, size=SIZE, mode="epochs", seed=11, progress=False,
                     n_transients=6)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def ckpt(tiny_detector_ckpt):
    """A real Lightning checkpoint of a tiny DetectionTask after one training step."""
    return tiny_detector_ckpt


def _pair(root, i=0):
    d = root / f"pair_{i:04d}"
    return str(d / "ref.fits"), str(d / "new.fits")


def test_loaded_detector_restores_the_weights(ckpt):
    loaded = load_model(ckpt, expect=DenseDetector)
    net = prepare_detector(loaded.net)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert net.config["channels"] == [8, 8, 8] and not net.training
    plain = DenseDetector(**net.config)
    plain.load_state_dict({k[4:]: v for k, v in state["state_dict"].items()
                           if k.startswith("net.")})  # fmt: skip
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        want, got = plain.eval()(x), net(x)  # net: batch norms folded into the convolutions
    for key in want:
        assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-4)
    assert loaded.threshold == state["hyper_parameters"]["threshold"]
    assert not hasattr(net, "saved_threshold")  # the threshold is a value, not an attribute


def test_detect_writes_a_catalog_and_refuses_to_overwrite(pairs, ckpt, tmp_path, capsys):
    ref, new = _pair(pairs)
    out = tmp_path / "cand.ecsv"
    args = [ref, new, "--ckpt", str(ckpt), "-o", str(out), "--threshold", LOW, "--regions",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = Table.read(out, format="ascii.ecsv")
    from rtcnn.fluxes import MEASURED_COLUMNS  # issue 17: the measured source columns follow

    assert tuple(table.colnames) == CATALOG_COLUMNS + tuple(MEASURED_COLUMNS)
    assert len(table) > 0
    assert str(table["x"].unit) == "pix" and str(table["ra"].unit) == "deg"
    assert table.meta["ref"] == ref and table.meta["new"] == new
    assert table.meta["model"] == str(ckpt) and table.meta["threshold"] == pytest.approx(0.001)
    assert table.meta["mode"] == "stamps" and table.meta["n_candidates"] >= len(table)
    assert table.meta["precision"] == ("bf16" if native_bf16("cpu") else "fp32")  # auto
    assert np.all(np.diff(table["score"]) <= 0) and np.all(table["score"] >= 0.001)
    assert np.all((table["x"] > -0.5) & (table["x"] < SIZE - 0.5))
    dmag = np.asarray(table["dmag"])
    assert np.all((dmag >= 0) | np.isnan(dmag))  # NaN: below the limit in both images
    assert "aperture photometry" in table.meta["dmag"]
    reg = (tmp_path / "cand.reg").read_text().splitlines()
    assert reg[3] == "image" and len(reg) == 4 + len(table)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert "cand.ecsv: already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_detect_a_directory_of_pairs_in_dense_mode(pairs, ckpt, tmp_path):
    outdir = tmp_path / "cats"
    assert main([str(pairs), "--ckpt", str(ckpt), "-o", str(outdir), "--threshold", LOW,
                 "--mode", "dense", "--precision", "fp32", "--no-progress"]) == 0  # fmt: skip
    written = sorted(p.name for p in outdir.iterdir())
    assert written == ["pair_0000.ecsv", "pair_0001.ecsv"]
    table = Table.read(outdir / "pair_0001.ecsv", format="ascii.ecsv")
    assert table.meta["mode"] == "dense" and table.meta["new"].endswith("pair_0001/new.fits")
    assert table.meta["precision"] == "fp32"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ckpt", "missing.ckpt"], "missing.ckpt: no such checkpoint file"),
        (["--threshold", "1.5"], "--threshold must lie in"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_detect_user_mistakes_exit_2(pairs, ckpt, tmp_path, capsys, extra, message):
    ref, new = _pair(pairs)
    args = [ref, new, "--ckpt", str(ckpt), "-o", str(tmp_path / "c.ecsv"), *extra]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_a_checkpoint_without_a_detector_is_refused(tmp_path, capsys, pairs):
    bad = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {"_target_": "torch.nn.Linear"}}},
               bad)  # fmt: skip
    ref, new = _pair(pairs)
    with pytest.raises(SystemExit):
        main([ref, new, "--ckpt", str(bad), "-o", str(tmp_path / "c.ecsv")])
    assert "'torch.nn.Linear', which is not one of rtcnn's networks" in capsys.readouterr().err


def test_stamps_are_centred_and_kept_inside_the_image():
    origins = stamp_origins(np.array([50, 2, 99]), np.array([40, 97, 0]), (100, 100), 32)
    assert_allclose(origins, [[34, 24], [0, 68], [68, 0]])
    aligned = stamp_origins(np.array([50, 2, 99]), np.array([40, 97, 0]), (100, 100), 32, 4)
    assert_allclose(aligned, [[32, 24], [0, 68], [68, 0]])
    with pytest.raises(RtcnnInputError, match="must be multiples of 4 px"):
        stamp_origins(np.array([5]), np.array([5]), (99, 100), 32, 4)
    img = np.arange(100 * 100, dtype=np.float32).reshape(100, 100)
    st = extract_stamps(img, -img, origins, 32)
    assert st.shape == (3, 2, 32, 32)
    assert st[0, 0, 16, 16] == img[40, 50] and st[0, 1, 16, 16] == -img[40, 50]
    assert st[2, 0, 0, 31] == img[0, 99]


def test_stamps_and_dense_modes_agree_on_a_bright_source():
    """Stamps are aligned with the network's cell grid: where a stamp holds a cell's whole
    receptive field, stamps mode and dense (stitched) mode give identical detections."""
    torch.manual_seed(1)
    net = DenseDetector(channels=(8, 8, 8), head_channels=8, prior=0.5).eval()
    rng = np.random.default_rng(5)
    ref = rng.normal(0, 1, (256, 256)).astype(np.float32)
    new = ref + rng.normal(0, 0.01, (256, 256)).astype(np.float32)
    yy, xx = np.mgrid[0:256, 0:256]
    new += (400 / (2 * np.pi)) * np.exp(-((xx - 101.2) ** 2 + (yy - 140.7) ** 2) / 2)
    # 64 px stamps: the cells within 8 px of the candidate see only pixels of the stamp
    cand = find_candidates(new - ref, 10.0)
    parts = []
    for det in stamp_detections(net, ref, new, cand.ix, cand.iy, 0.0, 1.0, stamp_size=64):
        keep = best_per_candidate(det["batch"], det["xy"], det["score"],
                                  np.c_[cand.ix, cand.iy], accept_radius=8.0)  # fmt: skip
        parts.append(Sources.from_detections(det, keep))
    stamps = finalize(Sources.concatenate(parts), 0.0)
    dense = finalize(Sources.from_detections(
        dense_detections(net, ref, new, 0.0, 1.0, tile=128, overlap=64)), 0.0)
    assert len(cand) == 1 and len(stamps) >= 1
    for x, y, score in zip(stamps.x, stamps.y, stamps.score):
        j = np.argmin(np.hypot(dense.x - x, dense.y - y))
        assert_allclose([dense.x[j], dense.y[j]], [x, y], atol=1e-3)
        assert_allclose(dense.score[j], score, rtol=1e-4)


def test_psf_refine_recovers_sub_pixel_positions():
    from scipy.special import erf

    fwhm = 1.39  # px, Roman H158
    sig = psf_sigma(fwhm)
    rng = np.random.default_rng(8)
    true = np.array([[20.3, 30.7], [60.55, 12.2], [90.0, 88.45]])
    diff = rng.normal(0, 0.05, (100, 100))
    u = np.arange(100)

    def g(c):
        k = 1 / (np.sqrt(2) * sig)
        return 0.5 * (erf((u - c + 0.5) * k) - erf((u - c - 0.5) * k))

    for (x, y), f in zip(true, (50.0, -40.0, 30.0)):  # one source faded
        diff += f * np.outer(g(y), g(x))
    start = true + np.array([[0.4, -0.3], [-0.45, 0.35], [0.3, 0.3]])  # network-like errors
    src = Sources(x=start[:, 0], y=start[:, 1], score=np.ones(3), dmag=np.zeros(3),
                  brightened=np.ones(3, bool))  # fmt: skip
    out, used = psf_refine(diff.astype(np.float32), src, fwhm)
    assert used.all()
    assert_allclose(np.c_[out.x, out.y], true, atol=0.02)
    far = Sources(x=np.array([50.0]), y=np.array([50.0]), score=np.ones(1), dmag=np.zeros(1),
                  brightened=np.ones(1, bool))  # fmt: skip
    kept, used = psf_refine(diff.astype(np.float32), far, fwhm)  # nothing there to fit
    assert not used[0] or np.hypot(kept.x[0] - 50, kept.y[0] - 50) <= 1.0


def test_psf_refine_wide_refit_of_bright_sources_and_image_edges():
    """Bright sources (fit S/N >= WIDE_FIT_SNR) are refitted on the 11x11 stamp; a stamp
    reaching past the image edge gives the off-image pixels zero weight."""
    from scipy.special import erf

    fwhm = 1.39  # px, Roman H158
    sig = psf_sigma(fwhm)
    rng = np.random.default_rng(3)
    true = np.array([[1.3, 40.6], [50.45, 98.2], [70.2, 30.8]])  # two at an edge
    diff = rng.normal(0, 0.05, (100, 100))
    u = np.arange(100)

    def g(c):
        k = 1 / (np.sqrt(2) * sig)
        return 0.5 * (erf((u - c + 0.5) * k) - erf((u - c - 0.5) * k))

    for x, y in true:
        diff += 80.0 * np.outer(g(y), g(x))  # S/N ~ 500: wide refit
    start = true + 0.3
    src = Sources(x=start[:, 0], y=start[:, 1], score=np.ones(3), dmag=np.zeros(3),
                  brightened=np.ones(3, bool))  # fmt: skip
    fit = _fit_stamps(diff, start[:, 0], start[:, 1], fwhm, None, None, (None, None), None,
                      half=WIDE_FIT_HALF)  # fmt: skip
    assert np.all(np.abs(fit["snr"]) >= WIDE_FIT_SNR) and fit["ok"].all()
    out, used = psf_refine(diff.astype(np.float32), src, fwhm)
    assert used.all()
    assert_allclose(np.c_[out.x, out.y], true, atol=0.01)


def test_d4_test_time_augmentation_is_equivariant():
    """The D4-averaged net on a rotated stamp gives the rotated maps (offsets as vectors)."""
    from rtcnn.augment import apply_coords, apply_image
    from rtcnn.inference import _forward_d4

    torch.manual_seed(3)
    net = DenseDetector(channels=(8, 8, 8), head_channels=8).eval()
    x = np.random.default_rng(9).normal(0, 1, (2, 2, 32, 32)).astype(np.float32)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        a = _forward_d4(net, x, 1.0, cpu, False)
        b = _forward_d4(net, apply_image(torch.from_numpy(x), "rot90").numpy(), 1.0, cpu, False)
    for key in ("heat", "dmag", "sign"):
        assert_allclose(apply_image(a[key], "rot90").numpy(), b[key].numpy(), atol=1e-4)
    rotated = apply_coords(a["offset"].movedim(1, -1), "rot90", 1).movedim(-1, 1)
    assert_allclose(apply_image(rotated, "rot90").numpy(), b["offset"].numpy(), atol=1e-4)




def _cut_tiles(full, origins, size):
    return np.stack([full[..., y0 : y0 + size, x0 : x0 + size] for x0, y0 in origins])


@pytest.mark.parametrize("shape", [(150, 150), (100, 77), (64, 64)])
def test_stitch_consistent_tiles_is_exact(shape):
    rng = np.random.default_rng(0)
    full = rng.normal(size=(3, *shape)).astype(np.float32)
    origins = tile_origins(shape, 64, 54)
    tiles = _cut_tiles(full, origins, 64)
    st = TileStitcher(shape, channels=3, size=64, origins=origins)
    perm = rng.permutation(len(origins))
    for chunk in np.array_split(perm, 3):  # batches in any order
        st.add(tiles[chunk], origins[chunk])
    assert_allclose(st.result(), full, rtol=0, atol=0)


def test_stitch_takes_the_pixel_furthest_from_a_tile_edge_and_checks_its_grid():
    shape = (64, 118)  # two tiles in x: [0, 64) and [54, 118), overlap 54..63
    origins = tile_origins(shape, 64, 54)
    st = TileStitcher(shape, channels=1, size=64, origins=origins)
    st.add(np.stack([np.full((1, 64, 64), i, np.float32) for i in range(len(origins))]), origins)
    full = st.result()
    assert_allclose(full[0, :, :59], 0)  # pixel 58 is 5.5 px from tile 0's edge, 4.5 from 1's
    assert_allclose(full[0, :, 59:], 1)
    st = TileStitcher((100, 100), channels=2, size=64, origins=tile_origins((100, 100), 64, 36))
    with pytest.raises(RtcnnInputError, match=r"tile origin \(3, 0\) is not on the grid"):
        st.add(np.zeros((1, 2, 64, 64)), [[3, 0]])
    with pytest.raises(RtcnnInputError, match=r"expected \(B, 2, 64, 64\)"):
        st.add(np.zeros((1, 64, 64)), [[0, 0]])
    assert np.isnan(st.result()).all()  # nothing added: NaN
    with pytest.raises(RtcnnInputError, match="do not form a product grid"):
        TileStitcher((100, 100), 1, 64, origins=[[0, 0], [36, 36]])
    with pytest.raises(RtcnnInputError, match="leaves pixels uncovered"):
        TileStitcher((200, 200), 1, 64, origins=[[0, 0], [136, 0], [0, 136], [136, 136]])


def test_a_zero_point_mismatch_gives_the_same_catalog(pairs, ckpt):
    """The reference stored at another zero point (its pixels scaled to match) is put back
    on the new image's zero point: the same difference image, noise, candidates and
    catalog as the original pair (issue 20 point 13)."""
    from rtcnn.io import read_pair
    from rtcnn.pipeline import load_model as load_detector_model

    ref, new = read_pair(*_pair(pairs))
    model = load_detector_model(ckpt, "cpu")
    zp = new.zeropoint
    assert zp is not None and ref.zeropoint == zp
    factor = 10 ** (-0.4 * 1.25)  # the reference in units 1.25 mag brighter per count
    ref2 = Image.from_array(ref.filled(np.nan) * np.float32(factor), wcs=ref.wcs,
                            zeropoint=zp - 1.25, band=ref.band, exptime=ref.exptime,
                            path="ref2.fits")  # fmt: skip
    want = detect_pair(model.net, ref, new, 0.001, mode="stamps")
    got = detect_pair(model.net, ref2, new, 0.001, mode="stamps")
    assert got.meta["ref_scale"] == pytest.approx(10**0.5)
    assert got.meta["n_candidates"] == want.meta["n_candidates"] and len(want) > 0
    assert got.meta["noise_sigma"] == pytest.approx(want.meta["noise_sigma"], rel=1e-5)
    assert len(got) == len(want)
    for col in ("x", "y", "score", "dmag"):
        assert_allclose(np.asarray(got[col]), np.asarray(want[col]), rtol=1e-4, atol=1e-3)
