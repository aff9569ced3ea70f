"""Lightning task for ``stargal``: classify stamps as star (0) or galaxy (1).

:class:`ClassificationTask` wraps any ``nn.Module`` mapping ``(B, C, n, n)`` stamps to
``(B,)`` logits of "galaxy" and trains it with the binary cross-entropy. It logs per
stage and per epoch, from one :class:`torchmetrics.MetricCollection` cloned with the
``train/``, ``val/`` and ``test/`` prefixes:

* ``{stage}/loss`` (BCE), ``{stage}/accuracy``, ``{stage}/auroc``, ``{stage}/precision``,
  ``{stage}/recall``, ``{stage}/f1`` (galaxy = positive, threshold ``threshold``);
* for val and test, the same on the sources brighter than ``bright_mag`` (batch key
  ``"mag"``), postfixed ``_bright``, e.g. ``test/accuracy_bright``;
* ``val/auroc_best``, the best ``val/auroc`` so far (:attr:`monitor`).

Batches follow :mod:`rtcnn.data.stamps`: ``"image"`` (B, C, n, n) float32, ``"label"``
(B,) float32 0/1, optional ``"mag"`` (B,) AB.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from rtcnn.errors import RtcnnInputError
from rtcnn.tasks.base import NetTask

DEFAULT_LR = 1e-3  # Adam
DEFAULT_THRESHOLD = 0.5  # galaxy probability above which a stamp is called a galaxy
DEFAULT_BRIGHT_MAG = 23.0  # AB, the "bright" subset (the paper's 98 % regime)
STAGES = ("train", "val", "test")

__all__ = ["ClassificationTask", "classification_metrics"]


def classification_metrics(threshold: float = DEFAULT_THRESHOLD, prefix: str = "",
                           postfix: str | None = None) -> MetricCollection:
    """Binary accuracy, AUROC, precision, recall, F1 (positive = galaxy), one collection.

    Updated with ``(probabilities (B,), labels (B,) int)``.
    """
    return MetricCollection({
        "accuracy": BinaryAccuracy(threshold=threshold),
        "auroc": BinaryAUROC(),
        "precision": BinaryPrecision(threshold=threshold),
        "recall": BinaryRecall(threshold=threshold),
        "f1": BinaryF1Score(threshold=threshold),
    }, prefix=prefix, postfix=postfix)


class ClassificationTask(NetTask):
    """Train a binary star/galaxy classifier with BCE on its logits.

    Parameters
    ----------
    net : nn.Module or mapping
        The network (``(B, C, n, n) -> (B,)`` logits), or its ``_target_`` spec.
    optimizer, scheduler : callable, optional
        Factories (:class:`rtcnn.tasks.base.NetTask`); default Adam, lr 1e-3, constant.
    threshold : float
        Galaxy probability threshold of accuracy, precision, recall, F1.
    bright_mag : float
        AB magnitude of the ``_bright`` metric subset (sources brighter than this).
    compile, channels_last, gpu_augment
        The speed switches of :mod:`rtcnn.tasks.base`.
    """

    monitor = "val/auroc"
    mode = "max"

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        bright_mag: float = DEFAULT_BRIGHT_MAG,
        compile: bool = False,
        channels_last: bool = False,
        gpu_augment: bool | str = "auto",
    ):
        threshold, bright_mag = float(threshold), float(bright_mag)
        super().__init__(net, optimizer, scheduler,
                         functools.partial(torch.optim.Adam, lr=DEFAULT_LR))
        self.threshold = threshold
        self.bright_mag = bright_mag
        base = classification_metrics(threshold)
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", base.clone(prefix=f"{stage}/"))
            setattr(self, f"{stage}_loss", MeanMetric())
        for stage in ("val", "test"):
            setattr(self, f"{stage}_bright_metrics",
                    base.clone(prefix=f"{stage}/", postfix="_bright"))
        self.val_auroc_best = MaxMetric()
        self.val_auroc_best.persistent(True)

    def setup(self, stage: str) -> None:
        """Check that the network takes the data's channels (one line, not a traceback)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        want = getattr(dm, "n_channels", None)
        have = getattr(self.net, "config", {}).get("in_channels")
        if want is not None and have is not None and want != have:
            raise RtcnnInputError(
                "model.net.in_channels", f"is {have} but data.channels="
                f"{dm.hparams.channels!r} gives {want} channel(s); set model.net.in_channels={want}")
        super().setup(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n, n)`` stamps -> ``(B,)`` galaxy logits."""
        return self.net(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,)`` galaxy probabilities."""
        return torch.sigmoid(self(x).float())

    # ----------------------------------------------------------------- steps
    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        image, label = batch["image"], batch["label"].float()
        logit = self(image).float()
        loss = F.binary_cross_entropy_with_logits(logit, label)
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=image.shape[0])
        prob, target = torch.sigmoid(logit.detach()), label.detach().long()
        getattr(self, f"{stage}_metrics").update(prob, target)
        mag = batch.get("mag")
        if stage != "train" and mag is not None:
            keep = torch.as_tensor(mag, device=prob.device) < self.bright_mag
            if keep.any():
                getattr(self, f"{stage}_bright_metrics").update(prob[keep], target[keep])
        return loss

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        """``(B,)`` galaxy probabilities."""
        return self.predict_proba(batch["image"])

    # ---------------------------------------------------------- epoch ends
    def _log_metrics(self, key: str, stage: str | None = None) -> dict[str, torch.Tensor]:
        collection = getattr(self, f"{key}_metrics")
        values = {}
        if any(m.update_count for m in collection.values()):  # AUROC of nothing: skip
            values = collection.compute()
        collection.reset()
        if stage is not None:
            loss = getattr(self, f"{stage}_loss")
            values[f"{stage}/loss"] = loss.compute()
            loss.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name.endswith(("/accuracy", "/auroc", "/loss")))
        return values

    def best_metrics(self) -> list:
        return [self.val_auroc_best]

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train", "train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val", "val")
        self._log_metrics("val_bright")
        if not self.trainer.sanity_checking and "val/auroc" in values:
            if torch.isfinite(values["val/auroc"]):
                self.val_auroc_best(values["val/auroc"])
            self.log("val/auroc_best", self.val_auroc_best.compute())

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", "test")
        self._log_metrics("test_bright")
