"""The book builds with Sphinx warnings treated as errors (``jupyter-book build -W``)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def test_book_builds_without_warnings(tmp_path):
    jb = Path(sys.executable).parent / "jupyter-book"
    exe = str(jb) if jb.exists() else shutil.which("jupyter-book")
    assert exe, "jupyter-book is not installed (make install)"
    result = subprocess.run(
        [exe, "build", str(ROOT), "-W", "--keep-going", "--path-output", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-4000:]
    html = tmp_path / "_build" / "html"
    assert (html / "index.html").exists()
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        page = html / "notebooks" / f"{nb.stem}.html"
        assert page.exists(), f"{nb.name} was not rendered"
        text = page.read_text(encoding="utf-8")
        cells = nbformat.read(nb, as_version=4).cells
        n_figures = sum(
            "image/png" in out.get("data", {})
            for cell in cells if cell.cell_type == "code" for out in cell.get("outputs", [])
        )
        assert text.count("<img") >= n_figures, f"{nb.name}: page shows fewer images than the notebook has figures"
