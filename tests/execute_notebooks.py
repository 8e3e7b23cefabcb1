"""Execute notebooks top to bottom in a fresh kernel and store their outputs (``make execute``).

Each executed notebook records in its metadata (``metadata.mrec``) a hash of its code cells and a
hash of the ``mrec_utils`` sources. ``tests/test_notebooks.py`` recomputes both and fails when the
stored outputs are stale, so the book never shows outputs of code that has since changed.

Usage: ``python tests/execute_notebooks.py notebooks/01_movielens.ipynb [...]``
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mrec_utils"
TIMEOUT_PER_CELL = 900


def code_hash(nb: nbformat.NotebookNode) -> str:
    """SHA-256 over the sources of the notebook's code cells, in order."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode("utf-8"))
            h.update(b"\x00")
    return h.hexdigest()


def package_hash(package_dir: Path = PACKAGE) -> str:
    """SHA-256 over every ``*.py`` file of ``mrec_utils`` (relative path and bytes, sorted)."""
    h = hashlib.sha256()
    for path in sorted(package_dir.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        h.update(path.relative_to(package_dir).as_posix().encode("utf-8"))
        h.update(b"\x00")
        h.update(path.read_bytes())
        h.update(b"\x00")
    return h.hexdigest()


def execute(path: Path) -> float:
    """Run one notebook in a fresh kernel (working folder: its own folder) and save it in place."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("MREC_NO_PROGRESS")
    os.environ["MREC_NO_PROGRESS"] = "1"  # progress bars are for live readers, not stored outputs
    backend_before = os.environ.pop("MPLBACKEND", None)  # Agg would make plt.show() store no figure
    try:
        client = NotebookClient(
            nb,
            timeout=TIMEOUT_PER_CELL,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("MREC_NO_PROGRESS", None)
        else:
            os.environ["MREC_NO_PROGRESS"] = env_before
        if backend_before is not None:
            os.environ["MPLBACKEND"] = backend_before
    nb.metadata["mrec"] = {"code_hash": code_hash(nb), "package_hash": package_hash()}
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for name in argv:
        path = Path(name).resolve()
        if not path.exists():
            print(f"no such notebook: {name}", file=sys.stderr)
            return 2
        seconds = execute(path)
        print(f"{path.relative_to(ROOT)}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
