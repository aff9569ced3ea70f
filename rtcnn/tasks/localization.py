"""Lightning task for ``attn5``: regress the ``(x, y)`` of the transient in a tile.

:class:`LocalizationTask` wraps any ``nn.Module`` mapping ``(B, C, 64, 64)`` tiles to
``(B, 2)`` positions in tile units (position / tile size). It trains with the paper's
loss, the MSE on those coordinates, and logs per stage and per epoch:

* ``{stage}/loss`` (MSE in tile units squared);
* the :class:`rtcnn.metrics.PixelDistance` statistics ``{stage}/within{1,2,5}px``,
  ``{stage}/dist_{mean,std,max}`` (px) and ``{stage}/n_tiles``;
* for val and test, the same statistics on tiles whose transient has difference-image
  S/N >= ``snr_threshold`` (batch key ``"snr"``), postfixed ``_snr{threshold}``, e.g.
  ``test/within2px_snr10``;
* ``val/within2px_best``, the best ``val/within2px`` so far (the hyperparameter-search
  objective);
* each validation epoch, a TensorBoard figure ``val/panels``: reference / new /
  difference of a few tiles with the true (circle) and predicted (plus) positions.

Batches follow the data contract (``rtcnn.data``): ``batch["image"]`` (B, 2, 64, 64)
float32, ``batch["target"]`` (B, 2) float32 in tile units, optional ``batch["snr"]`` (B,).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from rtcnn.metrics import DEFAULT_RADII, localization_metrics

DEFAULT_LR = 1e-3  # Adam learning rate, constant (paper)
DEFAULT_SNR_THRESHOLD = 10.0  # difference-image S/N of the "clearly visible" subset
DEFAULT_PANELS = 4  # tiles drawn in the val/panels TensorBoard figure
STAGES = ("train", "val", "test")


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


class LocalizationTask(LightningModule):
    """Train a position regressor (``attn5``) with MSE on ``(x, y) / tile size``.

    Parameters
    ----------
    net : nn.Module or mapping
        The network, or ``{"_target_": "rtcnn.models.attn5.Attn5", **kwargs}`` (the form
        stored in checkpoints, so ``load_from_checkpoint(path)`` needs no arguments).
    optimizer : callable, optional
        ``optimizer(params) -> torch.optim.Optimizer`` (a Hydra ``_partial_``); default
        Adam with lr 1e-3, the paper's choice.
    scheduler : callable, optional
        ``scheduler(optimizer) -> LRScheduler``; None (default) keeps the LR constant as the
        paper does. Stepped every epoch, monitoring ``val/loss`` if it needs a metric.
    snr_threshold : float
        Difference-image S/N threshold of the ``_snr{threshold}`` metric subset.
    radii : sequence of float
        Radii (px) of the ``within{r}px`` metrics.
    n_panels : int
        Tiles drawn in the ``val/panels`` figure each validation epoch (0 = none).
    compile : bool
        ``torch.compile`` the network before fitting.
    """

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        snr_threshold: float = DEFAULT_SNR_THRESHOLD,
        radii: Sequence[float] = DEFAULT_RADII,
        n_panels: int = DEFAULT_PANELS,
        compile: bool = False,
    ):
        super().__init__()
        radii = [float(r) for r in radii]  # plain floats (not ListConfig) in checkpoints
        snr_threshold, n_panels, compile = float(snr_threshold), int(n_panels), bool(compile)
        self.save_hyperparameters(logger=False, ignore=["net", "optimizer", "scheduler"])
        self.net = build_net(net)
        spec = net_spec(self.net)
        if spec is not None:
            self.hparams["net"] = spec
        self.optimizer_factory = optimizer or functools.partial(torch.optim.Adam, lr=DEFAULT_LR)
        self.scheduler_factory = scheduler
        self.snr_threshold = float(snr_threshold)
        self.n_panels = int(n_panels)
        base = localization_metrics(radii=radii)
        postfix = f"_snr{self.snr_threshold:g}"
        # attributes {stage}_metrics and {stage}_snr_metrics (the S/N >= threshold subset)
        # and {stage}_loss: the epoch's mean loss. All are synchronised across DDP processes
        # inside the epoch-end hooks (every rank calls them), never lazily by the progress
        # bar, which only rank 0 runs (a self.log(sync_dist=True) would deadlock there).
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", base.clone(prefix=f"{stage}/"))
            setattr(self, f"{stage}_loss", MeanMetric())
        for stage in ("val", "test"):
            setattr(self, f"{stage}_snr_metrics", base.clone(prefix=f"{stage}/", postfix=postfix))
        self.val_within2px_best = MaxMetric()
        self.val_within2px_best.persistent(True)  # in checkpoints: a resumed run keeps its best
        self._panel: dict[str, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` tiles -> ``(B, 2)`` ``(x, y)`` in tile units."""
        return self.net(x)

    # ----------------------------------------------------------------- steps
    def _step(self, batch: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = batch["image"], batch["target"]
        pred = self(image)
        loss = F.mse_loss(pred, target)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=image.shape[0])
        pred_d, target_d = pred.detach(), target.detach()
        getattr(self, f"{stage}_metrics").update(pred_d, target_d)
        snr = batch.get("snr")
        if hasattr(self, f"{stage}_snr_metrics") and snr is not None:
            keep = torch.as_tensor(snr, device=pred_d.device) >= self.snr_threshold
            getattr(self, f"{stage}_snr_metrics").update(pred_d[keep], target_d[keep])
        return loss, pred_d

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self._step(batch, "train")
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, pred = self._step(batch, "val")
        if batch_idx == 0 and self.n_panels > 0:
            n = self.n_panels
            self._panel = {"images": batch["image"][:n].detach().float().cpu(),
                           "target": batch["target"][:n].detach().float().cpu(),
                           "pred": pred[:n].float().cpu()}
            if batch.get("snr") is not None:
                self._panel["snr"] = torch.as_tensor(batch["snr"])[:n].cpu()

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """``(B, 2)`` predicted ``(x, y)`` in tile units."""
        return self(batch["image"])

    # ---------------------------------------------------------- epoch ends
    def _log_metrics(self, key: str) -> dict[str, torch.Tensor]:
        collection = getattr(self, f"{key}_metrics")
        values = collection.compute()
        collection.reset()
        if key in STAGES:
            loss = getattr(self, f"{key}_loss")
            values[f"{key}/loss"] = loss.compute()
            loss.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith(("/within2px", "/loss")))
        return values

    def on_train_start(self) -> None:
        # the sanity-check validation must not count as the best epoch; a resumed run
        # keeps the best so far (restored from the checkpoint)
        if self.trainer.ckpt_path is None:
            self.val_within2px_best.reset()

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val")
        self._log_metrics("val_snr")
        if not self.trainer.sanity_checking:
            if torch.isfinite(values["val/within2px"]):
                self.val_within2px_best(values["val/within2px"])
            self.log("val/within2px_best", self.val_within2px_best.compute())
            self._log_panels()
        self._panel = None

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self._log_metrics("test_snr")

    def _log_panels(self) -> None:
        if self._panel is None or self.trainer.global_rank != 0:
            return
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                fig = panel_figure(
                    self._panel["images"], self._panel["target"], self._panel["pred"],
                    self._panel.get("snr"), title=f"epoch {self.current_epoch}",
                )
                logger.experiment.add_figure("val/panels", fig, global_step=self.current_epoch)

    # ----------------------------------------------------------- optimizers
    def setup(self, stage: str) -> None:
        if self.hparams.compile and stage == "fit":
            self.net = torch.compile(self.net)

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
