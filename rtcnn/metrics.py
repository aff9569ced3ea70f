"""Localisation metrics in pixels (torchmetrics, DDP-safe).

:class:`PixelDistance` accumulates the Euclidean distance between predicted and true
positions, both given in tile units (position / tile size, the ``attn5`` target) and
converted to px with ``scale`` (px per unit: the tile side, or 1 for inputs in px; the
tasks pass px). It reports the paper's figures:
the fraction of tiles within 1, 2 and 5 px, and the mean, standard deviation and maximum
distance (px), plus the number of tiles. :func:`localization_metrics` wraps it in a
:class:`torchmetrics.MetricCollection` whose prefix (``train/``, ``val/``, ``test/``) and
optional postfix (e.g. ``_snr10``) give the logged names, e.g. ``val/within2px``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric, MetricCollection

from rtcnn.tiles import TILE_SIZE

__all__ = ["DEFAULT_MATCH_RADIUS", "DEFAULT_RADII", "DetectionMetrics", "PixelDistance",
           "detection_metrics", "localization_metrics", "match_detections"]

DEFAULT_RADII = (1.0, 2.0, 5.0)  # px, the paper's "within r pixels" thresholds


def _radius_name(radius: float) -> str:
    return f"within{radius:g}px".replace(".", "p")


class PixelDistance(Metric):
    """Distance statistics between predicted and true positions, in px.

    Parameters
    ----------
    radii : sequence of float
        Radii (px) for the "fraction within r px" figures; names ``within{r}px``.
    scale : float
        px per input unit: inputs are ``position / scale`` (tile units), default the tile
        size 64 px. Use 1.0 for inputs already in px.

    Notes
    -----
    ``update(preds, target)`` takes ``(B, 2)`` float tensors ``(x, y)``; rows with a
    non-finite target are skipped. ``compute()`` returns a dict of scalar tensors:
    ``within{r}px`` (fraction in [0, 1], distance <= r), ``dist_mean``, ``dist_std``
    (population) and ``dist_max`` (px), and ``n_tiles``; with no samples the fractions and
    distances are NaN.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, radii: Sequence[float] = DEFAULT_RADII, scale: float = TILE_SIZE, **kwargs):
        super().__init__(**kwargs)
        radii = [float(r) for r in radii]
        if not radii or any(r <= 0 for r in radii):
            raise ValueError(f"radii must be positive px values, got {radii}")
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.radii = radii
        self.scale = float(scale)
        dt = torch.float64
        self.add_state("count", torch.tensor(0.0, dtype=dt), dist_reduce_fx="sum")
        self.add_state("dist_sum", torch.tensor(0.0, dtype=dt), dist_reduce_fx="sum")
        self.add_state("dist_sq_sum", torch.tensor(0.0, dtype=dt), dist_reduce_fx="sum")
        self.add_state("dist_max", torch.tensor(0.0, dtype=dt), dist_reduce_fx="max")
        self.add_state("within", torch.zeros(len(radii), dtype=dt), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``preds``, ``target`` (B, 2) ``(x, y)`` in units of ``scale`` px."""
        if preds.shape != target.shape or preds.ndim != 2 or preds.shape[1] != 2:
            raise ValueError(
                f"preds and target must both be (B, 2), got {tuple(preds.shape)} "
                f"and {tuple(target.shape)}"
            )
        ok = torch.isfinite(target).all(dim=1)
        dist = (preds[ok].double() - target[ok].double()).norm(dim=1) * self.scale
        radii = torch.tensor(self.radii, dtype=dist.dtype, device=dist.device)
        self.count += dist.numel()
        self.dist_sum += dist.sum()
        self.dist_sq_sum += (dist**2).sum()
        if dist.numel():
            self.dist_max = torch.maximum(self.dist_max, dist.max())
        self.within += (dist[:, None] <= radii[None, :]).sum(dim=0).to(dist.dtype)

    def compute(self) -> dict[str, torch.Tensor]:
        """Return the statistics as a dict of float32 scalar tensors (see class Notes)."""
        n = self.count
        nan = torch.tensor(float("nan"), dtype=n.dtype, device=n.device)
        empty = n == 0
        mean = torch.where(empty, nan, self.dist_sum / n.clamp(min=1))
        var = (self.dist_sq_sum / n.clamp(min=1) - mean**2).clamp(min=0)
        out = {
            _radius_name(r): torch.where(empty, nan, self.within[i] / n.clamp(min=1))
            for i, r in enumerate(self.radii)
        }
        out["dist_mean"] = mean
        out["dist_std"] = torch.where(empty, nan, var.sqrt())
        out["dist_max"] = torch.where(empty, nan, self.dist_max)
        out["n_tiles"] = n
        return {k: v.float() for k, v in out.items()}


def localization_metrics(
    prefix: str = "",
    postfix: str | None = None,
    radii: Sequence[float] = DEFAULT_RADII,
    scale: float = TILE_SIZE,
) -> MetricCollection:
    """A :class:`MetricCollection` of :class:`PixelDistance` named ``{prefix}{stat}{postfix}``.

    ``localization_metrics("val/").compute()`` has keys ``val/within1px``, ``val/within2px``,
    ``val/within5px``, ``val/dist_mean``, ``val/dist_std``, ``val/dist_max``,
    ``val/n_tiles``; use ``.clone(prefix="test/")`` for the other stages.
    """
    return MetricCollection(
        {"dist": PixelDistance(radii=radii, scale=scale)}, prefix=prefix, postfix=postfix
    )


# ===================================================================================
# Detection metrics (the dense detector, ``rtcnn.tasks.detection``)
# ===================================================================================
DEFAULT_MATCH_RADIUS = 2.0  # px, a detection this close to a true transient is a match


def match_detections(
    det_batch: torch.Tensor,
    det_xy: torch.Tensor,
    true_xy: torch.Tensor,
    valid: torch.Tensor,
    radius: float = DEFAULT_MATCH_RADIUS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match detections to true sources tile by tile, nearest first, one-to-one.

    Parameters
    ----------
    det_batch : (N,) int64
        Tile index of each detection.
    det_xy : (N, 2) float
        Detected ``(x, y)`` px in the tile.
    true_xy : (B, K, 2) float
        True ``(x, y)`` px (NaN where padded).
    valid : (B, K) bool
        Which true entries are real.
    radius : float
        Maximum match distance in px.

    Returns
    -------
    true_idx : (M,) int64
        Flat index ``b * K + k`` of each matched true source.
    det_idx : (M,) int64
        Index into the detections of its match.
    dist : (M,) float
        Match distances in px.

    Notes
    -----
    Pairs within ``radius`` are taken in order of increasing distance, each true
    source and each detection at most once (greedy; on tiles with a few sources
    this equals the optimal assignment except in contrived cases).
    """
    B, K = valid.shape
    device = det_xy.device
    if det_xy.numel() == 0 or K == 0 or not bool(valid.any()):
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone(), torch.zeros(0, device=device)
    txy = true_xy.to(det_xy.dtype)[det_batch]  # (N, K, 2)
    d = (txy - det_xy[:, None, :]).norm(dim=-1)  # (N, K)
    d = torch.where(valid[det_batch] & torch.isfinite(d), d, torch.full_like(d, float("inf")))
    n_idx, k_idx = torch.nonzero(d <= radius, as_tuple=True)
    dist = d[n_idx, k_idx]
    order = torch.argsort(dist, stable=True)
    n_idx, k_idx, dist = n_idx[order], k_idx[order], dist[order]
    t_flat = det_batch[n_idx] * K + k_idx
    used_t, used_d = set(), set()
    keep = []
    for i, (t, n) in enumerate(zip(t_flat.tolist(), n_idx.tolist())):
        if t in used_t or n in used_d:
            continue
        used_t.add(t)
        used_d.add(n)
        keep.append(i)
    keep = torch.as_tensor(keep, dtype=torch.long, device=device)
    return t_flat[keep], n_idx[keep], dist[keep]


def _cat(state, like: torch.Tensor) -> torch.Tensor:
    """A ``cat`` state as one tensor (a list before synchronisation, a tensor after)."""
    if isinstance(state, torch.Tensor):
        return state
    return torch.cat(state) if state else like.new_zeros(0)


class DetectionMetrics(Metric):
    """Precision, recall, localisation and dmag error of detections in tiles.

    ``update(det, true_xy, valid, true_dmag, true_brightened)`` takes the dict of
    :func:`rtcnn.models.detector.decode` (``batch``, ``xy`` px, ``dmag`` mag,
    ``brightened``), the true ``(B, K, 2)`` px positions, ``(B, K)`` validity, ``(B, K)``
    dmag (mag, same convention as the detector's) and ``(B, K)`` brightened flags.
    ``compute()`` returns ``precision``, ``recall`` (completeness), ``f1``, ``loc_median`` and ``loc_mean`` (px, over matches),
    ``within0p5px`` (fraction of matches within 0.5 px), ``within2px`` (fraction of the
    true sources matched within 2 px: the recall at 2 px, comparable with the
    localisation models' ``within2px``), ``dmag_mae`` (median absolute
    dmag error in mag over matches with a finite true dmag), ``sign_acc`` (fraction of
    matches whose brightened flag is right), ``n_true`` and ``n_pred``; NaN where
    undefined.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, match_radius: float = DEFAULT_MATCH_RADIUS, **kwargs):
        super().__init__(**kwargs)
        if match_radius <= 0:
            raise ValueError(f"match_radius must be positive px, got {match_radius}")
        self.match_radius = float(match_radius)
        dt = torch.float64
        for name in ("n_true", "n_pred", "n_match", "sign_ok"):
            self.add_state(name, torch.tensor(0.0, dtype=dt), dist_reduce_fx="sum")
        self.add_state("dist", [], dist_reduce_fx="cat")
        self.add_state("dmag_err", [], dist_reduce_fx="cat")

    def update(
        self,
        det: dict[str, torch.Tensor],
        true_xy: torch.Tensor,
        valid: torch.Tensor,
        true_dmag: torch.Tensor,
        true_brightened: torch.Tensor,
    ) -> None:
        """Add a batch of tiles (see the class docstring for the arguments)."""
        valid = valid.bool() & torch.isfinite(true_xy).all(-1)
        t_idx, d_idx, dist = match_detections(
            det["batch"], det["xy"].float(), true_xy.float(), valid, self.match_radius
        )
        self.n_true += valid.sum()
        self.n_pred += det["batch"].numel()
        self.n_match += dist.numel()
        self.dist.append(dist.double())
        tdm = true_dmag.flatten()[t_idx].double()
        pdm = det["dmag"][d_idx].double()
        ok = torch.isfinite(tdm)
        self.dmag_err.append((pdm[ok] - tdm[ok]).abs())
        bright = true_brightened.flatten()[t_idx].bool()
        self.sign_ok += (det["brightened"][d_idx] == bright).sum()

    def compute(self) -> dict[str, torch.Tensor]:
        """The statistics as float32 scalar tensors (see the class docstring)."""
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.n_true.device)

        def ratio(a, b):
            return torch.where(b > 0, a / b.clamp(min=1), nan)

        dist, dmag_err = _cat(self.dist, nan), _cat(self.dmag_err, nan)
        precision = ratio(self.n_match, self.n_pred)
        recall = ratio(self.n_match, self.n_true)
        out = {
            "precision": precision,
            "recall": recall,
            "f1": ratio(2 * self.n_match, self.n_pred + self.n_true),
            "loc_median": dist.quantile(0.5) if dist.numel() else nan,
            "loc_mean": dist.mean() if dist.numel() else nan,
            "within0p5px": (dist <= 0.5).double().mean() if dist.numel() else nan,
            "within2px": ratio((dist <= 2.0).double().sum(), self.n_true),
            "dmag_mae": dmag_err.quantile(0.5) if dmag_err.numel() else nan,
            "sign_acc": ratio(self.sign_ok, self.n_match),
            "n_true": self.n_true,
            "n_pred": self.n_pred,
        }
        return {k: v.float() for k, v in out.items()}


def detection_metrics(
    prefix: str = "", match_radius: float = DEFAULT_MATCH_RADIUS
) -> MetricCollection:
    """A :class:`MetricCollection` of :class:`DetectionMetrics` named ``{prefix}{stat}``.

    ``detection_metrics("val/").compute()`` has ``val/precision``, ``val/recall``,
    ``val/f1``, ``val/loc_median``, ... (see :class:`DetectionMetrics`).
    """
    return MetricCollection({"det": DetectionMetrics(match_radius=match_radius)}, prefix=prefix)
