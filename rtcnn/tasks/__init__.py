"""LightningModules: the loss, metrics and logging around a network (:mod:`rtcnn.models`)."""

from rtcnn.tasks.localization import LocalizationTask, panel_figure

__all__ = ["LocalizationTask", "panel_figure"]
