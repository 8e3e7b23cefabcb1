"""The whole book as one PDF (``make pdf``), printed by headless Chromium.

Jupyter Book builds the book as a single HTML page (``--builder singlehtml``); Chromium, with the
network blocked, opens it from a loopback server, waits until the bundled MathJax has typeset
every formula and every image has loaded, and prints it (Chrome's ``Page.printToPDF`` through
selenium's ``execute_cdp_cmd``).

Usage: ``python tools/pdf.py [--out _build/pdf/book.pdf] [--html DIR]`` (``--html``: print an
already built single-page book instead of building one).
"""
from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import book_config as bc
import browser


def build_single_page(out: Path) -> Path:
    """Build the book as one HTML page under ``out``; returns the folder holding index.html."""
    jb = Path(sys.executable).parent / "jupyter-book"
    exe = str(jb) if jb.exists() else shutil.which("jupyter-book")
    if not exe:
        raise SystemExit("make pdf: jupyter-book is not installed (make install)")
    result = subprocess.run([exe, "build", str(bc.ROOT), "--builder", "singlehtml", "--path-output", str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit("make pdf: the single-page build failed:\n" + result.stdout[-4000:] + result.stderr[-2000:])
    return out / "_build" / "singlehtml"


# On paper nothing scrolls: long code lines wrap, and collapsed code stays collapsed.
PRINT_CSS_JS = """
const style = document.createElement('style');
style.textContent = '@media print { pre { white-space: pre-wrap !important; overflow-wrap: anywhere; } '
  + '.highlight, .cell_output, .output { overflow: visible !important; } }';
document.head.appendChild(style);
"""


def single_page(html_dir: Path) -> str:
    """The name of the page to print, at the top of ``html_dir``.

    Jupyter Book writes the single page under its root document's name (``book/intro.html``) and
    a redirecting ``index.html``, but the page's own links assume the top folder: a copy of it is
    put there.
    """
    index = html_dir / "index.html"
    if not index.is_file():
        raise SystemExit(f"make pdf: no index.html in {html_dir}")
    redirect = re.search(r'http-equiv="Refresh" content="0; url=([^"]+)"', index.read_text(encoding="utf-8"))
    if redirect is None:
        return "index.html"
    shutil.copyfile(html_dir / redirect.group(1), html_dir / "book.html")
    return "book.html"


def print_pdf(html_dir: Path, pdf: Path) -> int:
    """Print the single-page book in ``html_dir`` to ``pdf``; returns the PDF's size in bytes."""
    page = single_page(html_dir)
    absent = browser.missing()
    if absent:
        raise SystemExit(f"make pdf needs {absent} (apt-get install chromium chromium-driver)")
    with tempfile.TemporaryDirectory() as profile, browser.serve(html_dir) as base:
        driver = browser.chromium(Path(profile))
        try:
            driver.get(f"{base}/{page}")
            if not driver.execute_async_script(browser.WAIT_FOR_PAGE_JS):
                raise SystemExit("make pdf: the page did not finish typesetting its math")
            driver.execute_script(PRINT_CSS_JS)
            # Chrome's own command: selenium's print_page gives up after 10 s on a page this long
            result = driver.execute_cdp_cmd("Page.printToPDF", {
                "printBackground": True, "paperWidth": 8.27, "paperHeight": 11.69,  # A4, in inches
                "marginTop": 0.5, "marginBottom": 0.5, "marginLeft": 0.5, "marginRight": 0.5,
                "generateDocumentOutline": True})
            data = base64.b64decode(result["data"])
        finally:
            driver.quit()
    pdf.parent.mkdir(parents=True, exist_ok=True)
    pdf.write_bytes(data)
    return len(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the whole book into one PDF with headless Chromium.")
    parser.add_argument("--out", type=Path, default=bc.ROOT / "_build" / "pdf" / "book.pdf")
    parser.add_argument("--html", type=Path, help="an already built single-page book (folder with index.html)")
    args = parser.parse_args(argv)
    if args.out.suffix != ".pdf":
        parser.error(f"--out must name a .pdf file, got {args.out}")
    if args.html:
        size = print_pdf(args.html, args.out)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            size = print_pdf(build_single_page(Path(tmp)), args.out)
    print(f"{args.out}: {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
