"""Lightning task for ``attn5``: regress the ``(x, y)`` of the transient in a tile.

:class:`LocalizationTask` wraps any ``nn.Module`` mapping ``(B, C, n, n)`` tiles to
``(B, 2)`` positions in tile units (position / n, n the tile side of the data,
``data.tile_size``, 64 px in the paper). It trains with the paper's loss, the MSE on those
coordinates, and logs per stage and per epoch:

* ``{stage}/loss`` (MSE in tile units squared);
* the :class:`rtcnn.metrics.PixelDistance` statistics ``{stage}/within{1,2,5}px``,
  ``{stage}/dist_{mean,std,max}`` (px: tile units times the side ``n`` of the batch's
  tiles) and ``{stage}/n_tiles``;
* for val and test, the same statistics on tiles whose transient has difference-image
  S/N >= ``snr_threshold`` (batch key ``"snr"``), postfixed ``_snr{threshold}``, e.g.
  ``test/within2px_snr10``;
* ``val/within2px_best``, the best ``val/within2px`` so far (the hyperparameter-search
  objective);
* each validation epoch, a TensorBoard figure ``val/panels``: reference / new /
  difference of a few tiles with the true (circle) and predicted (plus) positions.

Batches follow the data contract (``rtcnn.data``): ``batch["image"]`` (B, 2, n, n)
float32, ``batch["target"]`` (B, 2) float32 in tile units, optional ``batch["snr"]`` (B,).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from rtcnn.metrics import DEFAULT_RADII, localization_metrics
from rtcnn.tasks.base import DEFAULT_PANELS, STAGES, NetTask

DEFAULT_LR = 1e-3  # Adam learning rate, constant (paper)
DEFAULT_SNR_THRESHOLD = 10.0  # difference-image S/N of the "clearly visible" subset

__all__ = ["DEFAULT_LR", "DEFAULT_SNR_THRESHOLD", "LocalizationTask"]


class LocalizationTask(NetTask):
    """Train a position regressor (``attn5``) with MSE on ``(x, y) / tile size``.

    Parameters
    ----------
    net : nn.Module or mapping
        The network, or ``{"_target_": "rtcnn.models.attn5.Attn5", **kwargs}``.
    optimizer, scheduler : callable, optional
        Factories (:class:`rtcnn.tasks.base.NetTask`); default Adam with lr 1e-3 and a
        constant learning rate, the paper's choice.
    snr_threshold : float
        Difference-image S/N threshold of the ``_snr{threshold}`` metric subset.
    radii : sequence of float
        Radii (px) of the ``within{r}px`` metrics.
    n_panels : int
        Tiles drawn in the ``val/panels`` figure each validation epoch (0 = none).
    compile, channels_last, gpu_augment
        The speed switches of :mod:`rtcnn.tasks.base`: ``torch.compile``, channels-last
        layout, D4 augmentation on the device (``"auto"``: on a CUDA device).
    """

    monitor = "val/within2px"  # the paper's figure of merit
    mode = "max"

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        snr_threshold: float = DEFAULT_SNR_THRESHOLD,
        radii: Sequence[float] = DEFAULT_RADII,
        n_panels: int = DEFAULT_PANELS,
        compile: bool = False,
        channels_last: bool = False,
        gpu_augment: bool | str = "auto",
    ):
        radii = [float(r) for r in radii]  # plain floats (not ListConfig) in checkpoints
        snr_threshold, n_panels = float(snr_threshold), int(n_panels)
        super().__init__(net, optimizer, scheduler,
                         functools.partial(torch.optim.Adam, lr=DEFAULT_LR))
        self.snr_threshold = snr_threshold
        self.n_panels = n_panels
        base = localization_metrics(radii=radii, scale=1.0)  # updated in px (_step)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` tiles -> ``(B, 2)`` ``(x, y)`` in tile units."""
        return self.net(x)

    # ----------------------------------------------------------------- steps
    def _step(self, batch: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = batch["image"], batch["target"]
        pred = self(image)
        loss = F.mse_loss(pred, target)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=image.shape[0])
        size = float(image.shape[-1])  # px per tile unit: the data's tile side
        pred_d, target_d = pred.detach() * size, target.detach() * size
        getattr(self, f"{stage}_metrics").update(pred_d, target_d)
        snr = batch.get("snr")
        if hasattr(self, f"{stage}_snr_metrics") and snr is not None:
            keep = torch.as_tensor(snr, device=pred_d.device) >= self.snr_threshold
            getattr(self, f"{stage}_snr_metrics").update(pred_d[keep], target_d[keep])
        return loss, pred.detach()

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

    def best_metrics(self) -> list:
        return [self.val_within2px_best]

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
