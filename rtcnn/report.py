"""The localisation report of a trained model: predictions, metrics, robustness, figures.

Shared by the ``rtcnn.evaluate`` command (files on disk) and the ``rtcnn.train`` test
stage (:class:`ReportFigures`, figures in TensorBoard), so neither command holds logic
the other needs.

Flow: :func:`predict_split` runs a model over a dataloader of the data contract
(``batch["image"]`` (B, 2, n, n), ``batch["target"]`` (B, 2) = (x, y) / n, meta keys
``pair``, ``origin``, ``dmag_sel``, ``edge_dist``, ``mag``, ``snr``) under each D4 view
of :data:`rtcnn.augment.PAPER_VIEWS` and maps every prediction back to the original frame
with :func:`rtcnn.augment.invert_coords`; :func:`split_metrics`,
:func:`predictions_table`, :func:`robustness_table` and :func:`report_figures` turn the
result into numbers, astropy tables and matplotlib figures.

Positions follow the package convention (:mod:`rtcnn`): 0-based px, integer = pixel
centre, ``(x, y)``. The angle of an error ``pred - true`` is measured in the image frame:
degrees counter-clockwise from +x (right) towards +y (up, as plotted with
``origin='lower'``), in ``[0, 360)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import astropy.units as u
import numpy as np
import torch
from astropy.table import Table
from lightning.pytorch.callbacks import Callback
from matplotlib.figure import Figure

from rtcnn import plots
from rtcnn.augment import PAPER_VIEWS, apply_image, invert_coords
from rtcnn.metrics import DEFAULT_RADII, PixelDistance
from rtcnn.tiles import edge_distance

N_EXTREMES = 3  # best and worst tiles shown (paper fig. 4)
SNR_CUT = 10.0  # difference-image S/N of the "bright" subset reported separately
ANGLE_CONVENTION = (
    "angle of pred - true in the image frame: degrees counter-clockwise from +x (right) "
    "towards +y (up with origin='lower'), in [0, 360)"
)


@dataclass
class SplitPredictions:
    """Predictions of one split, one row per tile (numpy; positions in tile px).

    Attributes
    ----------
    pair : list of str
        Pair name of each tile.
    origin : (N, 2) int64
        Tile origin (x0, y0) in the full image, px.
    true_xy, pred_xy : (N, 2) float64
        True and predicted (x, y) in the tile, px (prediction of the original view).
    dmag, mag, snr, edge_dist : (N,) float64
        Magnitude change (mag), magnitude (mag), difference-image S/N and distance of
        the true position to the tile edge (px) of the selected transient; NaN if absent.
    dmag_pred : (N,) float64 or None
        Predicted magnitude change where the model predicts one (third output).
    views : tuple of str
        D4 views evaluated, ``views[0] == "identity"``.
    view_xy : (N, V, 2) float64
        Prediction of every view mapped back to the original frame, px.
    extremes : dict
        ``images`` (M, 2, n, n) float32 of the ``N_EXTREMES`` best then worst tiles and
        their row indices ``index`` (M,).
    """

    pair: list[str]
    origin: np.ndarray
    true_xy: np.ndarray
    pred_xy: np.ndarray
    dmag: np.ndarray
    mag: np.ndarray
    snr: np.ndarray
    edge_dist: np.ndarray
    dmag_pred: np.ndarray | None
    views: tuple[str, ...]
    view_xy: np.ndarray
    extremes: dict = field(default_factory=dict)

    @property
    def distance(self) -> np.ndarray:
        """(N,) px between prediction and truth (original view)."""
        return np.hypot(*(self.pred_xy - self.true_xy).T)

    @property
    def angle(self) -> np.ndarray:
        """(N,) degrees, error direction in the image frame (see module docstring)."""
        return plots.error_angle(self.true_xy, self.pred_xy)

    @property
    def view_distance(self) -> np.ndarray:
        """(N, V) px between each view's mapped-back prediction and the truth."""
        return np.linalg.norm(self.view_xy - self.true_xy[:, None, :], axis=-1)

    def __len__(self) -> int:
        return len(self.pair)


def _meta(batch: dict, key: str, n: int) -> np.ndarray:
    """Per-tile float meta ``batch[key]`` as (n,) float64, NaN when the batch lacks it."""
    value = batch.get(key)
    if value is None:
        return np.full(n, np.nan)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64).reshape(n)


def _take(batch: dict, keep: np.ndarray) -> dict:
    """Rows ``keep`` ((B,) bool) of every per-tile entry of a batch."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim and len(value) == len(keep):
            out[key] = value[torch.from_numpy(keep).to(value.device)]
        elif isinstance(value, (list, tuple)) and len(value) == len(keep):
            out[key] = [v for v, k in zip(value, keep) if k]
        else:
            out[key] = value
    return out


class _Extremes:
    """Keep the images of the ``k`` smallest and ``k`` largest distances seen so far."""

    def __init__(self, k: int):
        self.k = k
        self.index = np.zeros(0, dtype=np.int64)
        self.dist = np.zeros(0)
        self.images = None

    def add(self, images: np.ndarray, dist: np.ndarray, first_index: int) -> None:
        index = first_index + np.arange(len(dist))
        imgs = images if self.images is None else np.concatenate([self.images, images])
        index = np.concatenate([self.index, index])
        dist = np.concatenate([self.dist, dist])
        order = np.argsort(dist, kind="stable")
        keep = order if len(order) <= 2 * self.k else np.r_[order[: self.k], order[-self.k:]]
        self.images, self.index, self.dist = imgs[keep], index[keep], dist[keep]

    def result(self) -> dict:
        """Best ``k`` (ascending distance) then worst ``k`` (descending); fewer if N < 2k."""
        if self.images is None:
            return {"images": np.zeros((0, 2, 1, 1), np.float32), "index": self.index, "n_best": 0}
        order = np.argsort(self.dist, kind="stable")
        n_best = min(self.k, (len(order) + 1) // 2)
        sel = np.r_[order[:n_best], order[n_best:][::-1][: self.k]]
        return {"images": self.images[sel], "index": self.index[sel], "n_best": n_best}


@torch.inference_mode()
def predict_split(
    module: torch.nn.Module,
    loader,
    views: tuple[str, ...] = PAPER_VIEWS,
    device: str | torch.device = "cpu",
    n_extremes: int = N_EXTREMES,
    max_tiles: int | None = None,
) -> SplitPredictions:
    """Run ``module`` over ``loader`` under each view and collect per-tile results.

    Parameters
    ----------
    module : torch.nn.Module
        Maps images (B, 2, n, n) float32 to (B, 2) predicted (x, y) / n, or (B, >= 3)
        with the predicted magnitude change in column 2. Put in eval mode for the call
        and restored afterwards.
    loader : iterable of dict
        Batches of the data contract (module docstring).
    views : tuple of str
        D4 element names (:data:`rtcnn.augment.D4_NAMES`); the first must be
        ``"identity"`` (its prediction is the reported one).
    device : str or torch.device
        Where the forward passes run.
    n_extremes : int
        How many best and worst tiles keep their images (paper fig. 4).
    max_tiles : int or None
        Stop after this many tiles (None: the whole loader).

    Tiles whose target is not finite (no transient in the tile) are skipped.

    Returns
    -------
    SplitPredictions
    """
    if not views or views[0] != "identity":
        raise ValueError(f"views must start with 'identity', got {tuple(views)}")
    was_training = module.training
    module.eval()
    rows: dict[str, list] = {k: [] for k in ("pair", "origin", "true", "view", "dmag_pred",
                                             "dmag", "mag", "snr", "edge")}
    extremes = _Extremes(n_extremes)
    seen = 0
    try:
        for batch in loader:
            n = batch["image"].shape[-1]
            true_xy = batch["target"].detach().cpu().double().numpy() * n
            keep = np.isfinite(true_xy).all(axis=1)  # tiles without a transient: skipped
            if max_tiles is not None:
                keep &= np.cumsum(keep) <= max_tiles - seen
            if not keep.all():
                batch, true_xy = _take(batch, keep), true_xy[keep]
            b = len(true_xy)
            if b == 0:
                if max_tiles is not None and seen >= max_tiles:
                    break
                continue
            images = batch["image"].to(device=device, dtype=torch.float32)
            per_view = []
            for g in views:
                out = module(apply_image(images, g)).detach().double().cpu()
                if out.ndim != 2 or out.shape[1] < 2:
                    raise ValueError(f"model output must be (B, >=2), got {tuple(out.shape)}")
                per_view.append(invert_coords(out[:, :2].numpy() * n, g, n))
                if g == "identity":
                    rows["dmag_pred"].append(out[:, 2].numpy() if out.shape[1] > 2 else None)
            view_xy = np.stack(per_view, axis=1)
            rows["view"].append(view_xy)
            rows["true"].append(true_xy)
            rows["pair"].extend(batch.get("pair", ["?"] * b))
            origin = batch.get("origin", torch.zeros(b, 2, dtype=torch.int64))
            rows["origin"].append(np.asarray(torch.as_tensor(origin).cpu(), dtype=np.int64))
            for key, col in (("dmag_sel", "dmag"), ("mag", "mag"), ("snr", "snr"),
                             ("edge_dist", "edge")):
                rows[col].append(_meta(batch, key, b))
            dist = np.hypot(*(view_xy[:, 0] - true_xy).T)
            extremes.add(images.cpu().numpy().astype(np.float32), dist, seen)
            seen += b
            if max_tiles is not None and seen >= max_tiles:
                break
    finally:
        module.train(was_training)
    if seen == 0:
        raise ValueError("the dataloader yielded no tiles")
    view_xy = np.concatenate(rows["view"])
    true_xy = np.concatenate(rows["true"])
    edge = np.concatenate(rows["edge"])
    edge = np.where(np.isfinite(edge), edge, edge_distance(true_xy, n))
    dmag_pred = None if rows["dmag_pred"][0] is None else np.concatenate(rows["dmag_pred"])
    return SplitPredictions(
        pair=[str(p) for p in rows["pair"]],
        origin=np.concatenate(rows["origin"]),
        true_xy=true_xy,
        pred_xy=view_xy[:, 0].copy(),
        dmag=np.concatenate(rows["dmag"]),
        mag=np.concatenate(rows["mag"]),
        snr=np.concatenate(rows["snr"]),
        edge_dist=edge,
        dmag_pred=dmag_pred,
        views=tuple(views),
        view_xy=view_xy,
        extremes=extremes.result(),
    )


def split_metrics(pred: SplitPredictions, select: np.ndarray | None = None) -> dict:
    """The paper's numbers for one split (optionally a boolean row selection).

    Returns
    -------
    dict
        ``n_tiles``, ``n_pairs``; ``within1px``, ``within2px``, ``within5px`` (fractions, distance
        <= r, from :class:`rtcnn.metrics.PixelDistance` as in training); ``dist_mean``,
        ``dist_std`` (population), ``dist_median``, ``dist_max`` (px); with a predicted
        magnitude change also ``dmag_mae``, ``dmag_rmse``, ``dmag_bias`` (mag,
        predicted - true). Empty selections give NaN statistics and ``n_tiles`` 0.
    """
    sel = np.ones(len(pred), bool) if select is None else np.asarray(select, bool)
    metric = PixelDistance(radii=DEFAULT_RADII, scale=1.0)
    metric.update(torch.as_tensor(pred.pred_xy[sel]), torch.as_tensor(pred.true_xy[sel]))
    out = {k: float(v) for k, v in metric.compute().items()}
    out["n_tiles"] = int(sel.sum())
    out["n_pairs"] = len({p for p, k in zip(pred.pair, sel) if k})
    dist = pred.distance[sel]
    out["dist_median"] = float(np.median(dist)) if dist.size else float("nan")
    if pred.dmag_pred is not None:
        err = pred.dmag_pred[sel] - pred.dmag[sel]
        err = err[np.isfinite(err)]
        out["dmag_n"] = int(err.size)
        out["dmag_mae"] = float(np.mean(np.abs(err))) if err.size else float("nan")
        out["dmag_rmse"] = float(np.sqrt(np.mean(err**2))) if err.size else float("nan")
        out["dmag_bias"] = float(np.mean(err)) if err.size else float("nan")
    return out


def robustness_summary(pred: SplitPredictions) -> dict:
    """Per-tile median / std over views, summarised: medians of both, worst tile, counts."""
    d = pred.view_distance
    med, std = np.median(d, axis=1), np.std(d, axis=1)
    return {
        "views": list(pred.views),
        "n_tiles": len(pred),
        "median_of_median_px": float(np.median(med)),
        "median_of_std_px": float(np.median(std)),
        "max_median_px": float(np.max(med)),
        "all_views_within2px": float(np.mean(np.all(d <= 2.0, axis=1))),
    }


def _base_columns(pred: SplitPredictions) -> Table:
    t = Table()
    t["pair"] = np.asarray(pred.pair, dtype=str)
    t["x0"] = pred.origin[:, 0] * u.pix
    t["y0"] = pred.origin[:, 1] * u.pix
    t["x_true"] = pred.true_xy[:, 0] * u.pix
    t["y_true"] = pred.true_xy[:, 1] * u.pix
    return t


def predictions_table(pred: SplitPredictions, meta: dict | None = None) -> Table:
    """One row per tile: ids, true and predicted positions (tile and image px), errors.

    Columns: ``pair``, ``x0``, ``y0`` (tile origin, pix), ``x_true``, ``y_true``,
    ``x_pred``, ``y_pred`` (tile px), ``x_true_image`` ... ``y_pred_image`` (full-image px,
    0-based), ``distance`` (pix), ``angle`` (deg, image frame), ``dmag`` (true, mag),
    ``dmag_pred`` (mag, only where the model predicts it), ``mag`` (mag), ``edge_dist``
    (pix), ``snr``.
    """
    t = _base_columns(pred)
    t["x_pred"] = pred.pred_xy[:, 0] * u.pix
    t["y_pred"] = pred.pred_xy[:, 1] * u.pix
    for who, xy in (("true", pred.true_xy), ("pred", pred.pred_xy)):
        full = xy + pred.origin
        t[f"x_{who}_image"] = full[:, 0] * u.pix
        t[f"y_{who}_image"] = full[:, 1] * u.pix
    t["distance"] = pred.distance * u.pix
    t["angle"] = pred.angle * u.deg
    t["dmag"] = pred.dmag * u.mag
    if pred.dmag_pred is not None:
        t["dmag_pred"] = pred.dmag_pred * u.mag
    t["mag"] = pred.mag * u.mag
    t["edge_dist"] = pred.edge_dist * u.pix
    t["snr"] = pred.snr
    t.meta.update(meta or {})
    t.meta["pixel_convention"] = "0-based, integer = pixel centre; image = tile + (x0, y0)"
    t.meta["angle_convention"] = ANGLE_CONVENTION
    return t


def robustness_table(pred: SplitPredictions, meta: dict | None = None) -> Table:
    """One row per tile: distance of each view's mapped-back prediction, median and std.

    Columns: ``pair``, ``x0``, ``y0``, ``x_true``, ``y_true`` (pix), then per view
    ``x_<view>``, ``y_<view>`` (prediction mapped back to the original frame, tile px) and
    ``dist_<view>`` (pix), then ``dist_median`` and ``dist_std`` (population) over views.
    """
    t = _base_columns(pred)
    d = pred.view_distance
    for j, g in enumerate(pred.views):
        t[f"x_{g}"] = pred.view_xy[:, j, 0] * u.pix
        t[f"y_{g}"] = pred.view_xy[:, j, 1] * u.pix
        t[f"dist_{g}"] = d[:, j] * u.pix
    t["dist_median"] = np.median(d, axis=1) * u.pix
    t["dist_std"] = np.std(d, axis=1) * u.pix
    t.meta.update(meta or {})
    t.meta["views"] = list(pred.views)
    return t


def report_figures(pred: SplitPredictions) -> dict[str, Figure]:
    """The four report figures of a split, keyed by file stem.

    ``error_distribution`` (paper fig. 5), ``error_vs_dmag_edge`` (fig. 6),
    ``best_worst_tiles`` (fig. 4) and ``robustness`` (fig. 7; only with more than one view).
    """
    dist = pred.distance
    figs = {
        "error_distribution": plots.fig_error_distribution(dist, pred.angle),
        "error_vs_dmag_edge": plots.fig_error_vs_dmag_edge(dist, pred.dmag, pred.edge_dist),
    }
    ex = pred.extremes
    if len(ex.get("index", [])):
        idx = ex["index"]
        labels = [f"{pred.pair[i]}, tile origin ({pred.origin[i, 0]}, {pred.origin[i, 1]})"
                  for i in idx]
        figs["best_worst_tiles"] = plots.fig_best_worst_tiles(
            ex["images"], pred.true_xy[idx], pred.pred_xy[idx], dist[idx], labels, ex["n_best"]
        )
    if len(pred.views) > 1:
        d = pred.view_distance
        figs["robustness"] = plots.fig_robustness(
            np.median(d, axis=1), np.std(d, axis=1), len(pred.views)
        )
    return figs


class ReportFigures(Callback):
    """Log the report figures of the test split to TensorBoard at the end of ``test``.

    Re-runs the model over ``trainer.datamodule.test_dataloader()`` (all views of
    :data:`rtcnn.augment.PAPER_VIEWS`) on the global-zero process and adds each figure of
    :func:`report_figures` as ``report/<name>`` to every TensorBoard logger of the trainer.

    Parameters
    ----------
    max_tiles : int or None
        Evaluate at most this many test tiles (None: all).
    views : sequence of str
        D4 views for the robustness figure (first must be ``"identity"``).
    n_extremes : int
        Best and worst tiles drawn in ``report/best_worst_tiles``.
    """

    def __init__(self, max_tiles: int | None = None, views: tuple[str, ...] = PAPER_VIEWS,
                 n_extremes: int = N_EXTREMES):
        super().__init__()
        self.max_tiles = max_tiles
        self.views = tuple(views)
        self.n_extremes = int(n_extremes)

    def on_test_end(self, trainer, pl_module) -> None:
        from rtcnn.tasks.localization import LocalizationTask

        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        if not isinstance(pl_module, LocalizationTask):  # one position per tile models only
            return
        writers = [lg.experiment for lg in trainer.loggers
                   if hasattr(lg.experiment, "add_figure")]
        if not writers:
            return
        pred = predict_split(pl_module, trainer.datamodule.test_dataloader(), self.views,
                             device=pl_module.device, n_extremes=self.n_extremes,
                             max_tiles=self.max_tiles)
        for name, fig in report_figures(pred).items():
            for w in writers:
                w.add_figure(f"report/{name}", fig, global_step=trainer.global_step, close=False)


def jsonable(obj):
    """``obj`` with numpy scalars made plain and floats rounded to 7 significant digits
    (float32 metrics), NaN/inf as None: ready for :func:`json.dumps` (``metrics.json``)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(f"{obj:.7g}") if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
