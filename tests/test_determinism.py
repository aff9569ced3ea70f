"""Determinism: the same seed and config give the same split, the same augmentation stream
and, on CPU, the same metrics; another seed gives others."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_array_equal

from rtcnn.data import FitsDataModule, split_pairs
from support import load, small_run_overrides, train_in_process


def test_split_pairs_is_a_function_of_the_seed():
    a, b = split_pairs(40, 0.15, 0.15, seed=3), split_pairs(40, 0.15, 0.15, seed=3)
    for s in ("train", "val", "test"):
        assert_array_equal(a[s], b[s])
    assert sorted(np.concatenate(list(a.values())).tolist()) == list(range(40))
    c = split_pairs(40, 0.15, 0.15, seed=4)
    assert any(not np.array_equal(a[s], c[s]) for s in a)


def datamodule(root, tmp_path, seed=0, workers=0) -> FitsDataModule:
    dm = FitsDataModule(str(root), batch_size=2, num_workers=workers, seed=seed, progress=False,
                        val_fraction=0.25, test_fraction=0.25, persistent_workers=workers > 0,
                        cache_dir=str(tmp_path / "cache"))
    dm.setup()
    return dm


def stream(dm: FitsDataModule, epochs: int = 2) -> list[dict]:
    """The training batches of ``epochs`` epochs, as Lightning asks for them."""
    loader = dm.train_dataloader()
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                for b in loader]
    return out


def assert_same_stream(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["pair"] == y["pair"]
        for key in ("image", "target", "xy", "reversed", "origin"):
            assert torch.equal(x[key].nan_to_num(-1) if x[key].is_floating_point() else x[key],
                               y[key].nan_to_num(-1) if y[key].is_floating_point() else y[key]), key


def test_same_seed_same_split_and_augmentation_stream(sim128, tmp_path):
    a = datamodule(sim128, tmp_path / "a")
    b = datamodule(sim128, tmp_path / "b", workers=2)  # workers do not change the stream
    for s in ("train", "val", "test"):
        assert a.pairs(s) == b.pairs(s)
    sa, sb = stream(a), stream(b)
    assert_same_stream(sa, sb)
    # the stream does change between epochs (order and D4 elements), and with the seed
    half = len(sa) // 2
    assert any(not torch.equal(x["image"], y["image"]) for x, y in zip(sa[:half], sa[half:]))
    c = datamodule(sim128, tmp_path / "c", seed=1)
    sc = stream(c)
    assert (a.pairs("train") != c.pairs("train")
            or any(not torch.equal(x["image"], y["image"]) for x, y in zip(sa, sc)))


def test_same_seed_same_metrics_on_cpu(sim128, one_thread, tmp_path):
    args = small_run_overrides(sim128, ["trainer.max_epochs=2"])
    runs = [train_in_process(args, tmp_path / name) for name in ("a", "b")]
    (code_a, ma), (code_b, mb) = runs
    assert code_a == code_b == 0
    assert ma.keys() == mb.keys() and "val/loss" in ma
    assert ma == mb  # bitwise: same seed, same config, one CPU thread
    wa, wb = (load(tmp_path / n / "checkpoints" / "last.ckpt")["state_dict"] for n in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    code, mc = train_in_process([*args, "seed=7"], tmp_path / "c")
    assert code == 0 and mc["val/loss"] != pytest.approx(ma["val/loss"], rel=1e-6)
