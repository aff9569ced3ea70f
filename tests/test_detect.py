"""The catalog command ``python -m rtcnn.detect`` and the full-image inference behind it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.table import Table
from numpy.testing import assert_allclose
from torch.utils.data import DataLoader

from rtcnn.catalog import CATALOG_COLUMNS
from rtcnn.errors import RtcnnInputError
from rtcnn.detect import main
from rtcnn.inference import (
    detect_dense,
    detect_stamps,
    extract_stamps,
    find_candidates,
    image_sigma,
    load_detector,
    native_bf16,
    peak_fraction,
    psf_refine,
    sparse_peaks,
    stamp_origins,
)
from rtcnn.models.detector import DenseDetector

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
def ckpt(tmp_path_factory):
    """A real Lightning checkpoint of a tiny DetectionTask after one training step."""
    import lightning as L

    from rtcnn.tasks.detection import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(DenseDetector(channels=(8, 8, 8), head_channels=8, prior=0.01))
    xy = torch.tensor([[[20.0, 30.0]], [[40.5, 10.25]]])
    batch = {"image": torch.randn(2, 2, 64, 64), "xy": xy, "valid": torch.ones(2, 1, dtype=bool),
             "dmag": torch.ones(2, 1)}  # fmt: skip
    loader = DataLoader([batch], batch_size=None)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(task, loader)
    path = tmp_path_factory.mktemp("ckpt") / "dense.ckpt"
    trainer.save_checkpoint(path)
    return path


def _pair(root, i=0):
    d = root / f"pair_{i:04d}"
    return str(d / "ref.fits"), str(d / "new.fits")


def test_load_detector_restores_the_weights(ckpt):
    net = load_detector(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert net.config["channels"] == [8, 8, 8] and not net.training
    plain = DenseDetector(**net.config)
    plain.load_state_dict({k[4:]: v for k, v in state["state_dict"].items()
                           if k.startswith("net.")})  # fmt: skip
    x = torch.randn(2, 2, 32, 32)
    with torch.no_grad():
        want, got = plain.eval()(x), net(x)  # net: batch norms folded into the convolutions
    for key in want:
        assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-4)
    assert net.saved_threshold == state["hyper_parameters"]["threshold"]


def test_detect_writes_a_catalog_and_refuses_to_overwrite(pairs, ckpt, tmp_path, capsys):
    ref, new = _pair(pairs)
    out = tmp_path / "cand.ecsv"
    args = [ref, new, "--ckpt", str(ckpt), "-o", str(out), "--threshold", LOW, "--regions",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    table = Table.read(out, format="ascii.ecsv")
    assert tuple(table.colnames) == CATALOG_COLUMNS
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
    assert "not a dense detector" in capsys.readouterr().err


def test_candidates_find_a_faint_point_source_and_skip_flat_sky():
    rng = np.random.default_rng(4)
    ref = rng.normal(0, 1, (200, 200)).astype(np.float32)
    new = rng.normal(0, 1, (200, 200)).astype(np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    new += (40 / (2 * np.pi)) * np.exp(-((xx - 120.3) ** 2 + (yy - 60.6) ** 2) / 2)  # S/N ~ 20
    cand = find_candidates(new - ref)
    assert 0 < len(cand) < 20  # a few noise peaks at most
    assert cand.ix[0] == 120 and cand.iy[0] == 61  # the brightest candidate is the source
    assert_allclose(image_sigma(ref, new, step=1), 1.0, rtol=0.05)


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
    stamps, cand = detect_stamps(net, ref, new, 0.0, candidate_snr=10.0, stamp_size=64,
                                 accept_radius=8.0)  # fmt: skip
    dense = detect_dense(net, ref, new, 0.0, tile=128, overlap=64)
    assert len(cand) == 1 and len(stamps) >= 1
    for x, y, score in zip(stamps.x, stamps.y, stamps.score):
        j = np.argmin(np.hypot(dense.x - x, dense.y - y))
        assert_allclose([dense.x[j], dense.y[j]], [x, y], atol=1e-3)
        assert_allclose(dense.score[j], score, rtol=1e-4)


def test_sparse_peaks_equal_find_peaks():
    from rtcnn.postprocess import find_peaks

    rng = np.random.default_rng(7)
    image = np.abs(rng.normal(0, 1, (300, 300))).astype(np.float32)
    image[10, 10] = image[11, 11] = 9.0  # a tie: both kept, as find_peaks does
    mask = rng.uniform(size=image.shape) < 0.1
    for min_distance in (1, 2):
        want = find_peaks(image, 3.0, min_distance, mask)
        got = sparse_peaks(image, 3.0, min_distance, mask)
        for a, b in zip(got, want):
            assert_allclose(a, b)
    assert len(sparse_peaks(image, 100.0, 2)[0]) == 0


def test_psf_refine_recovers_sub_pixel_positions():
    from rtcnn.psffit import psf_sigma
    from rtcnn.postprocess import Sources
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

    from rtcnn import inference
    from rtcnn.postprocess import Sources
    from rtcnn.psffit import psf_sigma

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
    fit = inference._fit_stamps(diff, start[:, 0], start[:, 1], fwhm, None, None, (None, None),
                                None, half=inference.WIDE_FIT_HALF)  # fmt: skip
    assert np.all(np.abs(fit["snr"]) >= inference.WIDE_FIT_SNR) and fit["ok"].all()
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


def test_single_pixel_hits_are_not_candidates():
    rng = np.random.default_rng(10)
    diff = rng.normal(0, 1, (120, 120)).astype(np.float32)
    yy, xx = np.mgrid[0:120, 0:120]
    diff += (60 / (2 * np.pi * 0.6**2)) * np.exp(-((xx - 30.2) ** 2 + (yy - 40.4) ** 2) / 0.72)
    diff[90, 80] += 80.0  # a cosmic-ray hit: one pixel
    diff[20, 100] -= 60.0  # one on the reference (a negative hit)
    frac = peak_fraction(diff, np.array([30, 80, 100]), np.array([40, 90, 20]))
    assert frac[0] < 0.66 and frac[1] > 0.9 and frac[2] > 0.9
    cand = find_candidates(diff)
    got = set(zip(cand.ix.tolist(), cand.iy.tolist()))
    assert (30, 40) in got and (80, 90) not in got and (100, 20) not in got
    every = find_candidates(diff, sharp_max=1.0)  # kept when asked
    assert (80, 90) in set(zip(every.ix.tolist(), every.iy.tolist()))
