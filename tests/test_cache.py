"""Tile caches (rtcnn.data.cache): the cached batches are the image data module's batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose, assert_array_equal

from rtcnn.data import FitsDataModule
from rtcnn.data.cache import TileCacheDataModule, export_tiles, load_cache
from rtcnn.errors import RtcnnInputError


@pytest.fixture(scope="module")
def image_dm(tiny_sim):
    dm = FitsDataModule(str(tiny_sim), batch_size=4, val_fraction=0.25, test_fraction=0.25,
                        num_workers=0, progress=False, seed=3)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def cache(image_dm, tmp_path_factory):
    return export_tiles(image_dm, tmp_path_factory.mktemp("cache") / "tiles.npz",
                        progress=False)


def _first_batches(loader, n=2):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if i + 1 == n:
            break
    return out


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_cached_batches_equal_the_image_batches(image_dm, cache, split):
    cached = TileCacheDataModule(str(cache), batch_size=4)
    assert cached.seed == image_dm.hparams.seed and cached.tile_size == 64
    get = f"{split}_dataloader"
    for a, b in zip(_first_batches(getattr(image_dm, get)()),
                    _first_batches(getattr(cached, get)())):
        assert a["pair"] == b["pair"]
        for key in ("image", "xy", "target", "dmag", "valid", "origin", "snr"):
            assert_allclose(a[key].numpy(), b[key].numpy(), rtol=0, atol=0, equal_nan=True,
                            err_msg=key)


def test_augmentation_is_seeded_and_changes_the_tiles(cache):
    cached = TileCacheDataModule(str(cache), batch_size=4)
    plain = TileCacheDataModule(str(cache), batch_size=4, augment=False)
    a = next(iter(cached.train_dataloader()))
    b = next(iter(plain.train_dataloader()))
    assert_array_equal(a["origin"].numpy(), b["origin"].numpy())
    assert not torch.equal(a["image"], b["image"])  # some D4 element is not the identity



def test_half_precision_cache_is_smaller_and_close(image_dm, cache, tmp_path):
    half = export_tiles(image_dm, tmp_path / "half.npz", half=True, progress=False)
    _, full_splits = load_cache(cache)
    _, half_splits = load_cache(half)
    assert half_splits["train"]["image"].dtype == np.float16
    assert_allclose(half_splits["train"]["image"].astype(np.float32),
                    full_splits["train"]["image"], atol=5e-4)  # minmax tiles lie in 0-1
    assert half.stat().st_size < cache.stat().st_size


def test_bad_caches_are_one_line_errors(tmp_path, cache, image_dm):
    with pytest.raises(RtcnnInputError, match="no such tile cache"):
        TileCacheDataModule(str(tmp_path / "missing.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(RtcnnInputError, match="not a readable tile cache"):
        TileCacheDataModule(str(junk))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(RtcnnInputError, match="not a tile cache"):
        TileCacheDataModule(str(tmp_path / "other.npz"))
    with pytest.raises(RtcnnInputError, match="exists"):
        export_tiles(image_dm, cache, progress=False)
