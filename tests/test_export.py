"""The package modules that chapters define are up to date with the chapters (tools/export.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from export import KEY, TAG, exported_modules  # noqa: E402


def test_every_exported_module_equals_its_chapters():
    modules = exported_modules()
    for module, source in modules.items():
        path = ROOT / "mrec_utils" / f"{module}.py"
        assert path.exists(), f"mrec_utils/{module}.py is missing: run make export"
        assert path.read_text(encoding="utf-8") == source, f"mrec_utils/{module}.py differs from its chapters: run make export"


def _notebook(cells, module=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    if module:
        nb.metadata[KEY] = module
    return nb


def test_export_collects_tagged_cells_in_chapter_order(tmp_path):
    (tmp_path / "notebooks").mkdir()
    first = nbformat.v4.new_code_cell('"""Doc."""\nimport math\n\n\ndef f(x):\n    return math.sqrt(x)')
    first.metadata["tags"] = [TAG]
    shown_only = nbformat.v4.new_code_cell("print(f(4.0))")
    second = nbformat.v4.new_code_cell("def g(x):\n    return f(x) + 1\n")
    second.metadata["tags"] = ["nbval-check-output", TAG]
    nbformat.write(_notebook([first, shown_only], "demo"), tmp_path / "notebooks" / "05_a.ipynb")
    nbformat.write(_notebook([second], "demo"), tmp_path / "notebooks" / "06_b.ipynb")
    source = exported_modules(tmp_path)["demo"]
    assert "print(f(4.0))" not in source
    assert source.index("def f(x)") < source.index("def g(x)")
    assert "notebooks/05_a.ipynb, notebooks/06_b.ipynb" in source.splitlines()[0]
    namespace: dict = {}
    exec(compile(source, "demo.py", "exec"), namespace)  # the generated module runs
    assert namespace["g"](9.0) == 4.0 and namespace["__doc__"] == "Doc."


def test_export_refuses_tagged_cells_without_a_module(tmp_path):
    (tmp_path / "notebooks").mkdir()
    cell = nbformat.v4.new_code_cell("x = 1")
    cell.metadata["tags"] = [TAG]
    nbformat.write(_notebook([cell]), tmp_path / "notebooks" / "01_a.ipynb")
    with pytest.raises(ValueError, match="no notebook metadata"):
        exported_modules(tmp_path)
