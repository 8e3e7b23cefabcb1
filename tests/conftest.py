"""Shared pytest fixtures (kept small)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The book computes in float64 (every chapter's setup cell and the benchmark's command line set it),
# so that rounding differences between machines stay far below the digits a test compares.
torch.set_default_dtype(torch.float64)

# Read once at start-up: some tests isolate themselves from the environment with monkeypatch.
_DATA_DIR = os.environ.get("MREC_DATA_DIR")


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """The folder MREC_DATA_DIR named when the session started; skips the test when unset."""
    if not _DATA_DIR:
        pytest.skip("real-data test: set MREC_DATA_DIR (e.g. ../shared/data) to run it")
    return Path(_DATA_DIR)


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """Build the book once per session (``jupyter-book build -W``) and return its ``_build/html``.

    Fails (rather than skips) when the build has warnings: the book must build cleanly.
    """
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("book")
    jb = Path(sys.executable).parent / "jupyter-book"
    exe = str(jb) if jb.exists() else shutil.which("jupyter-book")
    if not exe:
        pytest.fail("jupyter-book is not installed (run make install)")
    result = subprocess.run(
        [exe, "build", str(root), "-W", "--keep-going", "--path-output", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    if result.returncode != 0:
        pytest.fail("jupyter-book build -W failed:\n" + result.stdout[-6000:] + result.stderr[-4000:])
    return out / "_build" / "html"
