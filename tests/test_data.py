"""Tests of the data layer: sample index, tile datasets, D4 augmentation, DataModules."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn import RtcnnInputError
from rtcnn.augment import D4_NAMES, apply_coords
from rtcnn.data import (
    BATCH_KEYS,
    FitsDataModule,
    IndexConfig,
    SimDataModule,
    TileDataset,
    collate_tiles,
    d4_elements,
    load_or_build_index,
    normalize_tiles,
    split_pairs,
)
from rtcnn.io import find_pairs
from rtcnn.tiles import n_tiles

ZP = 26.0  # AB mag of 1 e-/s in the synthetic pairs
SIGMA_PSF = 1.2  # px, Gaussian PSF sigma of the synthetic pairs
FORCED = [(100.3, 60.6, 19.0), (30.8, 200.45, 19.5)]  # bright simulated transients (x, y, mag)


# --------------------------------------------------------------------------- fixtures
def write_pair(folder, shape=(256, 256), changes=(), noise=0.5, seed=0, nan_box=None,
               truth=True):
    """A synthetic pair: Gaussian sources at sub-pixel positions, Gaussian noise, MAGZP.

    ``changes`` are ``(x, y, mag_ref, mag_new)`` (None = absent in that image).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ref = rng.normal(0.0, noise, shape)
    new = rng.normal(0.0, noise, shape)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    for x, y, m_ref, m_new in changes:
        psf = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * SIGMA_PSF**2)) / (
            2 * np.pi * SIGMA_PSF**2)
        for img, mag in ((ref, m_ref), (new, m_new)):
            if mag is not None:
                img += 10 ** (-0.4 * (mag - ZP)) * psf
    if nan_box is not None:
        x0, y0, x1, y1 = nan_box
        new[y0:y1, x0:x1] = np.nan
    hdr = fits.Header({"MAGZP": ZP, "BUNIT": "electron/s"})
    fits.PrimaryHDU(ref.astype(np.float32), hdr).writeto(folder / "ref.fits", overwrite=True)
    fits.PrimaryHDU(new.astype(np.float32), hdr).writeto(folder / "new.fits", overwrite=True)
    if truth:
        t = Table()
        t["id"] = np.arange(len(changes))
        t["x"] = np.array([c[0] for c in changes], dtype=float)
        t["y"] = np.array([c[1] for c in changes], dtype=float)
        for i, col in ((2, "mag_ref"), (3, "mag_new")):
            vals = np.array([np.nan if c[i] is None else c[i] for c in changes], dtype=float)
            t[col] = MaskedColumn(np.nan_to_num(vals), mask=~np.isfinite(vals))
        t["kind"] = np.array(["transient"] * len(changes), dtype="<U9")
        t.write(folder / "truth.ecsv", overwrite=True)
    return folder


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory):
    """Four simulated 256x256 inject pairs (rtcnn.sim), two bright forced transients each."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("sim256")
    simulate_dataset(root, 4, 256, "inject", 0, progress=False, n_transients=10,
                     forced_transients=FORCED)
    return root


@pytest.fixture(scope="session")
def sim_dm(sim_root):
    dm = FitsDataModule(str(sim_root), batch_size=8, val_fraction=0.25, test_fraction=0.25,
                        seed=0, progress=False)
    dm.setup()
    return dm


@pytest.fixture()
def synth_root(tmp_path):
    """Three synthetic pairs; pair 1 has a source that fades (reference brighter)."""
    changes = [(40.3, 20.7, None, 19.0), (150.6, 150.2, 20.0, 19.0)]
    write_pair(tmp_path / "p0", changes=changes, seed=0)
    write_pair(tmp_path / "p1", changes=[(70.2, 90.6, 19.0, 20.5)], seed=1)
    write_pair(tmp_path / "p2", changes=changes, seed=2)
    return tmp_path


# --------------------------------------------------------------------------- augmentation
@pytest.mark.parametrize("g", range(8))
def test_d4_brightest_difference_pixel_follows_target(sim_dm, g):
    """For every D4 element, the brightest pixel of the augmented difference tile lies within
    0.5 px (in x and in y) of the transformed target, for the bright forced transients."""
    index = sim_dm.index
    tiles = index.sample_tiles(range(index.n_pairs))
    ds = TileDataset(index, tiles, augment=True, seed=3)
    ch = index.changes
    first = index.members(tiles, 1)[:, 0]
    forced = np.isin(np.round(ch["x"][first], 2), [f[0] for f in FORCED])
    assert forced.sum() >= 8  # each forced transient in >= 1 tile of each of the 4 pairs
    checked = 0
    for i in np.flatnonzero(forced):
        epoch = next(e for e in range(200) if d4_elements(3, np.array([e]), np.array([i]))[0] == g)
        s = ds[(int(i), epoch)]
        diff = (s["image"][1] - s["image"][0]).numpy()
        yb, xb = np.unravel_index(np.argmax(diff), diff.shape)
        tx, ty = s["target"].numpy() * index.config.tile_size
        assert abs(xb - tx) <= 0.5 and abs(yb - ty) <= 0.5, (D4_NAMES[g], xb, yb, tx, ty)
        # the target is exactly the transformed tile position
        x0, y0 = s["origin"].numpy()
        xy_tile = np.array([ch["x"][first[i]] - x0, ch["y"][first[i]] - y0])
        assert_allclose([tx, ty], apply_coords(xy_tile, g, 64), atol=1e-4)
        checked += 1
    assert checked == forced.sum()


def test_augmentation_reproducible_and_worker_independent(sim_dm):
    ds = sim_dm.datasets["train"]
    keys = [(i, 5) for i in range(len(ds))]
    a = ds.__getitems__(keys)
    b = collate_tiles([ds[k] for k in keys])  # per-sample path gives the same batch
    for key in BATCH_KEYS:
        if key == "pair":
            assert a[key] == b[key]
        else:
            assert torch.equal(torch.nan_to_num(a[key]), torch.nan_to_num(b[key]))
    g = d4_elements(0, np.full(1000, 5), np.arange(1000))
    assert set(g.tolist()) == set(range(8))
    assert not np.array_equal(g, d4_elements(0, np.full(1000, 6), np.arange(1000)))
    batches = []
    for workers in (0, 2):
        dm = FitsDataModule(sim_dm.root, batch_size=4, val_fraction=0.25, test_fraction=0.25,
                            seed=0, num_workers=workers, progress=False)
        dm.setup()
        batches.append([bt["image"] for bt in dm.train_dataloader()])
    assert len(batches[0]) == len(batches[1]) > 0
    assert all(torch.equal(x, y) for x, y in zip(*batches))


# --------------------------------------------------------------------------- batches
def test_batch_contract(sim_dm):
    batch = next(iter(sim_dm.train_dataloader()))
    assert tuple(batch) == BATCH_KEYS
    b, k = batch["xy"].shape[:2]
    assert batch["image"].shape == (b, 2, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["target"].shape == (b, 2) and batch["target"].dtype == torch.float32
    assert batch["xy"].shape == (b, k, 2) and batch["dmag"].shape == (b, k)
    assert batch["valid"].dtype == torch.bool and batch["valid"][:, 0].all()
    assert batch["reversed"].shape == (b,) and batch["reversed"].dtype == torch.bool
    assert isinstance(batch["pair"], list) and all(isinstance(p, str) for p in batch["pair"])
    assert batch["origin"].shape == (b, 2) and batch["origin"].dtype == torch.int64
    for key in ("dmag_sel", "edge_dist", "mag", "snr"):
        assert batch[key].shape == (b,) and torch.isfinite(batch[key]).all()
    assert torch.equal(batch["target"], batch["xy"][:, 0] / 64)
    assert torch.equal(batch["dmag_sel"], batch["dmag"][:, 0])
    assert batch["dflux"].shape == (b, k) and (batch["dflux"][:, 0].abs() > 0).all()
    assert torch.isnan(batch["xy"][~batch["valid"]]).all()
    img = batch["image"]
    assert img.min() >= 0 and img.max() <= 1  # minmax: each tile pair jointly 0-1
    assert_allclose(img.amax(dim=(1, 2, 3)).numpy(), 1.0)
    # the selected change passes the visibility cut, edge_dist matches its position
    assert (batch["snr"] >= sim_dm.index_config.min_snr).all()
    t = batch["target"] * 64
    ed = torch.minimum(t + 0.5, 63.5 - t).amin(dim=1)
    assert_allclose(batch["edge_dist"].numpy(), ed.numpy(), atol=1e-4)


def test_all_tiles_for_the_detector(sim_root):
    dm = FitsDataModule(str(sim_root), samples="all", batch_size=64, augment=False,
                        val_fraction=0.25, test_fraction=0.25, progress=False)
    dm.setup()
    per_pair = n_tiles((256, 256))
    for split in ("train", "val", "test"):
        assert len(dm.datasets[split]) == per_pair * len(dm.pair_ids[split])
    counts = np.zeros(0, int)
    for batch in dm.val_dataloader():
        counts = np.concatenate([counts, batch["valid"].sum(1).numpy()])
        empty = batch["valid"].sum(1) == 0
        assert torch.isnan(batch["target"][empty]).all() and not batch["reversed"][empty].any()
    assert (counts == 0).any() and (counts >= 1).any()  # empty and occupied tiles both served


def test_reversal_and_multiple_changes(synth_root):
    dm = FitsDataModule(str(synth_root), batch_size=16, augment=False, val_fraction=0,
                        test_fraction=0, min_snr=5, drop_last=False, progress=False)
    dm.setup()
    ds = dm.datasets["train"]
    batch = ds.__getitems__(list(range(len(ds))))
    for i, name in enumerate(batch["pair"]):
        faded = name == "p1"
        assert bool(batch["reversed"][i]) == faded == bool(batch["dflux"][i, 0] < 0)
        # after the reversal the brighter image is channel 1 at the target
        x, y = (batch["target"][i] * 64).round().long().tolist()
        assert batch["image"][i, 1, y, x] > batch["image"][i, 0, y, x]
        if faded:
            assert_allclose(batch["dmag_sel"][i].item(), 1.5, atol=0.01)  # eq. 1, catalog
            assert_allclose(batch["mag"][i].item(), 19.0)
    tab = dm.index.changes_table()
    p0 = tab[tab["pair"] == "p0"]
    assert list(p0["dmag_method"]) == ["limit", "catalog"]  # new source vs. brightened one
    assert_allclose(p0["dmag"][1], 1.0, atol=1e-6)


def test_several_changes_in_one_tile_sorted_brightest_first(tmp_path):
    changes = [(20.2, 20.4, None, 21.0), (40.7, 30.1, None, 19.0), (30.0, 45.5, 22.0, 20.5)]
    write_pair(tmp_path / "a", shape=(64, 64), changes=changes)
    dm = FitsDataModule(str(tmp_path), batch_size=4, augment=False, val_fraction=0,
                        test_fraction=0, drop_last=False, progress=False)
    dm.setup()
    s = dm.datasets["train"][0]
    assert s["valid"].tolist() == [True, True, True]
    assert_allclose(s["xy"].numpy(), [[40.7, 30.1], [30.0, 45.5], [20.2, 20.4]], atol=1e-5)
    assert_allclose(s["target"].numpy(), [40.7 / 64, 30.1 / 64], atol=1e-6)


def test_nan_pixels_become_zero_and_asinh(tmp_path):
    write_pair(tmp_path / "a", shape=(128, 128), changes=[(60.2, 60.7, None, 19.0)],
               nan_box=(0, 0, 20, 30))
    for norm in ("minmax", "asinh"):
        dm = FitsDataModule(str(tmp_path), batch_size=8, augment=False, val_fraction=0,
                            test_fraction=0, samples="all", normalization=norm,
                            drop_last=False, progress=False)
        dm.setup()
        s = dm.datasets["train"][0]  # tile at (0, 0) holds the NaN box
        assert torch.isfinite(s["image"]).all()
        assert (s["image"][1, :30, :20] == 0).all()
        if norm == "asinh":  # background ~0 and noise ~1/3 per px in units of asinh
            far = s["image"][0, 40:, :].numpy()
            assert abs(np.median(far)) < 0.05 and 0.25 < far.std() < 0.42
    imgs = np.array([[[[np.nan, 2.0], [4.0, 6.0]], [[np.inf, 6.0], [2.0, 2.0]]]], np.float32)
    out = normalize_tiles(imgs.copy(), "minmax")
    assert_allclose(out, [[[[0, 0], [0.5, 1]], [[0, 1], [0, 0]]]])
    assert_allclose(normalize_tiles(np.full((1, 2, 2, 2), 3.0, np.float32), "minmax"), 0.0)


def test_tiles_are_read_lazily(sim_dm):
    ds = sim_dm.datasets["train"]
    ds[0]
    data, _ = ds.reader.open(str(sim_dm.index.pairs["ref"][0]))
    base = data
    while getattr(base, "base", None) is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap) or type(base).__name__ == "mmap"


# --------------------------------------------------------------------------- splits
def test_split_pairs_disjoint_deterministic():
    s1 = split_pairs(24, 0.15, 0.15, seed=0)
    s2 = split_pairs(24, 0.15, 0.15, seed=0)
    s3 = split_pairs(24, 0.15, 0.15, seed=1)
    assert all(np.array_equal(s1[k], s2[k]) for k in s1)
    assert not all(np.array_equal(s1[k], s3[k]) for k in s1)
    # 0.15 * 24 = 3.6 pairs, rounded half up: 4 each for val and test, the rest train
    assert [len(s1[k]) for k in ("train", "val", "test")] == [16, 4, 4]
    assert_array_equal(np.sort(np.concatenate(list(s1.values()))), np.arange(24))
    small = split_pairs(3, 0.1, 0.1, seed=0)
    assert [len(small[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    with pytest.raises(RtcnnInputError, match="sum to less than 1"):
        split_pairs(10, 0.6, 0.5, seed=0)


def test_datamodule_splits_by_pair(sim_dm, sim_root):
    sets = {s: set(sim_dm.pairs(s)) for s in ("train", "val", "test")}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"])
    assert not (sets["val"] & sets["test"])
    assert len(set.union(*sets.values())) == 4
    for s, ds in sim_dm.datasets.items():  # every tile of a split comes from its pairs
        names = {str(sim_dm.index.pairs["name"][p])
                 for p in sim_dm.index.tiles["pair"][ds.tile_ids]}
        assert names <= sets[s]
    again = FitsDataModule(str(sim_root), batch_size=8, val_fraction=0.25, test_fraction=0.25,
                           seed=0, progress=False)
    again.setup()
    assert all(again.pairs(s) == sim_dm.pairs(s) for s in sets)


def test_region_split_shares_no_pixel(synth_root):
    dm = FitsDataModule(str(synth_root / "p0"), split="region", samples="all", batch_size=8,
                        val_fraction=0.25, test_fraction=0.25, progress=False)
    dm.setup()
    rows = {}
    for s, ds in dm.datasets.items():
        y0 = dm.index.tiles["origin"][ds.tile_ids, 1]
        rows[s] = set()
        for y in y0:
            rows[s] |= set(range(y, y + 64))
        assert len(ds) > 0
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"])
    assert not (rows["val"] & rows["test"])


# --------------------------------------------------------------------------- cache
def test_index_cache_reused_and_invalidated(synth_root, tmp_path, caplog):
    pairs = find_pairs(synth_root)
    cache = tmp_path / "cache"
    i1 = load_or_build_index(pairs, IndexConfig(), cache_dir=cache, progress=False)
    files = sorted(cache.glob("index-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    i2 = load_or_build_index(pairs, IndexConfig(), cache_dir=cache, progress=False)
    assert i2.key == i1.key and files[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert_array_equal(i2.tiles["members"], i1.tiles["members"])
    # a changed setting is another key
    i3 = load_or_build_index(pairs, IndexConfig(min_snr=1e9), cache_dir=cache, progress=False)
    assert i3.key != i1.key and i3.selected_per_pair().sum() == 0
    # a changed input file (new truth row) invalidates the cached index
    truth = pairs[0].truth
    t = Table.read(truth)
    t.add_row([9, 200.0, 30.0, 21.0, 19.0, "transient"])
    t.write(truth, overwrite=True)
    st = os.stat(truth)
    os.utime(truth, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    i4 = load_or_build_index(find_pairs(synth_root), IndexConfig(), cache_dir=cache,
                             progress=False)
    assert i4.key != i1.key
    assert len(i4.changes["x"]) == len(i1.changes["x"]) + 1


def test_default_cache_lives_next_to_the_data(synth_root):
    dm = FitsDataModule(str(synth_root), batch_size=8, progress=False)
    dm.setup()
    assert len(list((synth_root / ".rtcnn-index").glob("index-*.npz"))) == 1


# --------------------------------------------------------------------------- errors
def test_error_catalog_all_outside(tmp_path):
    write_pair(tmp_path / "a", shape=(128, 128), changes=[(60.0, 60.0, None, 19.0)])
    t = Table.read(tmp_path / "a" / "truth.ecsv")
    t["x"] += 500.0
    t.write(tmp_path / "a" / "truth.ecsv", overwrite=True)
    dm = FitsDataModule(str(tmp_path), progress=False)
    with pytest.raises(RtcnnInputError, match=r"truth.ecsv: all 1 .*positions fall outside"):
        dm.setup()


def test_error_and_warning_no_selectable_transients(tmp_path):
    write_pair(tmp_path / "good", changes=[(60.0, 60.0, None, 19.0)])
    write_pair(tmp_path / "faint", changes=[(60.0, 60.0, None, 29.0)])
    dm = FitsDataModule(str(tmp_path), val_fraction=0, test_fraction=0, progress=False)
    with pytest.warns(UserWarning, match="faint: no transient passes the visibility cut"):
        dm.setup()
    assert dm.pairs("train") == ["good"]
    empty = FitsDataModule(str(tmp_path / "faint"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RtcnnInputError, match="none of the 1 pairs has a transient"):
            empty.setup()
    dm_all = FitsDataModule(str(tmp_path / "faint"), samples="all", val_fraction=0,
                            test_fraction=0, progress=False)
    dm_all.setup()  # the detector takes empty tiles: no error
    assert len(dm_all.datasets["train"]) == n_tiles((256, 256))


def test_error_tile_larger_than_image(tmp_path):
    write_pair(tmp_path / "a", shape=(50, 80), changes=[(10.0, 10.0, None, 19.0)])
    dm = FitsDataModule(str(tmp_path), progress=False)
    with pytest.raises(RtcnnInputError, match=r"ref.fits: tile size 64 px is larger than the "
                       r"image \(80 x 50 px\)"):
        dm.setup()


def test_error_messages_are_one_line(tmp_path):
    with pytest.raises(RtcnnInputError) as err:
        FitsDataModule(str(tmp_path / "missing"), progress=False).setup()
    assert "\n" not in str(err.value)
    with pytest.raises(RtcnnInputError, match="samples must be one of"):
        FitsDataModule(str(tmp_path), samples="some")
    with pytest.raises(RtcnnInputError, match="tile overlap"):
        FitsDataModule(str(tmp_path), tile_overlap=64)


# --------------------------------------------------------------------------- sim module
def test_sim_datamodule_generates_then_reuses(tmp_path):
    root = tmp_path / "sim"
    kw = dict(pairs=3, size=128, mode="inject", sim_seed=1, batch_size=4, progress=False,
              scene={"n_transients": 6, "forced_transients": [(60.2, 60.7, 19.0)]})
    dm = SimDataModule(str(root), **kw)
    dm.prepare_data()
    assert dm.is_complete()
    mtime = (root / "pair_0000" / "ref.fits").stat().st_mtime_ns
    dm.setup()
    assert len(dm.datasets["train"]) > 0
    again = SimDataModule(str(root), **kw)
    again.prepare_data()  # present: not simulated again
    assert (root / "pair_0000" / "ref.fits").stat().st_mtime_ns == mtime
    with pytest.raises(RtcnnInputError, match="size=128"):
        SimDataModule(str(root), **{**kw, "size": 256}).prepare_data()
    with pytest.raises(RtcnnInputError, match=r"other scene parameters \(n_transients\)"):
        SimDataModule(str(root), **{**kw, "scene": {**kw["scene"], "n_transients": 7}}
                      ).prepare_data()
    more = SimDataModule(str(root), **{**kw, "pairs": 4})  # one more pair: simulated again
    more.prepare_data()
    assert more.is_complete() and len(more.find_pairs()) == 4


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,cls", [("sim", SimDataModule), ("fits", FitsDataModule)])
def test_hydra_config_instantiates_with_every_argument(name, cls, tmp_path):
    import inspect

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "data" / f"{name}.yaml"
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)},
                            "data": OmegaConf.load(conf)})
    args = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("rtcnn") and "__init__" in vars(klass):  # own arguments
            args |= {p for p in inspect.signature(klass.__init__).parameters
                     if p not in ("self", "kwargs")}
    assert args == set(cfg.data) - {"_target_", "_convert_"}
    dm = instantiate(cfg.data)
    assert isinstance(dm, cls) and dm.root[0].startswith(str(tmp_path))
    assert dm.index_config.stride == cfg.data.tile_size - cfg.data.tile_overlap


# --------------------------------------------------------------------------- bench
@pytest.mark.slow  # starts a fresh python for the memory measurement (~10 s)
def test_bench_data_smoke(sim_root, tmp_path, capsys):
    from rtcnn.bench import main

    res = main(["data", "--data", str(sim_root), "--workers", "0", "--repeats", "1",
                "--out", str(tmp_path)])
    data = res["data"]
    assert data["throughput"][0]["tiles_per_s_median"] > 0
    assert data["memory"]["tiles"] == 4 * n_tiles((256, 256))
    assert 0 < data["memory"]["peak_rss_mib"] < 4096
    assert (tmp_path / "bench-data.json").is_file()
    assert "tiles/s" in capsys.readouterr().out


def test_hparams_are_plain_for_safe_checkpoints(tmp_path):
    """Instantiated from a config without ``_convert_``, no OmegaConf object reaches the
    checkpoint's hyperparameters (``torch.load(weights_only=True)`` refuses them)."""
    from hydra.utils import instantiate

    dm = instantiate({"_target_": "rtcnn.data.SimDataModule", "root": str(tmp_path),
                      "scene": {"forced_transients": [[1.0, 2.0, 20.0]]},
                      "kinds": ["transient"]})
    assert type(dm.hparams["scene"]) is dict and type(dm.hparams["kinds"]) is list
    assert type(dm.scene["forced_transients"]) is list


def test_other_loaders_never_inherit_the_shared_memory_ring(sim_dm):
    from torch.utils.data import DataLoader

    from rtcnn.data.dataset import TileLoader

    ds = sim_dm.datasets["train"]
    ring_batches = list(TileLoader(ds, batch_size=4, collate_fn=collate_tiles, num_workers=1))
    assert ds.ring_slots == 0
    plain = list(DataLoader(ds, batch_size=4, collate_fn=collate_tiles, num_workers=1))
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ring_batches, plain))
    assert all(isinstance(b["image"], torch.Tensor) for b in ring_batches)


# --------------------------------------------------------------------------- synthetic
def test_synthetic_tiles_put_the_transient_at_xy():
    from rtcnn.data.synthetic import SKY_NOISE, synthetic_tiles

    images, xy, peak = synthetic_tiles(16, np.random.default_rng(3))
    assert images.shape == (16, 2, 64, 64) and images.dtype == np.float32
    bright = peak > 30 * SKY_NOISE  # well above the noise of the difference
    assert bright.sum() >= 4
    diff = images[bright, 1] - images[bright, 0]
    iy, ix = np.unravel_index(diff.reshape(len(diff), -1).argmax(axis=1), (64, 64))
    assert_allclose(np.stack([ix, iy], 1), xy[bright], atol=1.0)  # the change's brightest pixel
    assert_allclose(np.median(images[:, 0]), 0.0, atol=SKY_NOISE)


def test_synthetic_batch_follows_the_data_contract():
    from rtcnn.data.synthetic import synthetic_batch

    batch = synthetic_batch("attn5", 5, seed=1, size=48)
    assert batch["image"].shape == (5, 2, 48, 48)
    assert_allclose(batch["target"].numpy(), batch["xy"][:, 0].numpy() / 48)
    lo, hi = batch["image"].amin(dim=(1, 2, 3)), batch["image"].amax(dim=(1, 2, 3))
    assert_allclose(lo.numpy(), 0.0, atol=1e-6)  # minmax per tile pair, as attn5's data
    assert_allclose(hi.numpy(), 1.0, atol=1e-6)
    raw = synthetic_batch("dense", 5, seed=1, size=48)["image"]
    assert raw.max() > 1.5  # e-/s, not normalised
    with pytest.raises(ValueError, match="model must be one of"):
        synthetic_batch("nope", 2)


# --------------------------------------------------------------------------- DDP shards
@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (13, 3), (2, 3)])
def test_epoch_sampler_shards_are_disjoint_and_complete(n, world):
    from torch.utils.data import DistributedSampler

    from rtcnn.data import EpochSampler

    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            s = EpochSampler(n, shuffle=True, seed=4, num_replicas=world, rank=rank)
            s.set_epoch(epoch)
            keys = list(s)
            assert len(keys) == len(s) == -(-n // world)  # equal: the same steps everywhere
            assert {e for _, e in keys} == {epoch}
            shards.append([i for i, _ in keys])
        flat = [i for sh in shards for i in sh]
        assert set(flat) == set(range(n))  # complete
        assert len(flat) - n == -n % world  # disjoint but for the padding
        # the shards interleave the single-process order of the epoch
        whole = EpochSampler(n, shuffle=True, seed=4)
        whole.set_epoch(epoch)
        order = [i for i, _ in whole]
        assert [shards[k % world][k // world] for k in range(n)] == order
    # Lightning leaves a DistributedSampler in place (it would wrap any other one)
    assert isinstance(EpochSampler(n), DistributedSampler)
    assert (EpochSampler(n).num_replicas, EpochSampler(n).rank) == (1, 0)  # no process group
    with pytest.raises(ValueError, match="rank must be in"):
        EpochSampler(n, num_replicas=2, rank=2)


def test_epoch_sampler_resumes_within_its_shard():
    from rtcnn.data import EpochSampler

    s = EpochSampler(11, shuffle=True, seed=1, num_replicas=2, rank=1)
    s.set_epoch(3)
    full = list(s)
    s.skip(3, 2)  # two samples of this process's shard were seen before the stop
    assert list(s) == full[2:] and s.last_start == 2
    assert list(s) == full  # the skip applies once
