"""Lightning task for the dense detector (``model=dense``).

:class:`DetectionTask` trains :class:`rtcnn.models.detector.DenseDetector` (or any net
with the same output dict) on tiles holding zero, one or several transients:

* targets: :func:`rtcnn.models.detector.encode_targets` from the batch's ``"xy"``
  (B, K, 2) px, ``"valid"`` (B, K) and ``"dmag"`` (B, K) (mag, the data's ``|dm|``),
  and the sign of each change (:func:`true_brightened`);
* loss: CenterNet focal loss on the cell heat map + L1 on offsets (px) and dmag (mag)
  + BCE on the sign, near each source (:func:`rtcnn.models.detector.detector_loss`);
* metrics, per stage, at the score ``threshold`` and match radius ``match_radius``
  (:class:`rtcnn.metrics.DetectionMetrics`): ``{stage}/precision``, ``{stage}/recall``,
  ``{stage}/f1``, ``{stage}/loc_median`` (px), ``{stage}/within0p5px``, ``{stage}/within2px``,
  ``{stage}/dmag_mae`` (mag), ``{stage}/sign_acc``, counts ``{stage}/n_true`` and
  ``{stage}/n_pred``; and the loss parts ``{stage}/loss``, ``{stage}/loss_heat``,
  ``{stage}/loss_offset``, ``{stage}/loss_dmag``, ``{stage}/loss_sign``;
  ``val/f1_best`` and ``val/within2px_best`` are the best values so far.

``{stage}/within2px`` (the fraction of true changes detected within 2 px) has the meaning
and the name of the localisation task's metric. The task's :attr:`DetectionTask.monitor`
is ``val/f1`` (recall alone would reward false positives): the default callbacks and
``optimized_metric`` follow it.

If a batch says a tile was ``"reversed"`` (the paper's swap that puts the brighter image
second) the two channels are swapped back, so channel 0 is always the reference epoch
and the sign head means "brighter in the new image".
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric

from rtcnn.metrics import DEFAULT_MATCH_RADIUS, detection_metrics
from rtcnn.models.detector import (
    DEFAULT_THRESHOLD,
    HEAT_SIGMA,
    REGRESS_RADIUS,
    decode,
    detector_loss,
    encode_targets,
)
from rtcnn.tasks.base import DEFAULT_PANELS, STAGES, NetTask

__all__ = ["DEFAULT_LR", "DEFAULT_THRESHOLD", "DEFAULT_WEIGHT_DECAY", "DetectionTask",
           "true_brightened", "unreverse"]

DEFAULT_LR = 2e-3  # AdamW learning rate
DEFAULT_WEIGHT_DECAY = 1e-4  # AdamW weight decay


def true_brightened(batch: Mapping[str, Any], image: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool: which true changes brightened (new brighter than reference).

    From the batch's signed flux change ``"dflux"`` (B, K) when it has one, else from the
    sign of ``new - ref`` summed over the 3x3 pixels around each position in ``image``
    (channel 0 = reference), which is right for any change bright enough to train on.
    """
    if "dflux" in batch:
        return torch.as_tensor(batch["dflux"], device=image.device) > 0
    xy = batch["xy"]
    B, K = xy.shape[:2]
    n_y, n_x = image.shape[-2:]
    diff = (image[:, 1] - image[:, 0]).float()
    box = F.avg_pool2d(diff[:, None], 3, stride=1, padding=1)[:, 0]  # (B, H, W)
    ij = torch.nan_to_num(xy, nan=0.0).round().long()
    ix = ij[..., 0].clamp(0, n_x - 1)
    iy = ij[..., 1].clamp(0, n_y - 1)
    b = torch.arange(B, device=image.device)[:, None].expand(B, K)
    return box[b, iy, ix] > 0


def unreverse(batch: Mapping[str, Any]) -> torch.Tensor:
    """The batch images with channel 0 = reference wherever ``batch["reversed"]`` is set."""
    image = batch["image"]
    rev = batch.get("reversed")
    if rev is None:
        return image
    rev = torch.as_tensor(rev, device=image.device).bool()
    if not bool(rev.any()):
        return image
    return torch.where(rev.view(-1, 1, 1, 1), image.flip(1), image)


class DetectionTask(NetTask):
    """Train a dense (CenterNet-style) transient detector.

    Parameters
    ----------
    net, optimizer, scheduler
        The network (or its ``{"_target_": "rtcnn.models.detector.DenseDetector", ...}``
        spec) and the optimizer / scheduler factories of :class:`rtcnn.tasks.base.NetTask`;
        by default AdamW (lr 2e-3, weight decay 1e-4) at a constant learning rate.
    threshold : float
        Score threshold of the metrics (and the default of the catalog command).
    match_radius : float
        A detection within this many px of a true transient is a match.
    heat_sigma : float
        Width (cells) of the splatted heat target.
    regress_radius : int
        Cells around a source where offsets, dmag and sign are trained.
    w_offset, w_dmag, w_sign : float
        Loss weights of the offset (px), dmag (mag) and sign terms.
    n_panels : int
        Tiles drawn in the TensorBoard figure ``val/panels`` each validation epoch
        (reference / new / difference with the brightest true change and the best
        detection; 0 = none). Tiles holding a change are drawn first.
    compile, channels_last, gpu_augment
        The speed switches of :mod:`rtcnn.tasks.base` (``gpu_augment="auto"``: D4 on the
        device when training on CUDA).
    """

    monitor = "val/f1"  # recall alone would reward false positives
    mode = "max"

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        match_radius: float = DEFAULT_MATCH_RADIUS,
        heat_sigma: float = HEAT_SIGMA,
        regress_radius: int = REGRESS_RADIUS,
        w_offset: float = 1.0,
        w_dmag: float = 0.1,
        w_sign: float = 0.1,
        n_panels: int = DEFAULT_PANELS,
        compile: bool = False,
        channels_last: bool = False,
        gpu_augment: bool | str = "auto",
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        if match_radius <= 0:
            raise ValueError(f"match_radius must be positive px, got {match_radius}")
        super().__init__(net, optimizer, scheduler, functools.partial(
            torch.optim.AdamW, lr=DEFAULT_LR, weight_decay=DEFAULT_WEIGHT_DECAY))
        self.stride = int(getattr(self.net, "stride"))
        base = detection_metrics(match_radius=match_radius)
        self.metrics = nn.ModuleDict({f"{s}_det": base.clone(prefix=f"{s}/") for s in STAGES})
        self.best = nn.ModuleDict({"f1": MaxMetric(), "within2px": MaxMetric()})
        self.n_panels = int(n_panels)
        for best in self.best.values():
            best.persistent(True)  # in checkpoints: a resumed run keeps its best so far

    def forward(self, images: torch.Tensor, sigma: torch.Tensor | None = None) -> dict:
        """``(B, 2, H, W)`` pairs -> the net's output dict (cell maps)."""
        return self.net(images, sigma)

    # ----------------------------------------------------------------- steps
    def _step(self, batch: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, dict]:
        image = unreverse(batch)
        out = self(image)
        hp = self.hparams
        bright = true_brightened(batch, image)
        targets = encode_targets(
            batch["xy"], batch["valid"], batch["dmag"], bright, tuple(image.shape[-2:]),
            stride=self.stride, heat_sigma=hp.heat_sigma, radius=hp.regress_radius,
        )  # fmt: skip
        losses = detector_loss(out, targets, hp.w_offset, hp.w_dmag, hp.w_sign)
        bs = image.shape[0]
        for name, value in losses.items():
            key = f"{stage}/loss" if name == "loss" else f"{stage}/loss_{name}"
            self.log(key, value, on_step=False, on_epoch=True, prog_bar=name == "loss",
                     batch_size=bs, sync_dist=True)  # fmt: skip
        with torch.no_grad():
            det = decode(out, threshold=hp.threshold, stride=self.stride)
            self.metrics[f"{stage}_det"].update(
                det, batch["xy"], batch["valid"], batch["dmag"], bright
            )
        return losses["loss"], {"image": image, "det": det}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")[0]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, out = self._step(batch, "val")
        if batch_idx == 0 and self.n_panels > 0:
            self._panel = self._panel_data(batch, out["image"], out["det"])

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def _panel_data(self, batch: Mapping[str, Any], image: torch.Tensor, det: dict) -> dict:
        """First ``n_panels`` tiles (with a change first): images, true and best positions."""
        size = image.shape[-1]
        has = batch["valid"].any(dim=1)
        order = torch.argsort((~has).int(), stable=True)[: self.n_panels]
        best = torch.full((image.shape[0], 2), float("nan"), device=image.device)
        for b in order.tolist():  # a handful of tiles, once per validation epoch
            mine = det["batch"] == b
            if mine.any():
                best[b] = det["xy"][mine][det["score"][mine].argmax()]
        panel = {"images": image[order].detach().float().cpu(),
                 "target": (batch["xy"][order, 0] / size).float().cpu(),
                 "pred": (best[order] / size).cpu()}  # fmt: skip
        if batch.get("snr") is not None:
            panel["snr"] = torch.as_tensor(batch["snr"])[order].cpu()
        return panel

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> dict:
        """Decoded sources of the batch (see :func:`rtcnn.models.detector.decode`)."""
        return decode(self(unreverse(batch)), threshold=self.hparams.threshold, stride=self.stride)

    # ---------------------------------------------------------- epoch ends
    def _log_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        values = self.metrics[f"{stage}_det"].compute()
        self.metrics[f"{stage}_det"].reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith(("/f1", "/loc_median")))
        return values

    def best_metrics(self) -> list:
        return list(self.best.values())

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val")
        if self.trainer.sanity_checking:
            return
        for name, best in self.best.items():
            if torch.isfinite(values[f"val/{name}"]):
                best(values[f"val/{name}"])
            self.log(f"val/{name}_best", best.compute())
        self._log_panels()
        self._panel = None

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
