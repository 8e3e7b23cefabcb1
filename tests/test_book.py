"""The book builds with Sphinx warnings treated as errors and renders every chapter's figures."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.ipynb"))


def n_stored_figures(nb_path: Path) -> int:
    """Number of PNG/SVG figures among a notebook's stored outputs."""
    cells = nbformat.read(nb_path, as_version=4).cells
    return sum(
        any(mime in out.get("data", {}) for mime in ("image/png", "image/svg+xml"))
        for cell in cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def test_index_exists(built_book):
    assert (built_book / "index.html").exists()


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_notebook_page_renders_its_figures(built_book, nb):
    page = built_book / nb.relative_to(ROOT).with_suffix(".html")
    assert page.exists(), f"{nb.name} was not rendered"
    text = page.read_text(encoding="utf-8")
    assert text.count("<img") >= n_stored_figures(nb), f"{nb.name}: the page shows fewer images than the notebook has figures"


def test_every_toc_entry_is_rendered(built_book):
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    entries = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    missing = [e for e in entries if not (built_book / f"{e}.html").exists()]
    assert not missing, f"not rendered: {missing}"
