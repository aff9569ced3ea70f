"""LightningModules: the loss, metrics and logging around a network (:mod:`rtcnn.models`)."""

from rtcnn.tasks.base import NetTask, augment_batch, build_net, build_task, net_spec, panel_figure
from rtcnn.tasks.classification import ClassificationTask
from rtcnn.tasks.detection import DetectionTask
from rtcnn.tasks.localization import LocalizationTask
from rtcnn.tasks.reconstruction import ReconstructionTask

__all__ = [
    "ClassificationTask",
    "DetectionTask",
    "LocalizationTask",
    "NetTask",
    "ReconstructionTask",
    "augment_batch",
    "build_net",
    "build_task",
    "net_spec",
    "panel_figure",
]
