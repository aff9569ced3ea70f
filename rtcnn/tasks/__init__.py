"""LightningModules: the loss, metrics and logging around a network (:mod:`rtcnn.models`)."""

from rtcnn.tasks.base import NetTask, augment_batch, panel_figure
from rtcnn.tasks.localization import LocalizationTask

__all__ = ["LocalizationTask", "NetTask", "augment_batch", "panel_figure"]
