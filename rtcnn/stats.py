"""Statistical constants shared by the networks (:mod:`rtcnn.models`) and the numpy stages.

A leaf module (no imports): :mod:`rtcnn.models` may not import the pipeline stages and the
stages should not import torch, so a constant both need lives here.
"""

from __future__ import annotations

__all__ = ["MAD_TO_SIGMA", "MIN_SIGMA"]

#: Gaussian sigma per median absolute deviation: 1 / Phi^-1(3/4) = 1.482602..., rounded
#: to the 4 decimals every rtcnn noise estimate has used (the tuned thresholds assume it).
MAD_TO_SIGMA = 1.4826
#: e-/s, floor of a pair's noise estimate (blank or constant images or tiles), so that
#: the network's input normalisation never divides by zero.
MIN_SIGMA = 1e-6
