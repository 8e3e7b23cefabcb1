"""Shared pytest fixtures (kept small)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# Read once at start-up: some tests isolate themselves from the environment with monkeypatch.
_DATA_DIR = os.environ.get("MREC_DATA_DIR")


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    """The folder MREC_DATA_DIR named when the session started; skips the test when unset."""
    if not _DATA_DIR:
        pytest.skip("real-data test: set MREC_DATA_DIR (e.g. ../shared/data) to run it")
    return Path(_DATA_DIR)
