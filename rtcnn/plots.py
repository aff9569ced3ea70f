"""Figures for ``rtcnn.evaluate`` (localisation report) and ``rtcnn.score`` (catalog scores).

Every function takes plain numpy arrays and returns a :class:`matplotlib.figure.Figure`
(no pyplot state, so it works under the Agg backend, in tests and inside a Lightning
callback); the caller saves it (:func:`save_figure`) or logs it to TensorBoard.

Image conventions (:mod:`rtcnn`): arrays are ``[y, x]`` and shown with
``origin='lower'`` so that x runs right and y runs up; positions are ``(x, y)`` px,
0-based, integer = pixel centre, which is exactly where ``imshow`` puts pixel centres.
"""

from __future__ import annotations

import os

import numpy as np
from astropy.visualization import simple_norm
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator, NullFormatter

FIG_DPI = 110  # dots per inch of saved PNGs
ASINH_PERCENT = 99.5  # per cent of pixels inside the display range of image stamps
PLOT_MAX_DISTANCE = 20.0  # px, widest histogram range; larger errors go to the last bin (fig. 5)
ANGLE_LABEL = "error angle (deg; image frame: 0 = +x right, 90 = +y up, counter-clockwise)"


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG at :data:`FIG_DPI` to ``path`` (tight bounding box)."""
    fig.savefig(path, dpi=FIG_DPI, bbox_inches="tight")


# --------------------------------------------------------------------------------------
# Localisation report (rtcnn.evaluate): paper figures 4 to 7
# --------------------------------------------------------------------------------------


def error_angle(true_xy: np.ndarray, pred_xy: np.ndarray) -> np.ndarray:
    """Direction of the prediction error ``pred - true`` in the image frame.

    Parameters
    ----------
    true_xy, pred_xy : (N, 2) float
        Positions (x, y) in px.

    Returns
    -------
    angle : (N,) float64
        Degrees in ``[0, 360)``, counter-clockwise from +x (right) towards +y (up) as
        the image appears with ``origin='lower'``: an error straight up (+y) is 90.
    """
    d = np.asarray(pred_xy, dtype=np.float64) - np.asarray(true_xy, dtype=np.float64)
    if d.ndim != 2 or d.shape[-1] != 2:
        raise ValueError(f"positions must have shape (N, 2), got {d.shape}")
    return np.mod(np.degrees(np.arctan2(d[:, 1], d[:, 0])), 360.0)


def binned_median(
    x: np.ndarray, y: np.ndarray, bins: np.ndarray, min_count: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median of ``y`` in bins of ``x``.

    Parameters
    ----------
    x, y : (N,) float
        Abscissa and values; non-finite pairs are ignored.
    bins : (M + 1,) float
        Increasing bin edges in the units of ``x``; bins are ``[lo, hi)``, the last one
        ``[lo, hi]``; points outside are ignored.
    min_count : int
        Bins with fewer points give NaN.

    Returns
    -------
    centres, medians, counts : (M,) arrays
        Bin centres (arithmetic mean of the edges), median of ``y`` per bin (NaN where
        the bin has fewer than ``min_count`` points) and the number of points per bin.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    bins = np.asarray(bins, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape} must have the same shape")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n_bins = len(bins) - 1
    idx = np.searchsorted(bins, x, side="right") - 1
    idx[x == bins[-1]] = n_bins - 1  # the last bin includes its right edge
    med = np.full(n_bins, np.nan)
    counts = np.zeros(n_bins, dtype=np.int64)
    for i in range(n_bins):
        sel = idx == i
        counts[i] = sel.sum()
        if counts[i] >= min_count:
            med[i] = np.median(y[sel])
    return 0.5 * (bins[1:] + bins[:-1]), med, counts


def fig_error_distribution(distance: np.ndarray, angle: np.ndarray, n_best: int = 10) -> Figure:
    """Paper fig. 5: distance histogram, angle histogram and polar chart angle vs distance.

    Parameters
    ----------
    distance : (N,) float
        Prediction error in px.
    angle : (N,) float
        Error direction in degrees from :func:`error_angle` (image frame).
    n_best : int
        The ``n_best`` most accurate predictions are drawn in red on the polar chart.
    """
    distance = np.asarray(distance, dtype=np.float64)
    angle = np.asarray(angle, dtype=np.float64)
    if distance.shape != angle.shape:
        raise ValueError(f"distance {distance.shape} and angle {angle.shape} differ in shape")
    fig = Figure(figsize=(15, 4.8))
    ax_d = fig.add_subplot(1, 3, 1)
    ax_a = fig.add_subplot(1, 3, 2)
    ax_p = fig.add_subplot(1, 3, 3, projection="polar")
    top = PLOT_MAX_DISTANCE
    if distance.size and np.isfinite(distance).all():
        top = float(min(PLOT_MAX_DISTANCE, max(6.0, np.ceil(distance.max()))))
    n_out = int(np.sum(distance > top))
    ax_d.hist(np.clip(distance, 0, top), bins=np.linspace(0, top, 81), color="tab:blue")
    for r, ls in ((1, ":"), (2, "--"), (5, "-.")):
        ax_d.axvline(r, color="k", ls=ls, lw=1, label=f"{r} px: {np.mean(distance <= r):.1%}")
    ax_d.set_xlabel("distance predicted - true (px)")
    ax_d.set_ylabel("number of test tiles")
    extra = f"; {n_out} above {top:g} px in last bin" if n_out else ""
    ax_d.set_title(f"distance (N = {distance.size}{extra})", fontsize=10)
    ax_d.legend(fontsize=8)
    ax_a.hist(angle, bins=np.linspace(0, 360, 37), color="tab:orange")
    ax_a.set_xticks(np.arange(0, 361, 90))
    for ax in (ax_d, ax_a):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_a.set_xlabel(ANGLE_LABEL, fontsize=9)
    ax_a.set_ylabel("number of test tiles")
    ax_a.set_title("error direction", fontsize=10)
    order = np.argsort(distance)
    best = order[: min(n_best, distance.size)]
    ax_p.scatter(np.radians(angle), distance, s=8, alpha=0.6, color="tab:blue", label="all")
    ax_p.scatter(np.radians(angle[best]), distance[best], s=14, color="red",
                 label=f"{best.size} most accurate")
    if distance.size:
        ax_p.set_rmax(max(1.0, min(float(np.nanmax(distance)), PLOT_MAX_DISTANCE)))
    ax_p.set_rlabel_position(22.5)
    ax_p.set_title("angle (deg, image frame, 0 = +x, 90 = +y) vs distance (px)", fontsize=10,
                   pad=18)
    ax_p.legend(fontsize=8, loc="lower left", bbox_to_anchor=(-0.15, -0.15))
    fig.tight_layout()
    return fig


def fig_error_vs_dmag_edge(
    distance: np.ndarray, dmag: np.ndarray, edge_dist: np.ndarray, n_bins: int = 8
) -> Figure:
    """Paper fig. 6: prediction error vs magnitude change and vs distance to the tile edge.

    The paper puts the error on a logarithmic axis; here it is the (log) y axis so that the
    binned medians (black line, equal-count bins) read as a function of dmag or edge
    distance.

    Parameters
    ----------
    distance : (N,) float
        Prediction error in px (values below 0.01 px are drawn at 0.01 px).
    dmag : (N,) float
        Magnitude change of the transient, ``|mag_new - mag_ref|`` (mag, paper eq. 1).
    edge_dist : (N,) float
        Distance of the true position to the nearest tile edge (px).
    n_bins : int
        Number of equal-count bins for the medians (fewer where values repeat).
    """
    distance = np.asarray(distance, dtype=np.float64)
    fig = Figure(figsize=(12, 4.8))
    panels = (
        (dmag, "dmag = |mag_new - mag_ref| (mag)", "error vs magnitude change"),
        (edge_dist, "distance of the transient to the tile edge (px)", "error vs edge distance"),
    )
    for i, (x, xlabel, title) in enumerate(panels, start=1):
        x = np.asarray(x, dtype=np.float64)
        if x.shape != distance.shape:
            raise ValueError(f"{xlabel!r} has shape {x.shape}, distance {distance.shape}")
        ax = fig.add_subplot(1, 2, i)
        y = np.maximum(distance, 1e-2)
        ax.scatter(x, y, s=8, alpha=0.5, color="tab:blue", label="test tiles")
        finite = x[np.isfinite(x)]
        if finite.size:
            # equal-count bins (quantiles); a constant x gets one bin around it
            edges = np.unique(np.quantile(finite, np.linspace(0, 1, n_bins + 1)))
            if edges.size < 2:
                edges = np.array([edges[0] - 0.5, edges[0] + 0.5])
            c, m, _ = binned_median(x, y, edges)
            ax.plot(c, m, "o-", color="k", label=f"median in {edges.size - 1} equal-count bins")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.axhline(2.0, color="tab:red", ls="--", lw=1, label="2 px")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("distance predicted - true (px, log)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _stamp(ax, img: np.ndarray, true_xy, pred_xy, title: str) -> None:
    """One tile on ``ax`` (``origin='lower'``) with the true (o) and predicted (x) position.

    The axes keep the tile's extent; a prediction outside the tile is drawn on the
    nearest tile edge as a hollow diamond and said so in the title.
    """
    n = img.shape[-1]
    norm = simple_norm(img, "asinh", percent=ASINH_PERCENT)
    ax.imshow(img, origin="lower", cmap="gray", norm=norm, interpolation="nearest")
    ax.scatter([true_xy[0]], [true_xy[1]], s=90, facecolors="none", edgecolors="lime", lw=1.5,
               label="true")
    lo, hi = -0.5, n - 0.5
    px, py = np.clip(pred_xy, lo, hi)
    if np.allclose((px, py), pred_xy):
        ax.scatter([px], [py], s=60, marker="x", color="red", lw=1.5, label="predicted")
    else:
        ax.scatter([px], [py], s=70, marker="D", facecolors="none", edgecolors="red", lw=1.5,
                   label="predicted (outside)", clip_on=False)
        title += f"\npredicted ({pred_xy[0]:.0f}, {pred_xy[1]:.0f}) outside the tile"
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_title(title, fontsize=7)
    ax.set_xlabel("x (px)", fontsize=8)
    ax.set_ylabel("y (px)", fontsize=8)
    ax.tick_params(labelsize=7)


def fig_best_worst_tiles(
    images: np.ndarray,
    true_xy: np.ndarray,
    pred_xy: np.ndarray,
    distance: np.ndarray,
    labels: list[str],
    n_best: int,
) -> Figure:
    """Paper fig. 4: reference, new and difference of the best and the worst tiles.

    Parameters
    ----------
    images : (M, 2, n, n) float
        Tiles, channel 0 = reference, 1 = new; the first ``n_best`` rows are the most
        accurate predictions, the others the least accurate ones.
    true_xy, pred_xy : (M, 2) float
        True and predicted (x, y) in tile px.
    distance : (M,) float
        Prediction errors in px.
    labels : list of str
        One label per tile (pair name and tile origin).
    n_best : int
        How many of the rows are "best"; they go to the left three columns, the rest
        to the right three.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] != 2:
        raise ValueError(f"images must have shape (M, 2, n, n), got {images.shape}")
    m = images.shape[0]
    groups = (("best", range(0, n_best)), ("worst", range(n_best, m)))
    n_rows = max(n_best, m - n_best, 1)
    fig = Figure(figsize=(16, 2.8 * n_rows + 0.6))
    for g, (name, rows) in enumerate(groups):
        for r, i in enumerate(rows):
            ref, new = images[i, 0], images[i, 1]
            for c, (img, what) in enumerate(((ref, "reference"), (new, "new"),
                                             (new - ref, "difference new - ref"))):
                ax = fig.add_subplot(n_rows, 6, r * 6 + g * 3 + c + 1)
                title = f"{name} {r + 1}: {what}, d = {distance[i]:.2f} px\n{labels[i]}"
                _stamp(ax, img, true_xy[i], pred_xy[i], title)
                if r == 0 and c == 0:
                    ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("most accurate (left) and least accurate (right) test tiles; "
                 "o true, x predicted", fontsize=11)
    fig.tight_layout()
    return fig


def fig_robustness(median: np.ndarray, std: np.ndarray, n_views: int) -> Figure:
    """Paper fig. 7: per-tile median and std of the error over the augmented views.

    Three panels: median distance with std error bars against the tile index sorted by
    median; the same sorted by std; median against std.

    Parameters
    ----------
    median, std : (N,) float
        Median and standard deviation (px) of the distances of the ``n_views`` views of
        each tile, predictions mapped back to the original frame.
    n_views : int
        Number of views per tile (for the labels).
    """
    median = np.asarray(median, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    if median.shape != std.shape:
        raise ValueError(f"median {median.shape} and std {std.shape} differ in shape")
    fig = Figure(figsize=(16, 4.8))
    idx = np.arange(median.size)
    for i, (key, name) in enumerate(((median, "median"), (std, "std")), start=1):
        ax = fig.add_subplot(1, 3, i)
        o = np.argsort(key, kind="stable")
        ax.errorbar(idx, median[o], yerr=std[o], fmt="o", ms=3, lw=0.8, capsize=0,
                    ecolor="tab:gray", color="tab:blue")
        ax.set_xlabel(f"test tile index, sorted by {name}")
        ax.set_ylabel(f"median distance over {n_views} views (px), std error bars")
        ax.set_title(f"sorted by {name}", fontsize=10)
        ax.set_ylim(bottom=0)
    ax = fig.add_subplot(1, 3, 3)
    ax.scatter(std, median, s=10, alpha=0.6)
    ax.set_xlabel(f"std of distance over {n_views} views (px)")
    ax.set_ylabel(f"median distance over {n_views} views (px)")
    ax.set_title("median vs std", fontsize=10)
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    fig.suptitle("robustness: original + the paper's 5 augmentations, predictions mapped "
                 "back to the original frame", fontsize=11)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Catalog scores (rtcnn.score): completeness against magnitude, methods overlaid
# --------------------------------------------------------------------------------------


def fig_completeness(
    curves: dict[str, dict], m50: dict[str, float] | None = None, title: str = ""
) -> Figure:
    """Completeness of transients against their magnitude, one line per method.

    Parameters
    ----------
    curves : dict
        Method label → binned curve with ``lo``, ``hi`` (bin edges, AB mag), ``n``
        (transients per bin) and ``completeness`` (0-1, NaN for empty bins), as
        :func:`rtcnn.score.evaluate` returns in ``"curve"``.
    m50 : dict, optional
        Method label → m50 (AB mag), drawn as a dashed vertical line of the same colour.
    title : str
        Extra text for the title.

    Returns
    -------
    matplotlib.figure.Figure
        Upper panel: completeness with binomial error bars; lower panel: the number of
        transients per bin (the same for all methods scored on the same truth).
    """
    if not curves:
        raise ValueError("no completeness curves to plot")
    fig = Figure(figsize=(7.5, 6.0))
    ax = fig.add_axes((0.11, 0.34, 0.85, 0.58))
    axn = fig.add_axes((0.11, 0.09, 0.85, 0.18), sharex=ax)
    for i, (label, cur) in enumerate(curves.items()):
        lo = np.asarray(cur["lo"], dtype=np.float64)
        hi = np.asarray(cur["hi"], dtype=np.float64)
        n = np.asarray(cur["n"], dtype=np.float64)
        comp = np.asarray(cur["completeness"], dtype=np.float64)
        centre = 0.5 * (lo + hi)
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.sqrt(comp * (1.0 - comp) / n)
        color = f"C{i}"
        m = m50.get(label) if m50 else None
        text = label if m is None or not np.isfinite(m) else f"{label} (m50 = {m:.2f})"
        ax.errorbar(centre, comp, yerr=err, fmt="o-", ms=4, lw=1.2, capsize=2, color=color,
                    label=text)
        if m is not None and np.isfinite(m):
            ax.axvline(m, color=color, ls="--", lw=0.9)
        if i == 0:
            axn.bar(centre, n, width=0.9 * (hi - lo), color="0.6")
    ax.axhline(0.5, color="0.5", lw=0.6, ls=":")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("completeness (fraction of transients detected)")
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("completeness vs magnitude" + (f" ({title})" if title else ""), fontsize=10)
    ax.tick_params(labelbottom=False)
    axn.set_xlabel("transient magnitude of the flux change (AB mag)")
    axn.set_ylabel("transients")
    return fig


# --------------------------------------------------------------------------------------
# Detection (make demo): the new image with the candidates marked
# --------------------------------------------------------------------------------------


def fig_candidates(image: np.ndarray, det_xy: np.ndarray, truth_xy: np.ndarray | None = None,
                   title: str = "") -> Figure:
    """The image with candidates (circles) and, optionally, true transients (squares).

    Parameters
    ----------
    image : (ny, nx) float
        The new image, shown with an asinh stretch (NaN drawn as the background).
    det_xy : (N, 2) float
        Candidate positions (x, y), 0-based px.
    truth_xy : (M, 2) float, optional
        True transient positions (x, y), 0-based px.
    title : str
        Axes title.
    """
    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    fig = Figure(figsize=(8, 8))
    ax = fig.add_subplot()
    ax.imshow(img, origin="lower", cmap="gray", interpolation="nearest",
              norm=simple_norm(img, "asinh", percent=ASINH_PERCENT))
    det_xy = np.asarray(det_xy, dtype=float).reshape(-1, 2)
    ax.scatter(det_xy[:, 0], det_xy[:, 1], s=120, facecolors="none", edgecolors="lime",
               linewidths=1.0, label=f"candidates ({len(det_xy)})")
    if truth_xy is not None:
        truth_xy = np.asarray(truth_xy, dtype=float).reshape(-1, 2)
        ax.scatter(truth_xy[:, 0], truth_xy[:, 1], s=220, marker="s", facecolors="none",
                   edgecolors="red", linewidths=0.8, label=f"true transients ({len(truth_xy)})")
    ax.set_xlim(-0.5, img.shape[1] - 0.5)
    ax.set_ylim(-0.5, img.shape[0] - 0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")
    ax.legend(loc="upper right", fontsize=8)
    if title:
        ax.set_title(title)
    return fig
