"""The star/galaxy classifier's report: confusion matrix, ROC, accuracy per magnitude, SHAP.

Used by ``python -m rtcnn.evaluate ckpt_path=<a model=stargal checkpoint>`` (which
dispatches here for a :class:`rtcnn.tasks.classification.ClassificationTask`). Files in
the new evaluation directory:

* ``metrics.json`` -- per split: stamps, accuracy, AUROC, the confusion matrix, and the
  same for the bright subsets (AB < ``bright_mag``; aperture S/N >= ``bright_snr``);
* ``accuracy_vs_mag.ecsv`` and ``accuracy_vs_mag.png`` -- accuracy (with its binomial
  error) and AUROC per magnitude bin, from the brightest sources to past the detection
  limit, where they must fall to chance;
* ``confusion_matrix.png``, ``roc.png`` (with the AUC);
* ``learning_curves.png`` -- accuracy and loss per epoch (train, val) read from the
  training run's TensorBoard logs (``<run>/tensorboard``), when there are any;
* ``predictions.ecsv`` -- one row per stamp (pair, id, position, label, galaxy
  probability, magnitude, S/N);
* ``worst_stamps.png`` and ``worst/`` -- the ``n_worst`` most confidently wrong stamps;
  for each, ``worst/rank<k>_<pair>_<id>.png``: the stamp next to its SHAP explanation
  (``shap.GradientExplainer``: expected gradients of the galaxy probability, pixel by
  pixel, against a background of ``SHAP_BACKGROUND`` test stamps). SHAP is an optional
  extra (``pip install -e '.[explain]'``); without it the rest is written and one log line
  says that the SHAP panels were skipped.

Accuracy and loss curves per epoch are the training run's TensorBoard scalars
(``train/accuracy``, ``val/accuracy``, ``train/loss``, ``val/loss``: ``tensorboard
--logdir <run>/tensorboard``), drawn again in ``learning_curves.png``.

Labels: 0 = star, 1 = galaxy (:data:`rtcnn.data.stamps.CLASSES`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table
from astropy.visualization import simple_norm
from matplotlib.figure import Figure
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_confusion_matrix,
    binary_roc,
)

from rtcnn.catalog import atomic_write
from rtcnn.data.stamps import CLASSES
from rtcnn.errors import RtcnnInputError
from rtcnn.plots import save_figure
from rtcnn.report import jsonable

log = logging.getLogger(__name__)

MAG_BINS = tuple(np.arange(18.0, 28.01, 1.0))  # AB bin edges of the accuracy-vs-magnitude table
BRIGHT_MAG = 23.0  # AB: the paper's "relatively bright objects" subset (issue 19 target)
BRIGHT_SNR = 50.0  # aperture S/N of the other bright subset
N_WORST = 8  # most confidently wrong stamps explained
SHAP_BACKGROUND = 64  # test stamps forming the SHAP reference distribution
SHAP_SAMPLES = 200  # expected-gradient samples per explained stamp

__all__ = ["StampPredictions", "accuracy_table", "explain_shap", "fig_accuracy_vs_mag",
           "fig_confusion", "fig_learning_curves", "fig_roc", "learning_curves",
           "predict_stamps", "summary", "write_classification_report"]


@dataclass
class StampPredictions:
    """One row per stamp (numpy). ``prob`` is the galaxy probability; ``label`` 0/1."""

    pair: list
    id: list
    origin: np.ndarray  # (N, 2) int64 stamp origin (x0, y0), px
    xy: np.ndarray  # (N, 2) float source position in the stamp, px
    label: np.ndarray  # (N,) int64
    prob: np.ndarray  # (N,) float64
    mag: np.ndarray  # (N,) float64 AB
    snr: np.ndarray  # (N,) float64 aperture S/N
    sample: np.ndarray  # (M, C, n, n) float32 stamps for the SHAP background (first M)
    worst: dict  # "images" (K, C, n, n), "index" (K,) rows, most confidently wrong first

    @property
    def pred(self) -> np.ndarray:
        return (self.prob >= 0.5).astype(np.int64)

    @property
    def correct(self) -> np.ndarray:
        return self.pred == self.label


@torch.inference_mode()
def predict_stamps(module: torch.nn.Module, loader, device: str | torch.device = "cpu",
                   n_worst: int = N_WORST, n_sample: int = SHAP_BACKGROUND,
                   max_stamps: int | None = None) -> StampPredictions:
    """Run a classifier (stamps -> galaxy logits ``(B,)``) over a stamp loader.

    Keeps the ``n_worst`` stamps with the largest ``|prob - label|`` (the most
    confidently wrong) and the first ``n_sample`` stamps (SHAP background).
    """
    was_training = module.training
    module.eval()
    cols: dict[str, list] = {k: [] for k in ("pair", "id", "origin", "xy", "label", "prob",
                                             "mag", "snr")}
    worst_img, worst_err, worst_idx, sample = None, np.zeros(0), np.zeros(0, np.int64), []
    seen = 0
    try:
        for batch in loader:
            images = batch["image"].to(device=device, dtype=torch.float32)
            b = images.shape[0]
            if max_stamps is not None:
                b = min(b, max_stamps - seen)
                images = images[:b]
            prob = torch.sigmoid(module(images).float()).cpu().double().numpy()
            label = batch["label"][:b].cpu().numpy().astype(np.int64)
            cols["prob"].append(prob)
            cols["label"].append(label)
            for key in ("origin", "xy", "mag", "snr"):
                cols[key].append(np.asarray(batch[key][:b].cpu().numpy()))
            cols["pair"].extend(list(batch["pair"][:b]))
            cols["id"].extend(list(batch["id"][:b]))
            imgs = images.cpu().numpy()
            if sum(len(s) for s in sample) < n_sample:
                sample.append(imgs[: n_sample - sum(len(s) for s in sample)])
            err = np.abs(prob - label)
            if n_worst > 0:
                worst_img = imgs if worst_img is None else np.concatenate([worst_img, imgs])
                worst_err = np.concatenate([worst_err, err])
                worst_idx = np.concatenate([worst_idx, seen + np.arange(b)])
                keep = np.argsort(-worst_err, kind="stable")[:n_worst]
                worst_img, worst_err, worst_idx = worst_img[keep], worst_err[keep], worst_idx[keep]
            seen += b
            if max_stamps is not None and seen >= max_stamps:
                break
    finally:
        module.train(was_training)
    if seen == 0:
        raise ValueError("the dataloader yielded no stamps")
    return StampPredictions(
        pair=[str(p) for p in cols["pair"]], id=[str(i) for i in cols["id"]],
        origin=np.concatenate(cols["origin"]).astype(np.int64),
        xy=np.concatenate(cols["xy"]).astype(np.float64),
        label=np.concatenate(cols["label"]), prob=np.concatenate(cols["prob"]),
        mag=np.concatenate(cols["mag"]).astype(np.float64),
        snr=np.concatenate(cols["snr"]).astype(np.float64),
        sample=np.concatenate(sample) if sample else np.zeros((0,)),
        worst={"images": worst_img if worst_img is not None else np.zeros((0,)),
               "index": worst_idx})


def _auroc(prob: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    if len(label) == 0 or label.min() == label.max():
        return float("nan")
    return float(binary_auroc(torch.as_tensor(prob), torch.as_tensor(label)))


def _subset(pred: StampPredictions, select: np.ndarray) -> dict:
    label, prob = pred.label[select], pred.prob[select]
    n = int(select.sum())
    out = {"n_stamps": n, "n_star": int((label == 0).sum()), "n_galaxy": int((label == 1).sum()),
           "accuracy": float(pred.correct[select].mean()) if n else float("nan"),
           "auroc": _auroc(prob, label)}
    if n:
        cm = binary_confusion_matrix(torch.as_tensor(prob), torch.as_tensor(label))
        out["confusion"] = {"rows_true_cols_pred": list(CLASSES), "counts": cm.tolist()}
    return out


def summary(pred: StampPredictions, bright_mag: float = BRIGHT_MAG,
            bright_snr: float = BRIGHT_SNR) -> dict:
    """Accuracy, AUROC and confusion matrix of all stamps and of the bright subsets."""
    every = np.ones(len(pred.label), bool)
    with np.errstate(invalid="ignore"):
        return {"all": _subset(pred, every),
                f"mag_lt_{bright_mag:g}": _subset(pred, pred.mag < bright_mag),
                f"snr_ge_{bright_snr:g}": _subset(pred, pred.snr >= bright_snr)}


def accuracy_table(pred: StampPredictions, bins=MAG_BINS, meta: dict | None = None) -> Table:
    """Accuracy and AUROC per AB magnitude bin (astropy Table, one row per bin).

    Columns: ``mag_lo``, ``mag_hi`` (mag), ``n``, ``n_star``, ``n_galaxy``,
    ``accuracy``, ``accuracy_err`` (binomial ``sqrt(p (1 - p) / n)``), ``auroc`` (NaN with
    one class), ``median_snr``.
    """
    bins = np.asarray(bins, dtype=float)
    rows = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        with np.errstate(invalid="ignore"):
            sel = (pred.mag >= lo) & (pred.mag < hi)
        n = int(sel.sum())
        acc = float(pred.correct[sel].mean()) if n else np.nan
        rows.append((lo, hi, n, int((pred.label[sel] == 0).sum()),
                     int((pred.label[sel] == 1).sum()), acc,
                     float(np.sqrt(acc * (1 - acc) / n)) if n else np.nan,
                     _auroc(pred.prob[sel], pred.label[sel]),
                     float(np.nanmedian(pred.snr[sel])) if n else np.nan))
    t = Table(rows=rows, names=("mag_lo", "mag_hi", "n", "n_star", "n_galaxy", "accuracy",
                                "accuracy_err", "auroc", "median_snr"))
    t["mag_lo"].unit = t["mag_hi"].unit = "mag"
    t["median_snr"].description = "median aperture S/N on the reference image"
    t.meta.update(meta or {})
    return t


# ------------------------------------------------------------------------------- figures
def fig_confusion(pred: StampPredictions, title: str = "") -> Figure:
    """2 x 2 confusion matrix (rows true, columns predicted): counts and row fractions."""
    cm = binary_confusion_matrix(torch.as_tensor(pred.prob), torch.as_tensor(pred.label)).numpy()
    frac = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(4.2, 3.6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cm[i, j]}\n{frac[i, j]:.1%}", ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks([0, 1], [f"pred {c}" for c in CLASSES])
    ax.set_yticks([0, 1], [f"true {c}" for c in CLASSES])
    fig.colorbar(im, ax=ax, label="fraction of true class")
    ax.set_title(title or f"confusion matrix ({len(pred.label)} stamps)", fontsize=9)
    return fig


def fig_roc(pred: StampPredictions, bright_mag: float = BRIGHT_MAG) -> Figure:
    """ROC curves (galaxy = positive) of all stamps and of those brighter than ``bright_mag``."""
    fig = Figure(figsize=(4.5, 4.2), layout="constrained")
    ax = fig.subplots()
    with np.errstate(invalid="ignore"):
        subsets = (("all", np.ones(len(pred.label), bool)),
                   (f"AB < {bright_mag:g}", pred.mag < bright_mag))
    for name, sel in subsets:
        p, y = pred.prob[sel], pred.label[sel]
        if len(y) == 0 or y.min() == y.max():
            continue
        fpr, tpr, _ = binary_roc(torch.as_tensor(p), torch.as_tensor(y))
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name}: AUC = {_auroc(p, y):.4f} (n={len(y)})")
    ax.plot([0, 1], [0, 1], ":", color="gray", lw=0.8)
    ax.set_xlabel("false positive rate (stars called galaxies)")
    ax.set_ylabel("true positive rate (galaxies found)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("ROC, galaxy = positive", fontsize=9)
    return fig


def fig_accuracy_vs_mag(table: Table, bright_mag: float = BRIGHT_MAG,
                        target: float = 0.98) -> Figure:
    """Accuracy (with binomial errors) and AUROC per magnitude bin; counts below."""
    mid = 0.5 * (np.asarray(table["mag_lo"]) + np.asarray(table["mag_hi"]))
    fig = Figure(figsize=(6.0, 5.0), layout="constrained")
    ax, axn = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    acc, err = np.asarray(table["accuracy"], float), np.asarray(table["accuracy_err"], float)
    both = (np.asarray(table["n_star"]) > 0) & (np.asarray(table["n_galaxy"]) > 0)
    ax.errorbar(mid[both], acc[both], yerr=err[both], fmt="o-", label="accuracy")
    if (~both).any():  # one class only: the accuracy measures the class prior, not the model
        ax.errorbar(mid[~both], acc[~both], yerr=err[~both], fmt="o", mfc="none", color="C0",
                    label="accuracy, one class only")
    ax.plot(mid, table["auroc"], "s--", label="AUROC")
    ax.axhline(target, color="green", lw=0.8, ls=":", label=f"{target:.0%}")
    ax.axhline(0.5, color="gray", lw=0.8, ls=":")
    ax.axvline(bright_mag, color="k", lw=0.6, ls="--")
    ax.set_ylabel("accuracy / AUROC")
    ax.set_ylim(0.4, 1.01)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("star/galaxy classification vs AB magnitude", fontsize=9)
    width = np.asarray(table["mag_hi"]) - np.asarray(table["mag_lo"])
    axn.bar(mid, table["n_star"], width=0.9 * width, label="stars")
    axn.bar(mid, table["n_galaxy"], width=0.9 * width, bottom=table["n_star"], label="galaxies")
    axn.set_xlabel("AB magnitude (reference image)")
    axn.set_ylabel("stamps")
    axn.legend(fontsize=7)
    return fig


def _show(ax, img: np.ndarray, title: str) -> None:
    ax.imshow(img, origin="lower", cmap="gray", interpolation="nearest",
              norm=simple_norm(img, "asinh", percent=99.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)


def _stamp_title(pred: StampPredictions, row: int) -> str:
    return (f"{pred.pair[row]} #{pred.id[row]}\ntrue {CLASSES[pred.label[row]]}, "
            f"p(galaxy)={pred.prob[row]:.3f}\nAB {pred.mag[row]:.2f}, S/N {pred.snr[row]:.0f}")


def fig_worst_stamps(pred: StampPredictions) -> Figure:
    """Gallery of the most confidently wrong stamps (first channel)."""
    images, index = pred.worst["images"], pred.worst["index"]
    k = len(index)
    ncol = min(4, max(k, 1))
    nrow = max(1, -(-k // ncol))
    fig = Figure(figsize=(2.2 * ncol, 2.5 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax in axes:
        ax.axis("off")
    for i in range(k):
        axes[i].axis("on")
        _show(axes[i], images[i, 0], _stamp_title(pred, int(index[i])))
    fig.suptitle("most confidently misclassified stamps", fontsize=9)
    return fig


def learning_curves(tb_dir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``tag -> (epochs, values)`` of the accuracy and loss curves of a run's TensorBoard logs.

    Tags ``{train,val}/{accuracy,loss}``; the epoch of each value is the run's ``epoch``
    scalar at the same step. Empty when the folder holds no event file.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not Path(tb_dir).is_dir() or not any(Path(tb_dir).glob("events.out.tfevents.*")):
        return {}
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0}).Reload()
    tags = set(acc.Tags().get("scalars", []))
    epoch_of = {e.step: e.value for e in acc.Scalars("epoch")} if "epoch" in tags else {}
    out = {}
    for tag in ("train/accuracy", "val/accuracy", "train/loss", "val/loss"):
        if tag in tags:
            ev = acc.Scalars(tag)
            out[tag] = (np.array([epoch_of.get(e.step, e.step) for e in ev], float),
                        np.array([e.value for e in ev], float))
    return out


def fig_learning_curves(curves: dict) -> Figure:
    """Accuracy and loss per epoch, train and val (from :func:`learning_curves`)."""
    fig = Figure(figsize=(8.0, 3.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, what in zip(axes, ("accuracy", "loss")):
        for stage in ("train", "val"):
            if f"{stage}/{what}" in curves:
                x, y = curves[f"{stage}/{what}"]
                ax.plot(x, y, "o-", ms=3, label=stage)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle("training curves (the run's TensorBoard scalars)", fontsize=9)
    return fig


def fig_shap_panel(image: np.ndarray, values: np.ndarray, title: str) -> Figure:
    """A stamp (first channel) next to its SHAP map (per channel, red = towards galaxy)."""
    c = values.shape[0]
    fig = Figure(figsize=(2.4 * (1 + c), 2.7), layout="constrained")
    axes = fig.subplots(1, 1 + c)
    _show(axes[0], image[0], title)
    vmax = float(np.abs(values).max()) or 1.0
    for j in range(c):
        im = axes[1 + j].imshow(values[j], origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                                interpolation="nearest")
        axes[1 + j].contour(image[j], levels=4, colors="k", linewidths=0.4, origin="lower")
        axes[1 + j].set_xticks([])
        axes[1 + j].set_yticks([])
        axes[1 + j].set_title(f"SHAP, channel {j}\n(red: towards galaxy)", fontsize=7)
    fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
    return fig


# --------------------------------------------------------------------------------- SHAP
class _Probability(torch.nn.Module):
    """``(B, C, n, n) -> (B, 1)`` galaxy probability (the output SHAP explains)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x).float())[:, None]


def explain_shap(module: torch.nn.Module, images: np.ndarray, background: np.ndarray,
                 n_samples: int = SHAP_SAMPLES, seed: int = 0) -> np.ndarray | None:
    """SHAP values of the galaxy probability for ``images`` (expected gradients).

    Parameters
    ----------
    module : torch.nn.Module
        Stamps ``(B, C, n, n)`` -> galaxy logits ``(B,)``.
    images, background : (K, C, n, n), (M, C, n, n) float32 arrays
        Stamps to explain and the reference distribution.

    Returns
    -------
    (K, C, n, n) float64 array of per-pixel contributions to the galaxy probability, or
    None when the ``shap`` package is not installed.
    """
    try:
        import shap
    except ImportError:
        return None
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    try:
        with torch.inference_mode(False), torch.enable_grad():
            explainer = shap.GradientExplainer(
                _Probability(module), torch.as_tensor(background, device=device))
            values = explainer.shap_values(torch.as_tensor(images, device=device),
                                           nsamples=n_samples, rseed=seed)
    finally:
        module.train(was_training)
    values = np.asarray(values[0] if isinstance(values, list) else values, dtype=np.float64)
    if values.ndim == images.ndim + 1:  # (K, C, n, n, outputs)
        values = values[..., 0]
    return values.reshape(images.shape)


# ------------------------------------------------------------------------------- writing
def predictions_table(pred: StampPredictions, meta: dict | None = None) -> Table:
    """One row per stamp: pair, id, x0, y0, x, y (px in the stamp), label, prob, mag, snr."""
    t = Table({"pair": pred.pair, "id": pred.id, "x0": pred.origin[:, 0],
               "y0": pred.origin[:, 1], "x": pred.xy[:, 0], "y": pred.xy[:, 1],
               "label": pred.label, "class": [CLASSES[i] for i in pred.label],
               "prob_galaxy": pred.prob, "correct": pred.correct, "mag": pred.mag,
               "snr": pred.snr})
    for col, unit in (("x0", "pix"), ("y0", "pix"), ("x", "pix"), ("y", "pix"), ("mag", "mag")):
        t[col].unit = unit
    t.meta.update(meta or {})
    return t


def _write(path: Path, writer) -> None:
    atomic_write(path, False, writer)


def write_classification_report(module: torch.nn.Module, datamodule, out_dir, splits=("test",),
                                device: str = "cpu", meta: dict | None = None,
                                max_stamps: int | None = None, n_worst: int = N_WORST,
                                bright_mag: float = BRIGHT_MAG) -> dict:
    """Evaluate a stamp classifier and write the report files (module docstring).

    Splits without stamps (e.g. ``val`` of a ``data.split=test`` set) are left out; the
    last non-empty split gets the tables and figures.

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    out = Path(out_dir)
    if (out / "metrics.json").exists():
        raise RtcnnInputError(out, "already holds an evaluation (metrics.json)")
    out.mkdir(parents=True, exist_ok=True)
    module = module.to(device)
    result: dict = {**(meta or {}), "splits": {}}
    datamodule.setup("test")
    preds = {}
    for split in splits:
        if len(datamodule.datasets[split]) == 0:
            log.info("split %s has no stamps: left out", split)
            continue
        loader = getattr(datamodule, f"{split}_dataloader")()
        preds[split] = predict_stamps(module, loader, device, n_worst=n_worst,
                                      max_stamps=max_stamps)
        result["splits"][split] = summary(preds[split], bright_mag)
    if not preds:
        raise RtcnnInputError(datamodule.source, f"no stamps in the splits {list(splits)}")
    split = list(preds)[-1]
    pred = preds[split]
    tmeta = {**(meta or {}), "split": split}
    table = accuracy_table(pred, meta=tmeta)
    result["accuracy_vs_mag"] = {k: table[k].tolist() for k in table.colnames}
    for name, t in (("accuracy_vs_mag", table), ("predictions", predictions_table(pred, tmeta))):
        _write(out / f"{name}.ecsv", lambda tmp, t=t: t.write(tmp, format="ascii.ecsv"))
    figs = {"confusion_matrix": fig_confusion(pred), "roc": fig_roc(pred, bright_mag),
            "accuracy_vs_mag": fig_accuracy_vs_mag(table, bright_mag)}
    if len(pred.worst["index"]):
        figs["worst_stamps"] = fig_worst_stamps(pred)
    curves = learning_curves(Path(str((meta or {}).get("run_dir", ""))) / "tensorboard")
    if curves:
        figs["learning_curves"] = fig_learning_curves(curves)
    for name, fig in figs.items():
        save_figure(fig, out / f"{name}.png")
    result["shap"] = _write_shap(module, pred, out / "worst")
    _write(out / "metrics.json", lambda tmp: Path(tmp).write_text(
        json.dumps(jsonable(result), indent=2)))
    return result


def _write_shap(module, pred: StampPredictions, folder: Path) -> str:
    """SHAP panels of the worst stamps in ``folder``; returns what was done (one line)."""
    images = pred.worst["images"]
    if len(pred.worst["index"]) == 0:
        return "no misclassified stamps to explain"
    values = explain_shap(module, images, pred.sample)
    if values is None:
        msg = ("SHAP panels skipped: the shap package is not installed "
               "(pip install -e '.[explain]')")
        log.warning(msg)
        return msg
    folder.mkdir(exist_ok=True)
    for k, row in enumerate(pred.worst["index"].tolist()):
        name = f"rank{k + 1:02d}_{pred.pair[row]}_{pred.id[row]}".replace("/", "_")
        save_figure(fig_shap_panel(images[k], values[k], _stamp_title(pred, row)),
                    folder / f"{name}.png")
        np.save(folder / f"{name}_stamp.npy", images[k])
    return f"{len(values)} SHAP panels in {folder.name}/"


def metric_lines(result: dict) -> list[str]:
    """One human-readable line per split and subset of a ``metrics.json`` dict."""
    lines = []
    for split, subsets in result["splits"].items():
        for name, m in subsets.items():
            lines.append(f"{split} {name}: n={m['n_stamps']} ({m['n_star']} stars, "
                         f"{m['n_galaxy']} galaxies) accuracy={m['accuracy']} "
                         f"auroc={m['auroc']}")
    lines.append(str(result.get("shap", "")))
    return lines
