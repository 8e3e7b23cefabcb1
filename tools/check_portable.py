"""Run the book's machine-sensitive checks as other machines would (``make check-portable``).

A checked number must be a property of the method, not of the machine that computed it. This
script re-runs the checks that depend on floating-point details -- the live slices of the benchmark
(``tests/test_benchmark_results.py``, ``tests/test_benchmark_nextfilm.py``) and every notebook that uses the language model or the
benchmark files -- once per *variant* of the machine, each in a fresh embedding cache, and prints one
line per variant: passed or failed, and how long it took.

Variants (``--variants``, default: all):

- ``default``     this machine as it is (an empty cache);
- ``kernels``     ``ATEN_CPU_CAPABILITY=default``: PyTorch's portable CPU kernels instead of this
                  machine's vectorised ones (what another processor computes);
- ``threads2``    ``OMP_NUM_THREADS=2``: reductions split over two threads;
- ``mkl-compat``  ``MKL_CBWR=COMPATIBLE``: MKL's conditional-numerical-reproducibility mode for the
                  matrix products;
- ``cache-order`` the same targets in reverse order, so every text meets the embedding cache filled by
                  other chapters, in other batches.

``--all`` runs the whole test suite (``pytest tests notebooks book``) per variant instead of the
machine-sensitive part. The quick part of this check runs in ``make test``: ``tests/test_portable.py``.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "kernels": {"ATEN_CPU_CAPABILITY": "default"},
    "threads2": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "mkl-compat": {"MKL_CBWR": "COMPATIBLE"},
    "cache-order": {},
}


def sensitive_targets() -> list[str]:
    """The live-slice tests and every notebook that uses the language model or the benchmark."""
    uses = re.compile(r"\b(lm|benchmark|mrec_bench|heads|metaemb|conversation)\b")
    notebooks = [p for p in sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb"))
                 if uses.search(p.read_text(encoding="utf-8"))]
    tests = ["tests/test_benchmark_results.py", "tests/test_benchmark_nextfilm.py", "tests/test_portable.py"]
    return tests + [p.relative_to(ROOT).as_posix() for p in notebooks]


def run_variant(name: str, targets: list[str], python: str) -> tuple[bool, float, str]:
    """Run pytest on ``targets`` under variant ``name`` in a fresh cache; (passed, seconds, summary line)."""
    if name == "cache-order":
        targets = list(reversed(targets))
    with tempfile.TemporaryDirectory(prefix=f"mrec-portable-{name}-") as cache:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MREC_NO_PROGRESS": "1",
               "MREC_CACHE_DIR": cache, **VARIANTS[name]}
        env.pop("MPLBACKEND", None)
        t0 = time.perf_counter()
        res = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax", *targets],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else res.stderr.strip()[-300:]
    if res.returncode != 0:
        failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
        summary = "\n    ".join([summary, *failed[:20]])
    return res.returncode == 0, seconds, summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help=f"which machine variants to run (default: all of {', '.join(VARIANTS)})")
    p.add_argument("--all", action="store_true", help="run the whole test suite per variant, not only the sensitive part")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if not os.environ.get("MREC_DATA_DIR"):
        p.error("set MREC_DATA_DIR to the folder that holds MovieLens (the checks run on real data)")
    targets = ["tests", "notebooks", *sorted(str(q.relative_to(ROOT)) for q in ROOT.glob("book/*.ipynb"))] if args.all \
        else sensitive_targets()
    print(f"targets: {' '.join(targets)}", flush=True)
    ok_all = True
    for name in args.variants:
        ok, seconds, summary = run_variant(name, targets, sys.executable)
        ok_all &= ok
        print(f"{name:<12} {'passed' if ok else 'FAILED'} in {seconds / 60:5.1f} min  {summary}", flush=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
