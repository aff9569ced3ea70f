"""Lightning task for the ``autoencoder`` (the paper's appendix): reconstruct the transients.

:class:`ReconstructionTask` trains a network mapping ``(B, 2, n, n)`` tile pairs to a
``(B, 1, n, n)`` "transient only" image (:class:`rtcnn.models.autoencoder.PairAutoencoder`)
with the paper's MSE against a truth image: the Roman effective PSF (optics from the one
cached :func:`rtcnn.roman.get_psf`, convolved with the pixel) drawn on a blank tile at
every selected change of the tile (batch ``"xy"``), peak-normalised so that the tile's
brightest change peaks at 1 and every other one at its flux change relative to it
(``|dflux_k| / max |dflux|``, batch ``"dflux"``; :func:`rtcnn.models.autoencoder.render_points`).
The highest peak is then the brightest change, the one ``attn5`` is scored on.

It is a :class:`~rtcnn.tasks.localization.LocalizationTask`: ``forward`` returns the
``(B, 2)`` position of the reconstruction's highest peak in tile units
(:func:`rtcnn.models.autoencoder.peak_positions`), so it is scored with the same metrics
on the same tiles as ``attn5`` (``{stage}/within{1,2,5}px``, ``{stage}/loss`` = the MSE of
those positions in tile units, ``_snr10`` subsets) and ``python -m rtcnn.evaluate`` writes
the same report. The training objective, the reconstruction MSE, is logged as
``{stage}/recon_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from rtcnn.metrics import DEFAULT_RADII
from rtcnn.models.autoencoder import peak_positions, render_points
from rtcnn.tasks.localization import DEFAULT_SNR_THRESHOLD, LocalizationTask

DEFAULT_OVERSAMPLE = 4  # truth-kernel samples per native px
DEFAULT_PSF_BOX = 16  # native px, side of the truth kernel (the PSF core; wings are < 1e-3)

__all__ = ["ReconstructionTask", "truth_kernel"]


def truth_kernel(band: str = "H158", sca: int = 1, oversample: int = DEFAULT_OVERSAMPLE,
                 box: int = DEFAULT_PSF_BOX) -> np.ndarray:
    """The Roman effective PSF, oversampled and peak-normalised (the autoencoder's truth).

    Parameters
    ----------
    band : str
        Roman band (either spelling).
    sca : int
        Detector 1..18 (the PSF at its centre).
    oversample : int
        Samples per native 0.11" px.
    box : int
        Side of the kernel in native px.

    Returns
    -------
    (m, m) float32 array, ``m = box * oversample + 1`` (odd), centred at ``((m - 1) / 2,
    (m - 1) / 2)``: the optical PSF of :func:`rtcnn.roman.get_psf` convolved with the
    native pixel, sampled every ``1 / oversample`` px, divided by its maximum.
    """
    import galsim

    from rtcnn.roman import PIXEL_SCALE, get_psf

    m = int(box) * int(oversample) + 1
    eff = galsim.Convolve(get_psf(band, int(sca)), galsim.Pixel(PIXEL_SCALE))
    img = eff.drawImage(nx=m, ny=m, scale=PIXEL_SCALE / oversample, method="no_pixel").array
    return (img / img.max()).astype(np.float32)


class ReconstructionTask(LocalizationTask):
    """Train an encoder-bottleneck-decoder to draw the tile's transients (module docstring).

    Parameters
    ----------
    net : nn.Module or mapping
        ``(B, C, n, n) -> (B, 1, n, n)``, or its ``_target_`` spec.
    optimizer, scheduler : callable, optional
        As :class:`~rtcnn.tasks.localization.LocalizationTask` (default Adam, lr 1e-3).
    band, sca : str, int
        The Roman PSF of the truth images.
    oversample, psf_box : int
        The truth kernel (:func:`truth_kernel`).
    snr_threshold, radii, n_panels, compile, channels_last, gpu_augment
        As :class:`~rtcnn.tasks.localization.LocalizationTask`.
    """

    def __init__(
        self,
        net: nn.Module | Mapping[str, Any],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        band: str = "H158",
        sca: int = 1,
        oversample: int = DEFAULT_OVERSAMPLE,
        psf_box: int = DEFAULT_PSF_BOX,
        snr_threshold: float = DEFAULT_SNR_THRESHOLD,
        radii: Sequence[float] = DEFAULT_RADII,
        n_panels: int = 4,
        compile: bool = False,
        channels_last: bool = False,
        gpu_augment: bool | str = "auto",
    ):
        super().__init__(net, optimizer, scheduler, snr_threshold=snr_threshold, radii=radii,
                         n_panels=n_panels, compile=compile, channels_last=channels_last,
                         gpu_augment=gpu_augment)
        self.oversample = int(oversample)
        kernel = torch.as_tensor(truth_kernel(band, int(sca), self.oversample, int(psf_box)))
        self.register_buffer("kernel", kernel, persistent=False)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_recon_loss", MeanMetric())
        self._last_recon: torch.Tensor | None = None

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n, n)`` pairs -> ``(B, 1, n, n)`` transient-only images."""
        return self.net(x)

    def truth(self, xy: torch.Tensor, size: int,
              dflux: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 1, n, n)`` truth images of tile positions ``xy`` (B, K, 2) px (NaN = none).

        ``dflux`` (B, K): flux changes; each source's peak is ``|dflux| / max |dflux|`` of
        its tile (default: every peak 1).
        """
        weight = None
        if dflux is not None:
            mag = torch.nan_to_num(dflux.abs().to(self.kernel.dtype))
            weight = mag / mag.amax(dim=1, keepdim=True).clamp(min=1e-30)
        return render_points(xy, self.kernel, self.oversample, size, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, n, n)`` -> ``(B, 2)`` position of the highest reconstructed peak / n."""
        recon = self.reconstruct(x)
        self._last_recon = recon
        xy, _ = peak_positions(recon, k=1)
        return xy[:, 0] / float(x.shape[-1])

    def _step(self, batch: Mapping[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        _, pred = super()._step(batch, stage)  # positions, their metrics, {stage}/loss
        recon = self._last_recon
        self._last_recon = None
        truth = self.truth(batch["xy"], batch["image"].shape[-1], batch.get("dflux"))
        loss = F.mse_loss(recon.float(), truth)
        getattr(self, f"{stage}_recon_loss").update(loss.detach(), weight=recon.shape[0])
        return loss, pred

    def _log_recon(self, stage: str) -> None:
        metric = getattr(self, f"{stage}_recon_loss")
        if metric.update_count:
            self.log(f"{stage}/recon_loss", metric.compute())
        metric.reset()

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self._log_recon("train")

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_recon("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_recon("test")
