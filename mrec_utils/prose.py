"""Results into the book's prose: myst-nb's ``glue`` without needing myst-nb.

A chapter writes a number in its text as ``{glue:text}`name:.3f``` and stores the value with ``glue(name, value)`` in
the code cell that computes it. This is the function of ``myst_nb.glue`` (myst-nb 1.x), written out so that the chapters
also run where myst-nb is not installed (Colab, a plain ``pip install mrec_utils``): the same display output, the same
``application/papermill.record/`` mimetype prefix and ``scrapbook`` metadata, which the book build and
``tools/colab.py`` read back. ``tests/test_glue.py`` checks that it stores what myst-nb stores.
"""
from __future__ import annotations

from typing import Any

import numpy as np

GLUE_PREFIX = "application/papermill.record/"  # myst_nb.ext.glue.GLUE_PREFIX


def glue(name: str, value: Any, display: bool = False) -> None:
    """Store ``value`` in the cell's outputs under ``name`` for ``{glue:text}`` (not shown by default). NumPy scalars
    are stored as Python numbers, so a format spec such as ``:.3f`` applies to them."""
    from IPython.core.formatters import format_display_data
    from IPython.display import display as ipy_display

    if isinstance(value, np.generic):
        value = value.item()
    bundle, metadata = format_display_data(value)
    prefix = "" if display else GLUE_PREFIX
    metadata["scrapbook"] = {"name": name, "mime_prefix": prefix}
    ipy_display({prefix + k: v for k, v in bundle.items()}, raw=True, metadata=metadata)
