"""``make pdf``: the whole book in one PDF, printed by headless Chromium with the network blocked.

The PDF's text must hold the title of every page in ``_toc.yml`` and no untypeset math.
"""
from __future__ import annotations

import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config as bc  # noqa: E402
from test_browser import _require_browser  # noqa: E402


def _title(path: Path) -> str:
    """The first '# ' heading of a page, as plain text."""
    if path.suffix == ".ipynb":
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    else:
        text = path.read_text(encoding="utf-8")
    heading = next(line[2:] for line in text.split("\n") if line.startswith("# "))
    return re.sub(r"[*_`]", "", heading).strip()


def _plain(text: str) -> str:
    """Text without ligatures (NFKC), with straight quotes and single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-"}))
    return re.sub(r"\s+", " ", text)


def test_pdf_has_every_chapter(tmp_path):
    _require_browser()  # skips without Chromium, fails instead when MREC_REQUIRE_BROWSER=1
    from pypdf import PdfReader

    pdf = tmp_path / "book.pdf"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "pdf.py"), "--out", str(pdf)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"make pdf failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    reader = PdfReader(pdf)
    text = _plain("\n".join(page.extract_text() or "" for page in reader.pages))
    titles = [_title(bc.source_file(entry)) for entry in bc.toc_files()]
    absent = [t for t in titles if _plain(t) not in text]
    assert not absent, f"the PDF ({len(reader.pages)} pages) lacks the titles {absent}"
    assert "\\(" not in text and "$$" not in text, "the PDF shows untypeset math"
