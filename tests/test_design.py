"""The size limits of the thin package (issue 12), measured on the source so that they cannot drift.

``mrec_utils`` at most 6,000 lines, no module over 900, no function body (docstring excluded) over 60
lines, no public function with 10 or more parameters, no dataclass with more than 15 fields;
``mrec_bench`` at most 2,000 lines; only the benchmark chapter imports ``mrec_bench``.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mrec_utils": 6000, "mrec_bench": 2000}
MODULE_LINES, BODY_LINES, PARAMETERS, FIELDS = 900, 60, 10, 15


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


def _trees():
    for package in ("mrec_utils",):
        for path in _modules(package):
            yield path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("package", list(PACKAGES))
def test_package_lines(package):
    lines = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in _modules(package)}
    assert sum(lines.values()) <= PACKAGES[package], f"{package}: {sum(lines.values())} lines ({lines})"
    assert max(lines.values()) <= MODULE_LINES, f"{package}: modules over {MODULE_LINES} lines: " + str(
        {k: v for k, v in lines.items() if v > MODULE_LINES})


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    return 0 if not body else body[-1].end_lineno - body[0].lineno + 1


def test_functions_are_short_and_take_few_parameters():
    long, wide = [], []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if _body_lines(node) > BODY_LINES:
                    long.append(f"{path}:{node.lineno} {node.name} ({_body_lines(node)} lines)")
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - (a.args[:1] != [] and a.args[0].arg in ("self", "cls"))
                if not node.name.startswith("_") and n >= PARAMETERS:
                    wide.append(f"{path}:{node.lineno} {node.name} ({n} parameters)")
    assert not long, f"function bodies over {BODY_LINES} lines: {long}"
    assert not wide, f"public functions with {PARAMETERS} or more parameters: {wide}"


def test_settings_objects_are_small():
    big = []
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any("dataclass" in ast.unparse(d) for d in node.decorator_list):
                n = sum(isinstance(s, ast.AnnAssign) and "ClassVar" not in ast.unparse(s.annotation) for s in node.body)
                if n > FIELDS:
                    big.append(f"{path}:{node.lineno} {node.name} ({n} fields)")
    assert not big, f"dataclasses with more than {FIELDS} fields: {big}"


def test_only_the_benchmark_chapter_imports_the_benchmark_package():
    importing = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        if re.search(r"^\s*(import|from)\s+mrec_bench\b", code, flags=re.M):
            importing.append(path.name)
    assert importing == ["12_benchmark.ipynb"], importing


def test_the_counters_see_what_they_count():
    """The checks above would pass vacuously on a parser that finds nothing."""
    fn = ast.parse("def f(a, b, *, c):\n    '''doc'''\n    x = 1\n    return x\n").body[0]
    assert _body_lines(fn) == 2 and len(fn.args.args) + len(fn.args.kwonlyargs) == 3
    assert sum(1 for _ in _trees()) == len(_modules("mrec_utils")) > 10
