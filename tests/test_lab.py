"""``make lab``: JupyterLab shows a chapter's book markup rendered, not as raw MyST.

Starts JupyterLab on a loopback port and opens chapter 1 in headless Chromium (network blocked):
its title cell's admonition must be rendered by jupyterlab-myst (without it, JupyterLab shows
``:::{admonition}`` as text).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import book_config as bc  # noqa: E402
import browser  # noqa: E402
from test_browser import _require_browser  # noqa: E402

RENDERED_JS = """
const rendered = Array.from(document.querySelectorAll('.jp-MarkdownCell .myst'));
return {cells: rendered.length, text: rendered.map(c => c.innerText).join('\\n'),
        admonitions: document.querySelectorAll('.jp-MarkdownCell aside.myst-admonition').length};
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    jupyter = Path(sys.executable).parent / "jupyter"
    if not jupyter.exists():
        pytest.skip("JupyterLab is not installed here (make install installs the book extra)")
    port = _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "run"),
           "IPYTHONDIR": str(tmp_path / "ipython")}
    server = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1", "--IdentityProvider.token=",
         "--ServerApp.password=", "--allow-root", f"--ServerApp.root_dir={ROOT}", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{base}/api", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within 60 s")
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def test_lab_renders_the_books_markup(lab, tmp_path):
    _require_browser()
    chapter = next(e for e in bc.toc_files() if e.startswith("notebooks/"))
    driver = browser.chromium(tmp_path / "chromium")
    try:
        driver.get(f"{lab}/lab/tree/{chapter}.ipynb")
        deadline, report = time.time() + 90, {"cells": 0, "text": "", "admonitions": 0}
        while time.time() < deadline:
            report = driver.execute_script(RENDERED_JS)
            if report["admonitions"]:
                break
            time.sleep(1)
    finally:
        driver.quit()
    assert "What you will learn" in report["text"], f"no markdown cell of {chapter} was rendered by jupyterlab-myst"
    assert ":::" not in report["text"] and "{admonition}" not in report["text"], (
        f"JupyterLab shows {chapter}'s MyST markup as raw text: is jupyterlab-myst installed and compatible?")
    assert report["admonitions"] > 0, "the title cell's admonition is not rendered as one"
