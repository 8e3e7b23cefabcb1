"""The figure helpers enforce titles and axis labels and draw what they are given."""
import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mrec_utils import plots  # noqa: E402


def test_finish_refuses_missing_labels():
    fig, ax = plots.new_figure()
    with pytest.raises(ValueError):
        plots.finish(ax, "", "x", "y")
    with pytest.raises(ValueError):
        plots.finish(ax, "title", "x", "  ")
    plots.finish(ax, "title", "x (unit)", "y (unit)")
    assert ax.get_title() == "title" and ax.get_xlabel() == "x (unit)"


def test_loglog_rank_plot_sorts_counts_and_drops_zeros():
    fig, ax = plots.new_figure()
    line = plots.loglog_rank_plot(ax, np.array([3, 0, 10, 1]), label="x")
    x, y = line.get_data()
    assert list(y) == [10, 3, 1] and list(x) == [1, 2, 3]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"


def test_bar_counts_draws_one_bar_per_entry():
    fig, axes = plots.new_figure(ncols=2)
    bars = plots.bar_counts(axes[0], pd.Series({"a": 3, "b": 1}))
    assert [b.get_height() for b in bars] == [3, 1]
