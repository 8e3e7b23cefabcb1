"""Sphinx extension: the built book shows the Colab badge from its own files, not from Colab.

The notebooks' title cells use Colab's own badge image (so the badge shows on GitHub and in
JupyterLab); in the HTML book and the PDF, which must work offline, each image with that address
is replaced by ``tools/assets/colab-badge.svg`` before Sphinx collects the images.
"""
from __future__ import annotations

from pathlib import Path

from docutils import nodes

import book_config as bc

LOCAL = {bc.COLAB_BADGE_IMAGE: Path(__file__).resolve().parent / "assets" / "colab-badge.svg"}


def use_local_images(app, doctree) -> None:
    for image in doctree.findall(nodes.image):
        local = LOCAL.get(image.get("uri", ""))
        if local is not None:
            # a path that starts with "/" is relative to the book's source folder
            image["uri"] = "/" + local.relative_to(Path(app.srcdir).resolve()).as_posix()
            image["candidates"] = {"*": image["uri"]}


def setup(app):
    # before Sphinx's own image collector (priority 500) reads the addresses
    app.connect("doctree-read", use_local_images, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
