"""One consistent figure style for the book.

Every figure gets a title and labelled axes (with units) through :func:`finish`.
The matplotlib backend is left alone (inline in notebooks, whatever the user has elsewhere).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

#: Colour-blind-safe qualitative palette (Okabe & Ito), in the order methods are plotted: blue, orange,
#: green, vermillion, purple, sky blue, yellow, black.
PALETTE: tuple[str, ...] = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")

DPI = 110


def set_style() -> None:
    """Apply the book's style: white grid, readable font sizes, dpi 110, :data:`PALETTE`."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=list(PALETTE), rc={
        "figure.dpi": DPI, "savefig.dpi": DPI, "font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
        "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9, "axes.spines.top": False,
        "axes.spines.right": False, "figure.autolayout": False})


def new_figure(ncols: int = 1, nrows: int = 1, width: float | None = None, height: float | None = None, **subplots_kw):
    """``(fig, axes)`` with a grid of axes, 4.8 x 3.4 inches per panel unless ``width``/``height``
    are given; one ``Axes`` for a 1x1 grid, else an array. ``subplots_kw`` go to ``plt.subplots``."""
    subplots_kw.setdefault("layout", "constrained")
    size = (4.8 * ncols if width is None else width, 3.4 * nrows if height is None else height)
    return plt.subplots(nrows, ncols, figsize=size, dpi=DPI, **subplots_kw)


def finish(ax, title: str, xlabel: str, ylabel: str, legend: bool | None = None):
    """Set the title and axis labels that every figure must have (put units in the labels); a legend
    when ``legend`` (default: when some artist has a label). Returns ``ax``."""
    for name, v in (("title", title), ("xlabel", xlabel), ("ylabel", ylabel)):
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"every figure needs a {name}: pass a non-empty string (with units for axes).")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if legend or (legend is None and ax.get_legend_handles_labels()[1]):
        ax.legend(frameon=False)
    return ax


def loglog_rank_plot(ax, counts, label: str | None = None, **plot_kw):
    """Long-tail plot: non-negative ``counts [n]`` sorted in decreasing order against their rank,
    both axes logarithmic (zeros dropped). Returns the ``Line2D``."""
    c = np.asarray(counts, dtype=float).ravel()
    c = np.sort(c[c > 0])[::-1]
    (line,) = ax.plot(np.arange(1, c.size + 1), c, label=label, **plot_kw)
    ax.set(xscale="log", yscale="log")
    return line


def bar_counts(ax, series, color: str | None = None, **bar_kw):
    """Bars of a pandas Series (or dict) in its order: index -> labels, values -> heights; labels
    rotated by 45 degrees when there are more than 8. Returns the bars."""
    import pandas as pd

    series = pd.Series(series)
    x = np.arange(len(series))
    bars = ax.bar(x, series.to_numpy(dtype=float), color=color or PALETTE[0], **bar_kw)
    rotate = 45 if len(series) > 8 else 0
    ax.set_xticks(x, [str(i) for i in series.index], rotation=rotate, ha="right" if rotate else "center")
    return bars


# ----------------------------------------------------------------------------- system diagram
#: The five stages of the book's system diagram, in loop order:
#: (label, what it holds or does, chapters that build it).
SYSTEM_STAGES: tuple[tuple[str, str, str], ...] = (
    ("User data", "a few ratings, item text", "chapters 1–2"),
    ("Meta-learner", "adapts to one user\nfrom a support set", "chapters 3–6"),
    ("Language model", "reads item text and\nthe user's history", "chapters 7–10"),
    ("Recommendations", "ranked list,\nexplanation", "chapters 9–12"),
    ("Feedback", "new ratings, clicks,\nreplies in a dialogue", "chapters 6, 11"),
)

#: What travels along each arrow of the loop (from stage i to stage i + 1, the last back to 0).
SYSTEM_FLOWS: tuple[str, ...] = ("support set", "adapted\nparameters", "item scores", "shown to the user",
                                 "appended to the history")


def _box_exit(box: tuple[float, float, float, float], toward: tuple[float, float], gap: float) -> tuple[float, float]:
    """Point where the ray from the centre of ``box`` toward ``toward`` leaves the box, moved
    ``gap`` further along the ray (so arrows start and end just outside the boxes)."""
    x0, y0, w, h = box
    cx, cy = x0 + w / 2, y0 + h / 2
    dx, dy = toward[0] - cx, toward[1] - cy
    norm = float(np.hypot(dx, dy))
    # scale t so that (cx + t dx, cy + t dy) hits the nearest edge
    t = min((w / 2) / abs(dx) if dx else np.inf, (h / 2) / abs(dy) if dy else np.inf)
    return cx + t * dx + gap * dx / norm, cy + t * dy + gap * dy / norm


def system_diagram(ax, *, title: str | None = "How the pieces fit together") -> None:
    """Draw the book's system diagram, five boxes in a loop: user data -> meta-learner -> language model (top row, left
    to right) -> recommendations -> feedback (bottom row, right to left) -> back, each arrow labelled with what travels
    along it, in plain matplotlib patches. ``ax``: limits ``[0, 14] x [0, 6.6]``, axis hidden (10 x 5 inches reads
    well). Under each label: what the stage does and which chapters build it."""
    w, h = 3.0, 1.7
    top, bottom = 4.2, 0.6
    # centres: top row left -> right, bottom row right -> left
    centres = [(2.0, top + h / 2), (7.0, top + h / 2), (12.0, top + h / 2),
               (9.5, bottom + h / 2), (4.5, bottom + h / 2)]
    colours = [PALETTE[0], PALETTE[1], PALETTE[2], PALETTE[4], PALETTE[3]]
    boxes = [(cx - w / 2, cy - h / 2, w, h) for cx, cy in centres]
    for (label, what, chapters), (cx, cy), (x0, y0, _, _), colour in zip(SYSTEM_STAGES, centres, boxes, colours):
        # the filled box, then a second, opaque outline so the border keeps its full colour despite alpha
        for fill in ({"facecolor": colour, "alpha": 0.16}, {"facecolor": "none"}):
            ax.add_patch(FancyBboxPatch((x0, y0), w, h, boxstyle="round,pad=0.02,rounding_size=0.18", edgecolor=colour,
                                        linewidth=1.8, **fill))
        ax.text(cx, cy + 0.45, label, ha="center", va="center", fontsize=11, fontweight="bold", color="#222222")
        ax.text(cx, cy - 0.12, what, ha="center", va="center", fontsize=8.5, color="#333333", linespacing=1.15)
        ax.text(cx, cy - 0.62, chapters, ha="center", va="center", fontsize=8, style="italic", color="#555555")

    gap = 0.12
    for i, flow in enumerate(SYSTEM_FLOWS):
        j = (i + 1) % len(boxes)  # the arrow goes from stage i to stage j
        start, end = _box_exit(boxes[i], centres[j], gap), _box_exit(boxes[j], centres[i], gap)
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=16, linewidth=1.6,
                                     color="#444444", shrinkA=0, shrinkB=0))
        mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
        horizontal = abs(end[1] - start[1]) < 1e-9
        ax.text(mx + (0 if horizontal else (0.25 if end[0] > start[0] else -0.25)), my + (0.22 if horizontal else 0.0),
                flow, ha="center" if horizontal else ("left" if end[0] > start[0] else "right"),
                va="bottom" if horizontal else "center", fontsize=8.5, color="#444444")

    ax.text(7.0, (top + bottom + h) / 2, "the loop turns once per interaction", ha="center", va="center",
            fontsize=8.5, style="italic", color="#777777")
    ax.set(xlim=(0, 14), ylim=(0, 6.6), aspect="equal")
    ax.axis("off")
    if title:
        ax.set_title(title)
