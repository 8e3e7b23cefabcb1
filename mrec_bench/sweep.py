"""The sweep behind chapter 12: data set x scenario x k x seed, on Dask.

One *job* is one (data set, scenario, k, seed). It draws the split and episodes (chapter 5's
:func:`~mrec_utils.coldstart.prepare_data`), fits chapter 5's rating models once
(:func:`~mrec_utils.coldstart.run_coldstart` for that seed) and evaluates them, times their adaptation,
then ranks the same episodes with chapters 7 and 9's methods (:func:`mrec_bench.ranking.ranking_seed`,
reusing chapter 5's fitted models). Every job seeds itself and runs on one CPU thread in float64, so it
gives the same numbers wherever and in whatever order it runs: the jobs run on a Dask ``LocalCluster``
(one single-threaded worker process per core) by default, on an existing Dask cluster with
``scheduler="tcp://host:8786"``, or one after the other in this process with ``scheduler="serial"``;
the files are the same (``tests/test_benchmark_sweep.py`` checks it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from mrec_utils import coldstart, data, meta
from mrec_utils.models import melu_adapt_spec

from . import reports
from .ranking import RANKING_CHAPTER, RANKING_METHODS, RankingSettings, ranking_seed
from .speed import sync

DATASETS: tuple[str, ...] = ("ml-latest-small", "ml-100k")
KS: tuple[int, ...] = (5, 10, 20)
SEEDS: tuple[int, ...] = (0, 1, 2)

LIVE_SLICE: dict = {"dataset": "ml-latest-small", "scenario": "user-cold", "shots": 10, "seeds": (0,),
                    "methods": ("global_mean", "item_mean", "mf_foldin", "net", "net_finetune", "melu")}
"""The slice of the committed cold-start sweep that chapter 12 re-runs live and ``tests/test_benchmark_results.py``
re-computes: ``run_coldstart(dataset, scenario, shots, seeds=seeds, methods=methods)`` on one CPU thread must
give the file's numbers, user by user."""

RANKING_LIVE_SLICE: dict = {"dataset": "ml-latest-small", "scenario": "user-cold", "shots": 10, "seeds": (0,),
                            "methods": tuple(m for m in RANKING_METHODS if RANKING_CHAPTER[m] != 5)}
"""The slice of the committed ranking sweep re-run live: chapters 7 and 9's methods (chapter 5's are in
:data:`LIVE_SLICE`, and the files hold the same nDCG@3 for them in both tables)."""


# ------------------------------------------------------------------------------------------------ cost


def _count(module: torch.nn.Module, spec=None) -> int:
    params = meta.split_params(module, spec)[0] if spec is not None else dict(module.named_parameters())
    return sum(v.numel() for v in params.values())


def _size(m: str, f: coldstart.Fitted, n_items: int) -> tuple[int, int]:
    """(learned numbers, numbers adapted per user) of one of chapter 5's fitted methods."""
    if m == "global_mean":
        return 1, 0
    if m == "item_mean":
        return n_items, 0
    if m == "mf_foldin":
        mf = f.info.mf
        return 1 + sum(t.numel() for t in (mf.item_factors, mf.item_bias, mf.user_factors, mf.user_bias)), mf.item_factors.shape[1] + 1
    model = f.info.model
    if m == "protonet":
        return _count(model), 0
    return _count(model), 0 if f.info.steps == 0 else _count(model, melu_adapt_spec(f.info.adapt))


def coldstart_cost(result: coldstart.ColdStartResult, repeats: int = 3) -> pd.DataFrame:
    """What each fitted method of a :class:`~mrec_utils.coldstart.ColdStartResult` costs.

    Columns: ``method``, ``train s`` (mean over the result's seeds, validation choices included), ``adapt
    ms / user`` (median over ``repeats`` of the time to adapt to and predict every test user's query, per
    user), ``parameters`` (learned numbers), ``adapted / user`` (numbers changed for each new user).
    """
    if not isinstance(result, coldstart.ColdStartResult):
        raise TypeError(f"result must be a ColdStartResult (run_coldstart's output), got {type(result).__name__}.")
    seeds = sorted({s for s, _ in result.fitted})
    d = result.data[seeds[0]]
    rows = []
    for m in [m for m in coldstart.METHODS if (seeds[0], m) in result.fitted]:
        f = result.fitted[seeds[0], m]
        times = []
        for _ in range(repeats):
            sync(d.device)
            t0 = time.perf_counter()
            f.predict(d.test, d.test_users, False)
            sync(d.device)
            times.append(time.perf_counter() - t0)
        n_par, n_ad = _size(m, f, d.features.n_items)
        rows.append({"method": m, "train s": float(np.mean([result.fitted[s, m].seconds for s in seeds])),
                     "adapt ms / user": 1e3 * statistics.median(times) / len(d.test), "parameters": n_par, "adapted / user": n_ad})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ one job


@dataclass(frozen=True)
class Job:
    """One run of the sweep."""

    dataset: str
    scenario: str
    k: int
    seed: int


@dataclass
class JobResult:
    """A job's rows (scenario and k included), what validation chose (``info``), its wall time, or why it
    was skipped (a setting the release cannot supply)."""

    job: Job
    coldstart: pd.DataFrame | None = None
    ranking: pd.DataFrame | None = None
    cost: pd.DataFrame | None = None
    info: dict = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    skipped: str | None = None


@functools.lru_cache(maxsize=4)
def _movielens(name: str, data_dir: str | None) -> data.MovieLens:
    return data.load_movielens(name, data_dir)


def _with_setting(df: pd.DataFrame, job: Job) -> pd.DataFrame:
    return df.drop(columns=[c for c in ("scenario", "k") if c in df]).assign(scenario=job.scenario, k=job.k) \
        .pipe(lambda x: x[["scenario", "k", *[c for c in x.columns if c not in ("scenario", "k")]]])


def run_job(job: Job, settings: RankingSettings | None = None, coldstart_methods: Sequence[str] = tuple(coldstart.METHODS),
            ranking_methods: Sequence[str] = tuple(RANKING_METHODS), data_dir: str | None = None,
            movielens: data.MovieLens | None = None, split_kwargs: dict | None = None) -> JobResult:
    """Run one job (module docstring) in float64 on one thread; ``movielens`` replaces loading ``job.dataset``;
    ``split_kwargs`` go to :func:`mrec_utils.tasks.make_split`."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    s = RankingSettings() if settings is None else settings
    ml = _movielens(job.dataset, data_dir) if movielens is None else movielens
    t0 = time.perf_counter()
    try:
        res = coldstart.run_coldstart(ml, job.scenario, job.k, seeds=[job.seed], methods=[coldstart.METHODS[m] for m in coldstart_methods],
                                      settings=s.coldstart, progress=False, **(split_kwargs or {}))
    except ValueError as exc:
        if "lower shots" not in str(exc):
            raise
        return JobResult(job, skipped=str(exc))
    cost = coldstart_cost(res).assign(seed=job.seed, chapter=5)
    fitted = {m: f for (_, m), f in res.fitted.items()}
    r_pu, r_cost, info = ranking_seed(ml, res.data[job.seed], list(ranking_methods), s, fitted=fitted)
    r_cost = pd.DataFrame(r_cost).assign(chapter=lambda x: x["method"].map(RANKING_CHAPTER))
    cost = pd.concat([cost, r_cost[r_cost["chapter"] != 5]], ignore_index=True)
    cost = cost[["seed", "method", "chapter", "train s", "adapt ms / user", "parameters", "adapted / user"]] \
        .astype({"parameters": "Int64", "adapted / user": "Int64"})
    info.update(threads=torch.get_num_threads(), loadavg=[round(x, 2) for x in os.getloadavg()])
    return JobResult(job, _with_setting(res.per_user, job), _with_setting(r_pu, job), _with_setting(cost, job), info,
                     time.perf_counter() - t0)


def sweep_jobs(datasets: Sequence[str] = DATASETS, scenarios: Sequence[str] = coldstart.SCENARIOS,
               ks: Sequence[int] = KS, seeds: Sequence[int] = SEEDS) -> list[Job]:
    """Every (data set, scenario, k, seed), in the order of the files."""
    return [Job(d, sc, int(k), int(s)) for d in datasets for sc in scenarios for k in ks for s in seeds]


# ------------------------------------------------------------------------------------------------ many jobs


def _checkpoint(folder: Path | None, job: Job, key: str) -> Path | None:
    return None if folder is None else Path(folder) / key / f"{job.dataset}_{job.scenario}_k{job.k}_seed{job.seed}.pkl"


def run_sweep(jobs: Sequence[Job], *, scheduler: str | None = None, workers: int | None = None, progress: bool = True,
              checkpoints: str | Path | None = None, **job_kwargs) -> list[JobResult]:
    """Run ``jobs`` (:func:`run_job` with ``job_kwargs``) and return their results in the order of ``jobs``.

    Args:
        scheduler: ``None``: a Dask ``LocalCluster`` of ``workers`` single-threaded worker processes
            (default: one per CPU core); ``"serial"``: one after the other in this process; else the
            address of a running Dask scheduler (its workers need this package, the data and the LM).
        checkpoints: a folder where each finished job is kept (a pickle, keyed by the job and by
            ``job_kwargs``), so that a sweep started again runs only the jobs that did not finish.
    """
    key = hashlib.sha256(repr(sorted((k, repr(v)) for k, v in job_kwargs.items() if k != "movielens")).encode()).hexdigest()[:12]
    done = {}
    for j in jobs:
        path = _checkpoint(checkpoints, j, key)
        if path is not None and path.is_file():
            done[j] = pickle.loads(path.read_bytes())
    todo = [j for j in jobs if j not in done]
    start = time.perf_counter()

    def finished(r: JobResult) -> None:
        done[r.job] = r
        path = _checkpoint(checkpoints, r.job, key)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps(r))
        if progress:
            print(f"[{len(done)}/{len(jobs)}, {time.perf_counter() - start:.0f} s] {r.job.dataset} {r.job.scenario} "
                  f"k={r.job.k} seed={r.job.seed}: " + (f"skipped ({r.skipped})" if r.skipped else f"{r.seconds:.0f} s"), flush=True)

    if scheduler == "serial":
        for j in todo:
            finished(run_job(j, **job_kwargs))
    elif todo:
        from dask.distributed import Client, LocalCluster, as_completed

        cluster = None if scheduler else LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                                                      processes=True, dashboard_address=None)
        with Client(cluster if cluster is not None else scheduler) as client:
            for future in as_completed(client.map(run_job, todo, pure=False, **job_kwargs)):
                finished(future.result())
        if cluster is not None:
            cluster.close()
    return [done[j] for j in jobs]


def write_results(results: Sequence[JobResult], out: str | Path, settings: RankingSettings | None = None) -> list[Path]:
    """Write the files of :mod:`mrec_bench.reports` into ``out/<dataset>/``, rows in the order of the jobs."""
    s = RankingSettings() if settings is None else settings
    written = []
    for name in dict.fromkeys(r.job.dataset for r in results):
        mine = [r for r in results if r.job.dataset == name and r.skipped is None]
        folder = Path(out) / name
        folder.mkdir(parents=True, exist_ok=True)
        tables = {kind: pd.concat([getattr(r, kind) for r in mine], ignore_index=True) for kind in ("coldstart", "ranking", "cost")}
        for kind, df in tables.items():
            df.to_csv(folder / f"{kind}{'' if kind == 'cost' else '_per_user'}.csv", index=False)
        reports.coldstart_report(tables["coldstart"]).reset_index().to_csv(folder / "coldstart_report.csv", index=False)
        reports.ranking_report(tables["ranking"]).reset_index().to_csv(folder / "ranking_report.csv", index=False)
        doc = {"dataset": name, "settings": dataclasses.asdict(s), "intervals": "users resampled",
               "runs": [{**dataclasses.asdict(r.job), "seconds": r.seconds, "info": r.info} for r in mine],
               "skipped": [{**dataclasses.asdict(r.job), "reason": r.skipped} for r in results
                           if r.job.dataset == name and r.skipped is not None]}
        (folder / "runs.json").write_text(json.dumps(doc, indent=1, default=str))
        written += [folder / f for f in ("coldstart_per_user.csv", "ranking_per_user.csv", "cost.csv", "coldstart_report.csv",
                                          "ranking_report.csv", "runs.json")]
    return written
