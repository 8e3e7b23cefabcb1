"""The system diagram (book/concepts.ipynb) draws five labelled boxes joined into one loop."""
import matplotlib

matplotlib.use("Agg")
import io  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from mrec_utils import plots  # noqa: E402

LOOP = ["User data", "Meta-learner", "Language model", "Recommendations", "Feedback"]


def _near_box(point, box, tol):
    """True when ``point`` lies within ``tol`` of the rectangle ``box`` but not deep inside it."""
    x, y = point
    x0, y0, w, h = box
    inside_grown = x0 - tol <= x <= x0 + w + tol and y0 - tol <= y <= y0 + h + tol
    inside_shrunk = x0 + tol < x < x0 + w - tol and y0 + tol < y < y0 + h - tol
    return inside_grown and not inside_shrunk


@pytest.fixture
def drawn():
    fig, ax = plots.new_figure(width=10, height=5)
    d = plots.system_diagram(ax)
    yield fig, ax, d
    plt.close(fig)


def test_draws_five_labelled_boxes(drawn):
    fig, ax, d = drawn
    assert list(d.boxes) == LOOP
    texts = [t.get_text() for t in ax.texts]
    for label in LOOP:
        assert texts.count(label) == 1, f"box label {label!r} should appear exactly once"
    boxes = [p for p in ax.patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) >= 5
    for label, patch in d.patches.items():
        assert patch in ax.patches
        x0, y0, w, h = d.boxes[label]
        assert (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height()) == pytest.approx((x0, y0, w, h))


def test_boxes_do_not_overlap_and_fit_the_axes(drawn):
    fig, ax, d = drawn
    (xl, xr), (yb, yt) = ax.get_xlim(), ax.get_ylim()
    rects = list(d.boxes.values())
    for x0, y0, w, h in rects:
        assert xl <= x0 and x0 + w <= xr and yb <= y0 and y0 + h <= yt
    for i, (ax0, ay0, aw, ah) in enumerate(rects):
        for bx0, by0, bw, bh in rects[i + 1:]:
            overlap = ax0 < bx0 + bw and bx0 < ax0 + aw and ay0 < by0 + bh and by0 < ay0 + ah
            assert not overlap


def test_arrows_close_the_loop_from_box_edge_to_box_edge(drawn):
    fig, ax, d = drawn
    pairs = [(a, b) for a, b, _, _ in d.arrows]
    assert pairs == [(LOOP[i], LOOP[(i + 1) % 5]) for i in range(5)]
    arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch) and not isinstance(p, FancyBboxPatch)]
    assert len(arrows) == 5 and all(p in arrows for p in d.arrow_patches)
    for a, b, start, end in d.arrows:
        assert _near_box(start, d.boxes[a], tol=0.2), f"arrow {a}->{b} does not start at the edge of {a}"
        assert _near_box(end, d.boxes[b], tol=0.2), f"arrow {a}->{b} does not end at the edge of {b}"
        for other, box in d.boxes.items():
            if other not in (a, b):
                assert not _near_box(end, box, tol=0.2)


def test_renders_without_error_and_without_title():
    fig, ax = plots.new_figure(width=10, height=5)
    d = plots.system_diagram(ax, title=None)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(d.arrows) == 5
