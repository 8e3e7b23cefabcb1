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


# ---------------------------------------------------------------- book polish (issue 7, section 3)
import re  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
import book_config  # noqa: E402
import colab  # noqa: E402

NOTEBOOK_CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IMAGE_MIMES = ("image/png", "image/svg+xml")


def _rich_outputs(cell) -> list:
    return [o for o in cell.get("outputs", []) if o.get("output_type") in ("display_data", "execute_result")]


def _has_image(cell) -> bool:
    return any(any(m in o.get("data", {}) for m in IMAGE_MIMES) for o in cell.get("outputs", []))


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_plotting_cells_stored_their_figure(nb):
    """A cell that calls plt.show() must have stored an image (MPLBACKEND=Agg at execution stores none)."""
    cells = nbformat.read(nb, as_version=4).cells
    missing = [i for i, c in enumerate(cells) if c.cell_type == "code" and "plt.show()" in c.source and not _has_image(c)]
    assert not missing, (f"{nb.name}: cells {missing} call plt.show() but stored no image; re-execute with the inline "
                         "backend (unset MPLBACKEND)")


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_figure_labels_sit_on_exactly_one_image(nb):
    """mystnb figure metadata needs exactly one rich output, an image: otherwise the label is lost or duplicated."""
    cells = nbformat.read(nb, as_version=4).cells
    for i, c in enumerate(cells):
        fig = c.get("metadata", {}).get("mystnb", {}).get("figure")
        if c.cell_type != "code" or not fig:
            continue
        assert fig.get("caption", "").strip() and re.match(r"^fig-[a-z0-9-]+$", fig.get("name", "")), (
            f"{nb.name} cell {i}: a figure needs a caption and a name 'fig-...'")
        rich = _rich_outputs(c)
        assert len(rich) == 1 and _has_image(c), (
            f"{nb.name} cell {i}: figure {fig['name']} must be the cell's only rich output (found {len(rich)})")


def _figure_names(nb: Path) -> list[str]:
    cells = nbformat.read(nb, as_version=4).cells
    return [c.metadata["mystnb"]["figure"]["name"] for c in cells
            if c.cell_type == "code" and c.get("metadata", {}).get("mystnb", {}).get("figure")]


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_labelled_figures_are_numbered_in_the_page(built_book, nb):
    names = _figure_names(nb)
    text = (built_book / nb.relative_to(ROOT).with_suffix(".html")).read_text(encoding="utf-8")
    for name in names:
        assert f'id="{name}"' in text, f"{nb.name}: figure {name} is not in the page"
    numbers = re.findall(r'<span class="caption-number">Fig\. (\d+) </span>', text)
    assert len(numbers) == len(names), f"{nb.name}: {len(numbers)} numbered captions for {len(names)} labelled figures"


@pytest.mark.parametrize("nb", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_launch_buttons_point_at_the_page_notebook(built_book, nb):
    """Binder opens the page's notebook; Colab opens its published Colab copy (the title badge),
    never the book's source notebook, whose markup Colab cannot render."""
    repo, branch = book_config.repo_slug(), book_config.main_branch()
    rel = nb.relative_to(ROOT).as_posix()
    text = (built_book / nb.relative_to(ROOT).with_suffix(".html")).read_text(encoding="utf-8")
    assert f'href="https://mybinder.org/v2/gh/{repo}/{branch}?urlpath=lab/tree/{rel}"' in text, f"{rel}: Binder button"
    assert f'href="{book_config.colab_url(rel)}"' in text, f"{rel}: the Colab badge must open the published copy"
    colab_links = set(re.findall(r'href="(https://colab\.research\.google\.com/[^"]*)"', text))
    assert colab_links == {book_config.colab_url(rel)}, f"{rel}: other Colab links {colab_links}"
    assert 'src="../_images/colab-badge.svg"' in text, f"{rel}: the badge image must be the local copy"


def _html_numbers(text: str) -> dict[str, int]:
    """Label -> number, for the figures and labelled equations of one built page."""
    found = {}
    for m in re.finditer(r'id="(?P<label>[^"]+)"(?:(?!id=").)*?<span class="caption-number">Fig\. (?P<n>\d+) ', text, re.S):
        found[m.group("label")] = int(m.group("n"))
    for m in re.finditer(r'id="equation-(?P<label>[^"]+)">\s*<span class="eqno">\((?P<n>\d+)\)', text):
        found[m.group("label")] = int(m.group("n"))
    return found


def test_colab_copies_number_figures_and_equations_as_the_book_does(built_book):
    """tools/colab.py numbers figures and equations itself (the copies say "Fig. 3", "(8)"):
    the numbers must be the ones the built book shows."""
    index = colab.book_index()
    pages = {t.page for t in index.targets.values() if t.number is not None}
    assert pages, "the book has no numbered figure or equation"
    for page in sorted(pages):
        html = (built_book / page).with_suffix(".html").read_text(encoding="utf-8")
        shown = _html_numbers(html)
        expected = {label: t.number for label, t in index.targets.items() if t.page == page and t.number is not None}
        assert expected and {k: shown.get(k) for k in expected} == expected, f"{page}: numbers differ from the book"


@pytest.mark.parametrize("nb", NOTEBOOK_CHAPTERS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_chapter_has_learning_boxes_and_exercises_with_solutions(nb):
    md = "\n".join(c.source for c in nbformat.read(nb, as_version=4).cells if c.cell_type == "markdown")
    assert "{admonition} What you will learn" in md, f"{nb.name}: no 'What you will learn' box"
    assert "{admonition} What we learned" in md, f"{nb.name}: no 'What we learned' box"
    assert "## Exercises" in md, f"{nb.name}: no exercises"
    exercises_part = md.split("## Exercises", 1)[1]
    questions = re.findall(r"^\d+\. ", exercises_part.split(":::{admonition}", 1)[0], flags=re.M)
    solutions = re.findall(r"^:{3,4}\{admonition\} Solution (\d+)\n:class: dropdown$", exercises_part, flags=re.M)
    assert [int(s) for s in solutions] == list(range(1, len(questions) + 1)), (
        f"{nb.name}: {len(questions)} exercises but solution dropdowns {solutions}")


def test_glossary_page_defines_terms_and_symbols(built_book):
    text = (built_book / "book" / "glossary.html").read_text(encoding="utf-8")
    assert 'id="term-support-set"' in text and 'id="term-meta-gradient"' in text, "glossary terms missing"
    assert "#equation-eq-ch03-maml-objective" in text, "the symbol table must link to the equations"
    chapter3 = (built_book / "notebooks" / "03_maml_reptile.html").read_text(encoding="utf-8")
    assert 'glossary.html#term-meta-batch' in chapter3, "chapter 3 must link a glossary term"


def test_search_page_and_index_exist(built_book):
    assert (built_book / "search.html").exists() and (built_book / "searchindex.js").exists()
    assert "glossary" in (built_book / "searchindex.js").read_text(encoding="utf-8").lower()
