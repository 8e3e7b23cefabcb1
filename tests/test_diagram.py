"""The system diagram (book/concepts.ipynb) draws five labelled boxes joined into one loop."""
import matplotlib

matplotlib.use("Agg")
import io  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402
from matplotlib.path import Path  # noqa: E402

from mrec_utils import plots  # noqa: E402

LOOP = ["User data", "Meta-learner", "Language model", "Recommendations", "Feedback"]


def _near_box(point, box, tol):
    """True when ``point`` lies within ``tol`` of the rectangle ``box`` but not deep inside it."""
    x, y = point
    x0, y0, w, h = box
    inside_grown = x0 - tol <= x <= x0 + w + tol and y0 - tol <= y <= y0 + h + tol
    inside_shrunk = x0 + tol < x < x0 + w - tol and y0 + tol < y < y0 + h - tol
    return inside_grown and not inside_shrunk


def _drawn_parts(ax):
    """What the diagram drew on ``ax``: per box label its rectangle ``(x0, y0, width, height)`` (the filled patch of
    each box; an opaque outline lies on it), and the arrows ``(start, tip)`` in the order they were drawn."""
    filled = [p for p in ax.patches if isinstance(p, FancyBboxPatch) and p.get_alpha() is not None]
    labels = [t.get_text() for t in ax.texts if t.get_fontweight() == "bold"]
    boxes = {lab: (p.get_x(), p.get_y(), p.get_width(), p.get_height()) for lab, p in zip(labels, filled)}
    arrows = []
    for p in ax.patches:
        if isinstance(p, FancyArrowPatch):
            path = p.get_path()  # in data coordinates; the tip is the point farthest from the start
            v = path.vertices[path.codes != Path.CLOSEPOLY]
            arrows.append((tuple(v[0]), tuple(v[np.argmax(np.hypot(*(v - v[0]).T))])))
    return boxes, arrows


@pytest.fixture
def drawn():
    fig, ax = plots.new_figure(width=10, height=5)
    plots.system_diagram(ax)
    yield fig, ax, _drawn_parts(ax)
    plt.close(fig)


def test_draws_five_labelled_boxes(drawn):
    fig, ax, (boxes, _) = drawn
    assert list(boxes) == LOOP
    texts = [t.get_text() for t in ax.texts]
    for label in LOOP:
        assert texts.count(label) == 1, f"box label {label!r} should appear exactly once"
    assert len([p for p in ax.patches if isinstance(p, FancyBboxPatch)]) == 10  # a filled box and its outline each


def test_boxes_do_not_overlap_and_fit_the_axes(drawn):
    fig, ax, (boxes, _) = drawn
    (xl, xr), (yb, yt) = ax.get_xlim(), ax.get_ylim()
    rects = list(boxes.values())
    for x0, y0, w, h in rects:
        assert xl <= x0 and x0 + w <= xr and yb <= y0 and y0 + h <= yt
    for i, (ax0, ay0, aw, ah) in enumerate(rects):
        for bx0, by0, bw, bh in rects[i + 1:]:
            overlap = ax0 < bx0 + bw and bx0 < ax0 + aw and ay0 < by0 + bh and by0 < ay0 + ah
            assert not overlap


def test_arrows_close_the_loop_from_box_edge_to_box_edge(drawn):
    fig, ax, (boxes, arrows) = drawn
    assert len(arrows) == 5
    pairs = []
    for start, end in arrows:
        (a,) = [label for label, box in boxes.items() if _near_box(start, box, tol=0.2)]  # starts at one box's edge
        (b,) = [label for label, box in boxes.items() if _near_box(end, box, tol=0.2)]  # and ends at another's
        pairs.append((a, b))
    assert pairs == [(LOOP[i], LOOP[(i + 1) % 5]) for i in range(5)]


def test_renders_without_error_and_without_title():
    fig, ax = plots.new_figure(width=10, height=5)
    plots.system_diagram(ax, title=None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ax.get_title() == "" and len(_drawn_parts(ax)[1]) == 5
