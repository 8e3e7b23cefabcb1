"""Notebook hygiene: the stored outputs the book renders must be complete, clean and current.

nbval (``pytest --nbval-lax notebooks``) re-executes each notebook; these tests check the *stored*
copy: executed once, in order, in a fresh kernel, with no errors, no local paths, a title cell with
an Open-in-Colab badge built from the repository URL in ``_config.yml``, and hashes that match the
current code: the notebook's code cells and the package files it imports, transitively
(``tools/deps.py``; otherwise: ``make execute``).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config  # noqa: E402
from deps import code_hash, package_files  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.ipynb"))
LOCAL_PATH = re.compile(r"(/(work|root|home|tmp|Users)/[^\s\"']*)|([A-Za-z]:\\\\Users)")


def _toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = {toc["root"]}
    for part in toc.get("parts", []):
        for chapter in part.get("chapters", []):
            files.add(chapter["file"])
            files.update(section["file"] for section in chapter.get("sections", []))
    return files


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_is_in_the_table_of_contents(path):
    entry = path.relative_to(ROOT).with_suffix("").as_posix()
    assert entry in _toc_files(), f"{path.name} is missing from _toc.yml"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_stored_outputs_are_clean_and_current(path):
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    counts = [c.execution_count for c in code_cells]
    assert counts == list(range(1, len(code_cells) + 1)), (
        f"{path.name}: code cells were not executed once, top to bottom, in a fresh kernel "
        f"(execution counts {counts}); run make execute"
    )
    for i, cell in enumerate(code_cells, start=1):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{path.name} cell {i}: stored error {out.get('ename')}"
            if out.output_type == "stream":
                assert out.name != "stderr" or "Traceback" not in out.text, f"{path.name} cell {i}: traceback"
            text = json.dumps(out)
            match = LOCAL_PATH.search(text)
            assert match is None, f"{path.name} cell {i}: output shows a local path {match.group(0)!r}"
    meta = nb.metadata.get("mrec", {})
    assert meta.get("code_hash") == code_hash(nb), (
        f"{path.name}: code cells changed since the outputs were stored; run make execute"
    )
    stored, current = meta.get("package_files", {}), package_files(nb)
    changed = sorted(f for f in stored.keys() | current.keys() if stored.get(f) != current.get(f))
    assert not changed, (
        f"{path.name}: package files it imports changed since the outputs were stored: {changed}; "
        f"run make execute (or, only if the change cannot alter any output: "
        f"python tools/execute_notebooks.py --stamp-only {path.relative_to(ROOT).as_posix()})"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_title_cell_has_colab_badge_and_learning_goals(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), (
        f"{path.name}: the first cell must be a markdown title cell"
    )
    expected = book_config.badge_markdown(path.relative_to(ROOT))
    assert expected in first.source, f"{path.name}: the Colab badge must be {expected} (python tools/setup_cells.py --write)"
    assert "learn" in first.source.lower(), f"{path.name}: the title cell must say what the reader will learn"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_markdown_has_no_control_characters(path):
    """A TeX command written through a non-raw Python string loses its backslash (``\\frac`` -> form
    feed + ``rac``, ``\\theta`` -> tab + ``heta``, ``\\nabla`` -> new line + ``abla``): catch them."""
    nb = nbformat.read(path, as_version=4)
    bad = [(i, m.group()) for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"
           for m in re.finditer(r".{0,12}(?:[\t\x07\x08\x0b\x0c\r]|\n(?:abla|eq|ot)\b).{0,12}", cell.source, re.S)]
    assert not bad, f"{path.name}: control characters in markdown (cell, context): {bad[:5]}"
