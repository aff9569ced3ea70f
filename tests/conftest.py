"""Shared fixtures: a tiny simulated data set (built once per session) and composed configs.

``train_cfg`` composes the real ``conf/train.yaml`` with Hydra's compose API, pointed at
the tiny set and at a fresh ``tmp_path`` for every output, with ``trainer=debug``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TINY_PAIRS = 4  # simulated pairs: 2 train, 1 val, 1 test (split by pair)
TINY_SIZE = 256  # px, image side
TINY_SEED = 7  # simulator seed
TINY_TRANSIENTS = 14  # random transients per pair (plus the default variables)


@pytest.fixture(scope="session")
def tiny_sim(tmp_path_factory) -> Path:
    """A 4-pair, 256x256 px inject-mode simulated set (rtcnn.sim), made once per session.

    ``RTCNN_TINY_SIM=DIR`` uses a copy of that set made beforehand by the same call (for a
    machine without GalSim, e.g. a lent GPU node); its parameters are checked.
    """
    import shutil

    root = tmp_path_factory.mktemp("tiny_sim")
    given = os.environ.get("RTCNN_TINY_SIM")
    if given:
        import json

        shutil.copytree(given, root, dirs_exist_ok=True)
        params = json.loads((root / "pair_0000" / "params.json").read_text())
        assert (params["size"], params["seed"]) == (TINY_SIZE, TINY_SEED), params
        return root
    from rtcnn.sim import simulate_dataset

    simulate_dataset(root, pairs=TINY_PAIRS, size=TINY_SIZE, mode="inject", seed=TINY_SEED,
                     progress=False, n_transients=TINY_TRANSIENTS)
    return root


def tiny_overrides(tiny_sim: Path, out: Path) -> list[str]:
    """Command-line overrides that point ``train`` at the tiny set and ``out``, fast."""
    return [
        f"data.root={tiny_sim}",
        f"data.pairs={TINY_PAIRS}",
        f"data.size={TINY_SIZE}",
        f"data.sim_seed={TINY_SEED}",
        "data.mode=inject",
        f"+data.scene.n_transients={TINY_TRANSIENTS}",
        "data.batch_size=8",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "data.progress=false",
        f"paths.root_dir={out}",
        "extras.print_config=false",
        "model.n_panels=2",
    ]


def compose_train(overrides: list[str], out: Path) -> DictConfig:
    """Compose ``conf/train.yaml`` with ``overrides`` and make ``out`` its output dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    import rtcnn.utils  # noqa: F401 - registers the config resolvers (rtcnn.task)

    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.work_dir = os.getcwd()
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture()
def train_cfg(tiny_sim, tmp_path) -> DictConfig:
    """``conf/train.yaml`` with ``trainer=debug`` on the tiny set, outputs in ``tmp_path``."""
    return compose_train(["trainer=debug", *tiny_overrides(tiny_sim, tmp_path)],
                         tmp_path / "run")


SMALL_PAIRS = 6  # simulated epochs-mode pairs of the pipeline and survey tests
SMALL_SIZE = 96  # px, their image side


@pytest.fixture(scope="session")
def small_pairs(tmp_path_factory) -> Path:
    """Six 96x96 px epochs-mode pairs (rtcnn.sim, pair_0000 ... pair_0005), made once."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("small_pairs")
    simulate_dataset(root, pairs=SMALL_PAIRS, size=SMALL_SIZE, mode="epochs", seed=5,
                     progress=False, n_transients=4)
    return root


@pytest.fixture(scope="session")
def tiny_detector_ckpt(tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a tiny dense detector after one training step."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from rtcnn.models.detector import DenseDetector
    from rtcnn.tasks.detection import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(DenseDetector(channels=(8, 8, 8), head_channels=8, prior=0.01))
    xy = torch.tensor([[[20.0, 30.0]], [[40.5, 10.25]]])
    batch = {"image": torch.randn(2, 2, 64, 64), "xy": xy, "valid": torch.ones(2, 1, dtype=bool),
             "dmag": torch.ones(2, 1)}  # fmt: skip
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    trainer.fit(task, DataLoader([batch], batch_size=None))
    path = tmp_path_factory.mktemp("tiny_detector") / "dense.ckpt"
    trainer.save_checkpoint(path)
    return path


SIM128_PAIRS, SIM128_SIZE, SIM128_SEED = 4, 128, 3  # the set of the small training runs


@pytest.fixture(scope="session")
def sim128(tmp_path_factory) -> Path:
    """Four 128x128 px inject-mode pairs (rtcnn.sim, seed 3, 6 transients each), made once
    per session: the data of the interrupt, determinism and evaluate training runs."""
    from rtcnn.sim import simulate_dataset

    root = tmp_path_factory.mktemp("sim128")
    simulate_dataset(root, SIM128_PAIRS, SIM128_SIZE, "inject", SIM128_SEED, progress=False,
                     n_transients=6)
    return root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread (bitwise-comparable CPU results), restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield 1
    torch.set_num_threads(before)
