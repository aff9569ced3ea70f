"""Figures of the localisation report (rtcnn.plots): conventions, helpers, labelled axes."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from numpy.testing import assert_allclose

from rtcnn import plots


def _axes_labelled(fig: Figure) -> None:
    """Every Cartesian axes of ``fig`` has x and y labels; those with units say them."""
    for ax in fig.axes:
        if ax.name == "polar":
            assert ax.get_title()
            continue
        assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def test_error_angle_image_frame():
    # errors +x, +y (up with origin='lower'), -x, -y and the diagonal (1, 1)
    true = np.full((5, 2), 10.0)
    pred = true + np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [0.0, -0.5], [1.0, 1.0]])
    assert_allclose(plots.error_angle(true, pred), [0.0, 90.0, 180.0, 270.0, 45.0], atol=1e-12)
    assert "+y up" in plots.ANGLE_LABEL and "counter-clockwise" in plots.ANGLE_LABEL


def test_error_angle_shape_check():
    with pytest.raises(ValueError, match=r"positions must have shape \(N, 2\)"):
        plots.error_angle(np.zeros(3), np.zeros(3))


def test_binned_median_known_values():
    x = np.array([0.1, 0.2, 0.3, 1.1, 1.2, 1.3, 1.4, 2.5, np.nan])
    y = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 40.0, 7.0, 5.0])
    centres, med, counts = plots.binned_median(x, y, np.array([0.0, 1.0, 2.0, 3.0]))
    assert_allclose(centres, [0.5, 1.5, 2.5])
    assert_allclose(med[:2], [2.0, 25.0])
    assert np.isnan(med[2])  # a single point is below min_count = 3
    assert counts.tolist() == [3, 4, 1]


def test_binned_median_shape_check():
    with pytest.raises(ValueError, match="must have the same shape"):
        plots.binned_median(np.zeros(3), np.zeros(4), np.arange(3.0))


@pytest.fixture
def errors():
    rng = np.random.default_rng(1)
    true = rng.uniform(3, 60, (40, 2))
    pred = true + rng.normal(0, 1.0, (40, 2))
    pred[0] += 30.0  # one outlier beyond the histogram range
    return true, pred, np.hypot(*(pred - true).T)


def test_fig_error_distribution(errors):
    true, pred, dist = errors
    fig = plots.fig_error_distribution(dist, plots.error_angle(true, pred))
    assert len(fig.axes) == 3
    _axes_labelled(fig)
    assert fig.axes[1].get_xlabel() == plots.ANGLE_LABEL
    assert "1 above 20 px" in fig.axes[0].get_title()


def test_fig_error_vs_dmag_edge(errors):
    _, _, dist = errors
    rng = np.random.default_rng(2)
    fig = plots.fig_error_vs_dmag_edge(dist, rng.normal(-2, 1, 40), rng.uniform(0, 32, 40))
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log"]
    assert "(mag)" in fig.axes[0].get_xlabel() and "(px)" in fig.axes[1].get_xlabel()
    _axes_labelled(fig)
    with pytest.raises(ValueError, match="has shape"):
        plots.fig_error_vs_dmag_edge(dist, np.zeros(3), np.zeros(40))


def test_fig_best_worst_tiles_layout(errors, tmp_path):
    true, pred, dist = errors
    images = np.random.default_rng(3).normal(0, 1, (6, 2, 64, 64)).astype(np.float32)
    fig = plots.fig_best_worst_tiles(images, true[:6], pred[:6], dist[:6], ["p"] * 6, n_best=3)
    assert len(fig.axes) == 18  # 3 rows x (ref, new, diff) x (best, worst)
    _axes_labelled(fig)
    # origin='lower': y grows upwards
    lo, hi = fig.axes[0].get_ylim()
    assert lo < hi
    plots.save_figure(fig, tmp_path / "tiles.png")
    assert (tmp_path / "tiles.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match=r"\(M, 2, n, n\)"):
        plots.fig_best_worst_tiles(images[:, :1], true, pred, dist, ["p"] * 6, n_best=3)


def test_fig_robustness(errors):
    _, _, dist = errors
    fig = plots.fig_robustness(dist, dist / 2, n_views=6)
    assert len(fig.axes) == 3
    assert "sorted by median" in fig.axes[0].get_xlabel()
    assert "sorted by std" in fig.axes[1].get_xlabel()
    _axes_labelled(fig)


def test_fig_best_worst_tiles_prediction_outside_tile():
    images = np.zeros((2, 2, 64, 64), np.float32)
    images[:, 1, 30, 20] = 1.0
    true = np.array([[20.0, 30.0], [20.0, 30.0]])
    pred = np.array([[21.0, 30.0], [-5.0, -25.0]])  # the second lies outside the tile
    fig = plots.fig_best_worst_tiles(images, true, pred, np.hypot(*(pred - true).T),
                                     ["a", "b"], n_best=1)
    for ax in fig.axes:
        assert_allclose(ax.get_xlim(), (-0.5, 63.5))
        assert_allclose(ax.get_ylim(), (-0.5, 63.5))
    assert "outside the tile" in fig.axes[3].get_title()
    assert "outside" not in fig.axes[0].get_title()
