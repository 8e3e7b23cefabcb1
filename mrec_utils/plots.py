"""One consistent figure style for the book.

Every figure gets a title and labelled axes (with units) through :func:`finish`.
The matplotlib backend is left alone (inline in notebooks, whatever the user has elsewhere).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["PALETTE", "set_style", "new_figure", "finish", "loglog_rank_plot", "bar_counts"]

#: Colour-blind-safe qualitative palette (Okabe & Ito), in the order methods are plotted.
PALETTE: tuple[str, ...] = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # green
    "#D55E00",  # vermillion
    "#CC79A7",  # purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)

DPI = 110


def set_style() -> None:
    """Apply the book's style: white grid, readable font sizes, dpi 110, :data:`PALETTE`."""
    import seaborn as sns

    sns.set_theme(
        context="notebook",
        style="whitegrid",
        palette=list(PALETTE),
        rc={
            "figure.dpi": DPI,
            "savefig.dpi": DPI,
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "xtick.labelsize": 9,
            "ytick.labelsize": 9,
            "legend.fontsize": 9,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "figure.autolayout": False,
        },
    )


def new_figure(
    ncols: int = 1,
    nrows: int = 1,
    width: float | None = None,
    height: float | None = None,
    **subplots_kw: Any,
):
    """Create a figure with a grid of axes.

    Args:
        ncols, nrows: grid size (>= 1).
        width, height: figure size in inches; default 4.8 per column and 3.4 per row.
        **subplots_kw: passed to ``plt.subplots`` (e.g. ``sharey=True``).

    Returns:
        ``(fig, axes)``: a single ``Axes`` for a 1x1 grid, else a numpy array of Axes.
    """
    for name, v in (("ncols", ncols), ("nrows", nrows)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}.")
    width = 4.8 * ncols if width is None else width
    height = 3.4 * nrows if height is None else height
    if not (width > 0 and height > 0):
        raise ValueError(f"width and height must be positive inches, got {width!r} x {height!r}.")
    subplots_kw.setdefault("layout", "constrained")
    return plt.subplots(nrows, ncols, figsize=(width, height), dpi=DPI, **subplots_kw)


def finish(ax, title: str, xlabel: str, ylabel: str, legend: bool | None = None):
    """Set title and axis labels (required, non-empty; put units in the labels).

    Args:
        ax: a matplotlib Axes.
        title, xlabel, ylabel: non-empty strings, e.g. ``"rating (stars)"``.
        legend: draw a legend; by default only when some artist has a label.

    Returns:
        ``ax``.
    """
    for name, v in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"every figure needs a {name}: pass a non-empty string (with units for axes).")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend is None:
        _, labels = ax.get_legend_handles_labels()
        legend = bool(labels)
    if legend:
        ax.legend(frameon=False)
    return ax


def loglog_rank_plot(ax, counts: Any, label: str | None = None, **plot_kw: Any):
    """Long-tail plot: counts sorted in decreasing order against their rank, log-log.

    Args:
        ax: a matplotlib Axes.
        counts: [n] non-negative counts (array, list or pandas Series), e.g. ratings per item.
            Zeros are dropped (log scale).
        label: legend label.

    Returns:
        the ``Line2D`` drawn.
    """
    c = np.asarray(counts, dtype=float).ravel()
    if c.size == 0 or np.isnan(c).any() or (c < 0).any():
        raise ValueError("counts must be a non-empty array of non-negative numbers without NaN.")
    c = np.sort(c[c > 0])[::-1]
    if c.size == 0:
        raise ValueError("counts are all zero; nothing to plot on a log scale.")
    (line,) = ax.plot(np.arange(1, c.size + 1), c, label=label, **plot_kw)
    ax.set_xscale("log")
    ax.set_yscale("log")
    return line


def bar_counts(ax, series: Any, color: str | None = None, rotate: float | None = None, **bar_kw: Any):
    """Bar chart of a pandas Series (index -> bar labels, values -> heights), in series order.

    Args:
        ax: a matplotlib Axes.
        series: a pandas Series (or dict) of non-negative numbers.
        color: bar colour (default ``PALETTE[0]``).
        rotate: tick-label rotation in degrees (default 45 when more than 8 bars).

    Returns:
        the ``BarContainer``.
    """
    import pandas as pd

    if isinstance(series, dict):
        series = pd.Series(series)
    if not isinstance(series, pd.Series):
        raise TypeError(f"series must be a pandas Series or dict, got {type(series).__name__}.")
    if len(series) == 0:
        raise ValueError("series is empty; nothing to plot.")
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=float)
    if np.isnan(values).any():
        raise ValueError("series holds non-numeric or missing values.")
    labels = [str(i) for i in series.index]
    bars = ax.bar(np.arange(len(values)), values, color=color or PALETTE[0], **bar_kw)
    ax.set_xticks(np.arange(len(values)))
    if rotate is None:
        rotate = 45 if len(values) > 8 else 0
    ax.set_xticklabels(labels, rotation=rotate, ha="right" if rotate else "center")
    return bars
