"""What every task shares: the network, its optimizer, the speed switches, the panel figure.

:class:`NetTask` is the base of :class:`rtcnn.tasks.localization.LocalizationTask` and
:class:`rtcnn.tasks.detection.DetectionTask`. It holds

* the network (:func:`build_net`; the ``{"_target_": ..., **config}`` spec saved in the
  hyperparameters, so ``load_from_checkpoint(path)`` needs no arguments) and the
  optimizer / scheduler factories (:meth:`NetTask.configure_optimizers`);
* the metric the callbacks watch: the class attributes :attr:`NetTask.monitor` and
  :attr:`NetTask.mode` (torchgeo's convention); the training configs read them through
  the ``${rtcnn.task:<_target_>,monitor}`` resolver (:func:`rtcnn.utils.task_attribute`);
* the speed switches, all off by default where they could change a CPU run:

  ``compile``
      ``torch.compile`` the network before fitting (:meth:`NetTask.setup`).
  ``channels_last``
      the network's weights and every batch's ``"image"`` in channels-last memory
      layout (NHWC; faster convolutions on GPUs with tensor cores and on oneDNN CPUs,
      same numbers up to float rounding).
  ``gpu_augment``
      the random D4 element (:mod:`rtcnn.augment`) applied to each training batch on the
      device, in :meth:`NetTask.on_after_batch_transfer`, instead of per sample in the
      data loader's CPU workers: ``"image"``, ``"xy"`` and ``"target"`` are transformed
      exactly as :class:`rtcnn.data.TileDataset` does (:func:`augment_batch`; the same
      float32 operations, so the same bits for the same element). ``"auto"`` (default):
      on when training on a CUDA device, off on a CPU. When on, the training dataset's
      own augmentation is switched off at the start of training (else every tile would
      be transformed twice). The elements come from torch's global random generator
      (seeded by the training command's ``seed``), not from the data layer's
      ``hash(seed, epoch, index)``: the same distribution, another stream.

* the best-so-far metrics reset at the start of a fresh fit (kept on resume) and the
  TensorBoard ``val/panels`` figure (:func:`panel_figure`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import nn

from rtcnn.augment import D4_NAMES, apply_batch

__all__ = ["CONF_DIR", "DEFAULT_PANELS", "GPU_AUGMENT_CHOICES", "STAGES", "NetTask",
           "augment_batch", "build_net", "build_task", "net_spec", "panel_figure"]

GPU_AUGMENT_CHOICES = (True, False, "auto")
DEFAULT_PANELS = 4  # tiles drawn in the val/panels TensorBoard figure
STAGES = ("train", "val", "test")  # metric name prefixes: train/..., val/..., test/...
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the checkout's Hydra configs

# Lightning warns on every fit that the task's on_after_batch_transfer is used although a
# DataModule is given; that is the intent (the DataModule defines no such hook).
warnings.filterwarnings(
    "ignore", message="You have overridden `on_after_batch_transfer` in `LightningModule` but")


def build_net(net: nn.Module | Mapping[str, Any]) -> nn.Module:
    """Return ``net`` itself, or build it from a ``{"_target_": "module.Class", **kwargs}``."""
    if isinstance(net, nn.Module):
        return net
    if not isinstance(net, Mapping) or "_target_" not in net:
        raise TypeError(f"net must be an nn.Module or a mapping with '_target_', got {net!r}")
    import hydra.utils

    return hydra.utils.instantiate(dict(net), _convert_="all")


def net_spec(net: nn.Module) -> dict[str, Any] | None:
    """``{"_target_": ..., **net.config}`` for a module exposing ``config`` (e.g. ``Attn5``)."""
    config = getattr(net, "config", None)
    if not isinstance(config, Mapping):
        return None
    return {"_target_": f"{type(net).__module__}.{type(net).__qualname__}", **config}


def augment_batch(batch: Mapping[str, Any], elements: torch.Tensor) -> dict[str, Any]:
    """Apply D4 element ``elements[i]`` to sample ``i`` of a batch, on the batch's device.

    Parameters
    ----------
    batch : mapping
        The data contract's batch: ``"image"`` (B, C, n, n) tensor; optional ``"xy"``
        (B, K, 2) px tile positions (NaN padded) and ``"target"`` (B, 2) = ``xy[:, 0] / n``.
    elements : (B,) int tensor
        D4 element indices 0-7 (:data:`rtcnn.augment.D4_NAMES`).

    Returns
    -------
    dict
        A shallow copy with ``"image"`` and ``"xy"`` transformed by
        :func:`rtcnn.augment.apply_batch` and ``"target"`` recomputed as
        ``xy[:, 0] / n`` (what :class:`rtcnn.data.TileDataset` does after its own
        augmentation). Every other key (``origin``, ``snr``, ``edge_dist``, ...) is
        D4-invariant or refers to the unaugmented tile and passes through.
    """
    image = batch["image"]
    if image.ndim != 4 or image.shape[-1] != image.shape[-2]:
        raise ValueError(f"image must be (B, C, n, n), got {tuple(image.shape)}")
    elements = torch.as_tensor(elements, device=image.device)
    if elements.shape != (image.shape[0],):
        raise ValueError(f"elements must be ({image.shape[0]},), got {tuple(elements.shape)}")
    n = image.shape[-1]
    xy = batch.get("xy")
    out = dict(batch)
    out["image"], xy_out = apply_batch(image, xy, elements)
    if xy is not None:
        out["xy"] = xy_out
        if "target" in batch and xy_out.shape[1] > 0:
            out["target"] = xy_out[:, 0] / float(n)
    elif "target" in batch:  # no slots: transform the target itself (tile units)
        _, t = apply_batch(image[:, :0], batch["target"][:, None] * float(n), elements)
        out["target"] = t[:, 0] / float(n)
    return out


def panel_figure(
    images: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    pred: torch.Tensor | np.ndarray,
    snr: torch.Tensor | np.ndarray | None = None,
    title: str = "",
) -> Figure:
    """Draw tiles as rows of reference / new / difference with true and predicted positions.

    Parameters
    ----------
    images : (N, 2, S, S)
        Tiles, channel 0 reference and 1 new (any normalisation).
    target, pred : (N, 2)
        True and predicted ``(x, y)`` in tile units (px / S); drawn as a green circle and a
        red plus at ``(x, y) * S`` px with ``origin='lower'`` (x right, y up).
    snr : (N,), optional
        Difference-image S/N written in the row label.
    title : str
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
        A figure (not registered with pyplot; no need to close it).
    """
    images = np.asarray(images, dtype=np.float32)
    target = np.asarray(target, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if images.ndim != 4 or images.shape[1] != 2:
        raise ValueError(f"images must be (N, 2, S, S), got {images.shape}")
    n, size = images.shape[0], images.shape[-1]
    fig = Figure(figsize=(7.5, 2.5 * n), layout="constrained")
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        ref, new = images[i, 0], images[i, 1]
        diff = new - ref
        lo, hi = np.percentile(np.concatenate([ref.ravel(), new.ravel()]), [1.0, 99.5])
        dmax = float(np.percentile(np.abs(diff), 99.5)) or float(np.abs(diff).max()) or 1.0
        panels = [(ref, "reference", "gray", lo, hi), (new, "new", "gray", lo, hi),
                  (diff, "new - reference", "RdBu_r", -dmax, dmax)]
        tx, ty = target[i] * size
        px, py = pred[i] * size
        dist = float(np.hypot(px - tx, py - ty))
        for j, (data, name, cmap, vmin, vmax) in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(data, origin="lower", cmap=cmap, vmin=vmin, vmax=vmax,
                      interpolation="nearest")
            ax.plot(tx, ty, "o", mfc="none", mec="lime", ms=16, mew=1.0, label="true")
            ax.plot(px, py, "+", color="red", ms=7, mew=0.8, label="predicted")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
        label = f"d = {dist:.2f} px"
        if snr is not None:
            label += f"\nS/N = {float(np.asarray(snr)[i]):.1f}"
        axes[i, 0].set_ylabel(label)
    axes[0, 2].legend(loc="upper right", fontsize=7, framealpha=0.6)
    if title:
        fig.suptitle(title)
    return fig


class NetTask(LightningModule):
    """Base of the tasks: network, optimizer wiring, speed switches (module docstring).

    Class attributes
    ----------------
    monitor : str
        The logged metric that says which epoch is best (checkpoint, early stopping);
        ``{monitor}_best`` is logged too when a subclass tracks it.
    mode : {'min', 'max'}
        Whether a smaller or a larger ``monitor`` is better.

    Subclasses call ``super().__init__(net, optimizer, scheduler, default_optimizer)``
    first thing in their ``__init__``; every argument of the subclass's ``__init__``
    except ``net``, ``optimizer`` and ``scheduler`` becomes a hyperparameter (saved in
    checkpoints), and the subclass's signature must include ``compile``,
    ``channels_last`` and ``gpu_augment`` (read from ``self.hparams``).

    Parameters
    ----------
    net : nn.Module or mapping
        The network or its ``{"_target_": ..., **kwargs}`` spec.
    optimizer : callable or None
        ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra ``_partial_``).
    scheduler : callable or None
        ``scheduler(optimizer) -> LRScheduler`` stepped per epoch, monitoring ``val/loss``
        if it needs a metric; None keeps the learning rate constant.
    default_optimizer : callable
        Used when ``optimizer`` is None.
    """

    monitor: str = "val/loss"
    mode: str = "min"

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None,
        default_optimizer: Callable[..., torch.optim.Optimizer],
    ):
        super().__init__()
        # the hyperparameters are the arguments of the subclass's __init__ (the caller)
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"],
                                  frame=inspect.currentframe().f_back)
        for key in ("compile", "channels_last"):
            self.hparams[key] = bool(self.hparams.get(key, False))
        gpu_augment = self.hparams.get("gpu_augment", False)
        if gpu_augment not in GPU_AUGMENT_CHOICES:
            raise ValueError(f"gpu_augment must be true, false or 'auto', got {gpu_augment!r}")
        self.net = build_net(net)
        spec = net_spec(self.net)
        if spec is not None:
            self.hparams["net"] = spec
        self.optimizer_factory = optimizer or default_optimizer
        self.scheduler_factory = scheduler
        self.augment_on_device = False  # decided at the start of training (gpu_augment)
        self._panel: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------- speed switches
    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and stage == "fit" and not hasattr(self.net, "_orig_mod"):
            self.net = torch.compile(self.net)

    def memory_format(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` in the network's memory layout (channels-last if ``channels_last``)."""
        if self.hparams.channels_last and images.ndim == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """On the device: the D4 augmentation (``gpu_augment``) and the memory layout."""
        if not isinstance(batch, Mapping) or "image" not in batch:
            return batch
        trainer = self._trainer
        if self.augment_on_device and trainer is not None and trainer.training:
            n = batch["image"].shape[0]
            elements = torch.randint(len(D4_NAMES), (n,)).to(batch["image"].device)
            batch = augment_batch(batch, elements)
        if self.hparams.channels_last:
            batch = {**batch, "image": self.memory_format(batch["image"])}
        return batch

    def _train_datasets(self) -> Iterable[Any]:
        """The dataset(s) of the trainer's training loader(s)."""
        loaders = self.trainer.train_dataloader
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        return [getattr(loader, "dataset", None) for loader in loaders]

    def _start_device_augmentation(self) -> None:
        """Resolve ``gpu_augment``; when on, switch the data loader's own D4 off."""
        mode = self.hparams.get("gpu_augment", False)
        self.augment_on_device = mode is True or (mode == "auto" and self.device.type == "cuda")
        if not self.augment_on_device:
            return
        for dataset in self._train_datasets():
            if getattr(dataset, "augment", False):
                dataset.augment = False  # workers start after this hook and copy the flag

    def best_metrics(self) -> list:
        """The best-so-far metrics (``MaxMetric``), reset at the start of a fresh fit."""
        return []

    def on_train_start(self) -> None:
        self._start_device_augmentation()
        # the sanity-check validation must not count as the best epoch; a resumed run
        # keeps the best so far (restored from the checkpoint)
        if self.trainer.ckpt_path is None:
            for best in self.best_metrics():
                best.reset()

    # ----------------------------------------------------------- optimizers, panels
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss",
                             "interval": "epoch", "frequency": 1},
        }

    def _log_panels(self) -> None:
        """The ``val/panels`` TensorBoard figure from ``self._panel`` (rank 0 only)."""
        if self._panel is None or self.trainer.global_rank != 0:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig = panel_figure(
                    self._panel["images"], self._panel["target"], self._panel["pred"],
                    self._panel.get("snr"), title=f"epoch {self.current_epoch}",
                )
                logger.experiment.add_figure("val/panels", fig, global_step=self.current_epoch)


def build_task(model: str, **overrides: Any) -> NetTask:
    """The task of ``conf/model/<model>.yaml`` (Hydra-instantiated), with key overrides.

    Parameters
    ----------
    model : str
        Name of a model config (``attn5``, ``dense``).
    **overrides
        Top-level keys of that config to replace (``compile=True``...); ``n_panels`` is
        0 unless given (no figures outside a training run).

    Returns
    -------
    NetTask
        The untrained task, on the CPU.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{model}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
        raise ValueError(f"no model config {model!r}; choose one of {names}")
    cfg = OmegaConf.load(path)
    for key, value in {"n_panels": 0, **overrides}.items():
        cfg[key] = value
    return instantiate(cfg)
