"""The committed results and the tables made from them: means with 95% intervals, paired differences.

The sweep (:mod:`mrec_bench.sweep`) writes one folder per data set, ``benchmarks/results/<dataset>/``, which
the installed package ships as ``mrec_bench.results`` (read it with :func:`results_dir`, or, from a chapter
that does not import this package, with ``importlib.resources.files("mrec_bench.results")``):

* ``coldstart_per_user.csv``: one row per (scenario, k, seed, method, test user), chapter 5's metrics;
* ``ranking_per_user.csv``: the same episodes ranked by chapters 5, 7 and 9 (in-query nDCG@3, like AUC);
* ``cost.csv``: training seconds, adaptation milliseconds per user and parameters per (scenario, k, seed, method);
* ``runs.json``: the settings, and per run what validation chose, how long it took, which settings the
  release cannot supply;
* ``coldstart_report.csv`` and ``ranking_report.csv``: :func:`coldstart_report` and :func:`ranking_report`.

A user is a test user under several seeds, so the intervals resample users (clusters), not (seed, user) pairs.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mrec_utils import coldstart, metrics

from .ranking import RANKING_METHODS, RANKING_METRICS

REPORT_METRICS: tuple[str, ...] = ("mae", "rmse", "ndcg@3", "hr@10", "ndcg@10")
"""Metrics of :func:`coldstart_report` (``rmse`` from the per-user ``mse``)."""

LOWER_IS_BETTER = {"mae", "rmse", "mse"}


def results_dir():
    """The committed results: ``benchmarks/results`` of the source checkout this package sits in, else the
    installed package data ``mrec_bench.results`` (a :class:`importlib.resources.abc.Traversable`)."""
    checkout = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    return checkout if checkout.is_dir() else resources.files("mrec_bench.results")


def read_csv(name: str, dataset: str | None = None, folder=None) -> pd.DataFrame:
    """``<folder>/<dataset>/<name>`` (default folder: :func:`results_dir`) as a DataFrame."""
    base = results_dir() if folder is None else Path(folder)
    path = base / dataset / name if dataset else base / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python -m mrec_bench sweep` (benchmarks/run_all.sh) to produce it.")
    with path.open("rb") as f:
        return pd.read_csv(f)


def read_json(name: str, dataset: str | None = None, folder=None) -> dict:
    """``<folder>/<dataset>/<name>`` parsed (e.g. ``runs.json``, ``speed.json``)."""
    base = results_dir() if folder is None else Path(folder)
    path = base / dataset / name if dataset else base / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; run `python -m mrec_bench sweep` (benchmarks/run_all.sh) to produce it.")
    return json.loads(path.read_text())


def load_per_user(paths: Sequence[str | Path], kind: str) -> pd.DataFrame:
    """Concatenate per-user CSV files of one ``kind`` ("coldstart" or "ranking"); a folder stands for its
    ``<kind>*per_user.csv`` files. Every file names its scenario and k in columns."""
    files = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        files += sorted(p.glob(f"{kind}*per_user.csv")) if p.is_dir() else [p]
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        raise FileNotFoundError(f"no {kind} per-user file in {list(map(str, paths))} (missing: {missing}); "
                                f"run `python -m mrec_bench sweep` or `python -m mrec_bench {kind} --per-user FILE` first.")
    frames = [pd.read_csv(f) for f in files]
    bad = [str(f) for f, df in zip(files, frames) if not {"scenario", "k", "seed", "method", "user_id"} <= set(df.columns)]
    if bad:
        raise ValueError(f"not per-user files of the benchmark (no scenario, k, seed, method, user_id columns): {bad}")
    return pd.concat(frames, ignore_index=True)


def sort_rows(df: pd.DataFrame, order: Sequence[str]) -> pd.DataFrame:
    """Rows in the book's order: scenario (chapter 2's), k, seed, method (``order``); stable within."""
    keys = {"scenario": {s: i for i, s in enumerate(coldstart.SCENARIOS)}, "method": {m: i for i, m in enumerate(order)}}
    cols = [c for c in ("scenario", "k", "seed", "method") if c in df.columns]
    return df.sort_values(cols, key=lambda s: s.map(keys[s.name]) if s.name in keys else s, kind="stable").reset_index(drop=True)


def interval_table(per_user: pd.DataFrame, keys: list[str], metric_names: Sequence[str], order: Sequence[str], *,
                   clusters: bool = True, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean and 95% percentile-bootstrap interval of each metric per group of ``keys``.

    ``clusters=True`` resamples users (a user evaluated under several seeds is one cluster); False
    resamples (seed, user) pairs. ``rmse`` is the square root of the ``mse`` mean and interval; NaN values
    are left out. Columns ``<metric>``, ``<metric> low``, ``<metric> high``, ``seeds``, ``users`` (rows) and
    ``distinct users``.
    """
    rows = []
    for key, d in per_user.groupby(keys, sort=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for name in metric_names:
            col = "mse" if name == "rmse" else name
            if col not in d:
                continue
            ok = d[col].notna().to_numpy()
            v, users = d[col].to_numpy(float)[ok], d["user_id"].to_numpy()[ok]
            if (len(np.unique(users)) if clusters else len(v)) < 2:
                est = lo = hi = float(v.mean()) if len(v) else float("nan")
            else:
                ci = metrics.bootstrap_ci(v, n_boot=n_boot, seed=seed, clusters=users if clusters else None)
                est, lo, hi = ci.estimate, ci.low, ci.high
            if name == "rmse":
                est, lo, hi = (float(np.sqrt(x)) for x in (est, lo, hi))
            row.update({name: est, f"{name} low": lo, f"{name} high": hi})
        row.update(seeds=d["seed"].nunique(), users=len(d), **{"distinct users": d["user_id"].nunique()})
        rows.append(row)
    return sort_rows(pd.DataFrame(rows), order).set_index(keys)


def coldstart_report(per_user: pd.DataFrame, metric_names: Sequence[str] = REPORT_METRICS, **kw) -> pd.DataFrame:
    """Chapter 12's results table: mean and 95% interval per (scenario, k, method) of chapter 5's metrics
    (:func:`interval_table`; ``kw``: ``clusters``, ``n_boot``, ``seed``)."""
    need = {"scenario", "k", "seed", "method", "user_id", "mae", "mse"}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise ValueError(f"per_user must be a DataFrame with the columns {sorted(need)} (coldstart_per_user.csv).")
    return interval_table(per_user, ["scenario", "k", "method"], metric_names, list(coldstart.METHODS), **kw)


def ranking_report(per_user: pd.DataFrame, **kw) -> pd.DataFrame:
    """The ranking table: mean and 95% interval of nDCG@3 and AUC per (scenario, k, method) (users whose
    query holds one class only are left out of the AUC)."""
    need = {"seed", "method", "user_id", *RANKING_METRICS}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise ValueError(f"per_user must be a DataFrame with the columns {sorted(need)} (ranking_per_user.csv).")
    keys = [c for c in ("scenario", "k") if c in per_user.columns] + ["method"]
    return interval_table(per_user, keys, RANKING_METRICS, list(RANKING_METHODS), **kw)


def paired(per_user: pd.DataFrame, a: str, b: str, metric: str, *, clusters: bool = True, n_boot: int = 2000,
           seed: int = 0) -> metrics.BootstrapResult:
    """Paired bootstrap of ``mean(metric of a - metric of b)`` over the (seed, user) episodes both have a
    value for, in one (scenario, k) slice of ``per_user``; ``clusters=True`` resamples users."""
    x = per_user[per_user["method"] == a].set_index(["seed", "user_id"])[metric]
    y = per_user[per_user["method"] == b].set_index(["seed", "user_id"])[metric].reindex(x.index)
    ok = (x.notna() & y.notna()).to_numpy()
    users = x.index.get_level_values("user_id").to_numpy()[ok]
    return metrics.paired_bootstrap_ci(x.to_numpy()[ok], y.to_numpy()[ok], n_boot=n_boot, seed=seed,
                                       clusters=users if clusters else None)


def verdict(ci: metrics.BootstrapResult, metric: str, a: str = "a", b: str = "b") -> str:
    """:func:`mrec_utils.metrics.verdict` for ``metric`` (lower is better for the errors of :data:`LOWER_IS_BETTER`)."""
    return metrics.verdict(ci, metric in LOWER_IS_BETTER, a, b)
