"""Execute notebooks top to bottom in a fresh kernel and store their outputs (``make execute``).

Each executed notebook records in ``metadata.mrec``:

- ``code_hash``: a hash of its code cells;
- ``package_files``: a hash of each package file it depends on: the ``mrec_utils`` /
  ``mrec_bench`` modules it imports, followed transitively through the modules' own imports
  (``tools/deps.py``), so editing one module makes only the notebooks that import it stale;
- ``seconds``: how long the run took (the README's chapter table shows it).

``tests/test_notebooks.py`` recomputes the hashes and fails when stored outputs are stale.

``--stamp-only`` records the current hashes without running anything (``seconds`` is kept). Use
it only after an edit that cannot change any output (a comment, a cell tag); it says so loudly.

Usage::

    python tools/execute_notebooks.py notebooks/01_movielens.ipynb [...]
    python tools/execute_notebooks.py --stamp-only notebooks/01_movielens.ipynb [...]
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat

import book_config as bc
import deps

TIMEOUT_PER_CELL = 900


def stamp(nb: nbformat.NotebookNode, seconds: float | None = None) -> None:
    """Record what the stored outputs were produced from."""
    meta = dict(nb.metadata.get("mrec", {}))
    meta.pop("package_hash", None)  # the old whole-package hash
    meta["code_hash"] = deps.code_hash(nb)
    meta["package_files"] = deps.package_files(nb, bc.ROOT)
    if seconds is not None:
        meta["seconds"] = round(seconds, 1)
    nb.metadata["mrec"] = meta


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
    stamp(nb, seconds)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks and store their outputs and hashes.")
    parser.add_argument("--stamp-only", action="store_true",
                        help="record the current hashes without executing (only after edits that cannot change outputs)")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            parser.error(f"not a notebook: {path}")
    for path in args.notebooks:
        rel = path.resolve().relative_to(bc.ROOT)
        if args.stamp_only:
            nb = nbformat.read(path, as_version=4)
            before = dict(nb.metadata.get("mrec", {}))
            stamp(nb)
            if nb.metadata["mrec"] != before:
                nbformat.write(nb, path)
                print(f"{rel}: hashes re-stamped WITHOUT executing; its outputs are claimed to be current")
            else:
                print(f"{rel}: already current")
            continue
        seconds = execute(path)
        print(f"{rel}: executed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
