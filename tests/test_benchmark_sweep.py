"""``python -m mrec_bench sweep``: jobs on Dask give the files of a serial run.

A tiny sweep (synthetic data, shrunk settings, a tiny random language model saved to a folder) runs once
in this process and once on a Dask ``LocalCluster`` of two single-threaded worker processes; every
metric of every file must be equal, bit for bit (only the timings may differ).
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from bench_data import RCFG, SPLIT, synthetic  # tests/bench_data.py
from mrec_bench import reports, sweep
from tiny_lm import tiny_lm  # tests/tiny_lm.py

TIMINGS = {"fit_seconds", "train s", "adapt ms / user"}
METHODS5 = ("global_mean", "mf_foldin", "net", "melu")
RANKING = METHODS5 + ("popularity", "cooccurrence", "item_gpt", "head_global", "head_maml", "head_residual")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm")
    lm = tiny_lm(0)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    settings = dataclasses.replace(RCFG, lm=str(folder))
    jobs = [sweep.Job("synthetic", sc, 5, seed) for sc in ("user-cold", "item-cold") for seed in (0, 1)]
    kw = dict(settings=settings, coldstart_methods=METHODS5, ranking_methods=RANKING, movielens=synthetic(), split_kwargs=SPLIT)
    return jobs, kw, tmp_path_factory.mktemp("cache")


def _files(folder) -> dict[str, object]:
    out = {}
    for name in ("coldstart_per_user.csv", "ranking_per_user.csv", "cost.csv", "coldstart_report.csv", "ranking_report.csv"):
        df = pd.read_csv(folder / "synthetic" / name)
        out[name] = df.drop(columns=[c for c in df.columns if c in TIMINGS])
    runs = json.loads((folder / "synthetic" / "runs.json").read_text())
    out["runs.json"] = [{k: v for k, v in r["info"].items() if k not in ("embed_seconds", "loadavg")} | {"job": r["scenario"]}
                        for r in runs["runs"]]
    return out


def test_dask_local_cluster_gives_the_files_of_a_serial_run(setup, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    jobs, kw, cache = setup
    monkeypatch.setenv("MREC_CACHE_DIR", str(cache))  # the workers inherit it
    serial = sweep.run_sweep(jobs, scheduler="serial", progress=False, **kw)
    dask = sweep.run_sweep(list(reversed(jobs)), workers=2, progress=False, **kw)[::-1]  # another order, other processes
    assert [r.job for r in serial] == [r.job for r in dask] == jobs
    sweep.write_results(serial, tmp_path / "serial", kw["settings"])
    sweep.write_results(dask, tmp_path / "dask", kw["settings"])
    a, b = _files(tmp_path / "serial"), _files(tmp_path / "dask")
    for name in a:
        if name == "runs.json":
            assert a[name] == b[name]
        else:
            pd.testing.assert_frame_equal(a[name], b[name], check_exact=True, obj=name)
    pu = a["coldstart_per_user.csv"]
    assert list(pu.columns[:5]) == ["scenario", "k", "seed", "method", "user_id"]
    assert set(pu.scenario) == {"user-cold", "item-cold"} and set(pu.seed) == {0, 1} and set(pu.method) == set(METHODS5)
    rk = a["ranking_per_user.csv"]
    assert set(rk.method) == set(RANKING)
    # chapter 5's methods were fitted once: the ranking rows hold the cold-start rows' in-query nDCG@3
    both = rk.merge(pu, on=["scenario", "k", "seed", "method", "user_id"], suffixes=("", "_cs"))
    assert len(both) == rk.method.isin(METHODS5).sum()
    assert (both["ndcg@3"] - both["ndcg@3_cs"]).abs().max() < 1e-12
    rep = reports.coldstart_report(pu)
    assert rep.loc[("user-cold", 5, "mf_foldin"), "users"] == len(pu[(pu.scenario == "user-cold") & (pu.method == "mf_foldin")])


def test_a_setting_the_data_cannot_supply_is_skipped_with_the_reason(setup, tmp_path):
    jobs, kw, _ = setup
    res = sweep.run_job(sweep.Job("synthetic", "user-cold", 60, 0), **kw)
    assert res.coldstart is None and "lower shots" in res.skipped
    sweep.write_results([res, sweep.run_job(jobs[0], **kw)], tmp_path, kw["settings"])
    doc = json.loads((tmp_path / "synthetic" / "runs.json").read_text())
    assert [s["k"] for s in doc["skipped"]] == [60] and len(doc["runs"]) == 1


def test_a_sweep_started_again_runs_only_the_unfinished_jobs(setup, tmp_path, monkeypatch):
    jobs, kw, _ = setup
    first = sweep.run_sweep(jobs[:1], scheduler="serial", progress=False, checkpoints=tmp_path, **kw)

    def no_more(*args, **kwargs):
        raise AssertionError("a finished job ran again")
    monkeypatch.setattr(sweep, "run_job", no_more)
    again = sweep.run_sweep(jobs[:1], scheduler="serial", progress=False, checkpoints=tmp_path, **kw)
    pd.testing.assert_frame_equal(first[0].coldstart, again[0].coldstart)
    with pytest.raises(AssertionError, match="ran again"):  # other settings: another checkpoint key
        sweep.run_sweep(jobs[:1], scheduler="serial", progress=False, checkpoints=tmp_path, **{**kw, "coldstart_methods": ("net",)})
