"""The committed cold-start sweep of chapter 10 (``benchmarks/results/``) and its live slice.

``benchmarks/run_all.sh`` writes the files; chapter 10 loads them and re-runs one slice live
(:data:`mrec_utils.benchmark.LIVE_SLICE`). Here we check that the files hold every scenario x k x
method x seed the script promises, that the report table is the aggregate of the per-user files,
and that re-computing the live slice (same function, same settings, one CPU thread) reproduces
the file's numbers.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import benchmark, coldstart

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SEEDS = {0, 1, 2}
KS = (5, 10, 20)
# the METHODS of benchmarks/run_all.sh (its first pass)
SWEEP = {"global_mean", "item_mean", "mf_foldin", "net", "net_finetune", "melu"}
MORE = {"maml", "fomaml", "reptile", "protonet"}  # run_all.sh's MORE: the second pass, files of their own
ALL = SWEEP | MORE
assert ALL == set(coldstart.METHODS)
EXPECTED = {"user-cold": ("user-cold", ALL), "item-cold": ("item-cold", ALL),
            "user+item-cold": ("user-item-cold", ALL)}
# ml-latest-small cannot supply it: one seed leaves a single validation user with 20 + 10 ratings
IMPOSSIBLE = {("user+item-cold", 20)}


def _data_available() -> bool:
    from mrec_utils import data

    try:
        data.load_movielens("ml-latest-small")
    except (FileNotFoundError, OSError, ValueError):
        return False
    return True


@pytest.fixture(scope="module")
def per_user() -> pd.DataFrame:
    files = sorted(RESULTS.glob("coldstart_*_per_user.csv"))
    assert files, f"no coldstart_*_per_user.csv in {RESULTS}; run benchmarks/run_all.sh"
    return benchmark.load_coldstart_per_user(files)


def test_files_exist_and_cover_the_sweep(per_user):
    assert set(per_user["scenario"]) == set(EXPECTED)
    for scenario, (slug, methods) in EXPECTED.items():
        for k in KS:
            if (scenario, k) in IMPOSSIBLE:
                assert not (RESULTS / f"coldstart_{slug}_k{k}.json").exists()
                assert not (RESULTS / f"coldstart_{slug}-more_k{k}.json").exists()
                continue
            for stem in (RESULTS / f"coldstart_{slug}_k{k}", RESULTS / f"coldstart_{slug}-more_k{k}"):
                assert stem.with_suffix(".json").is_file() and Path(f"{stem}_per_user.csv").is_file(), stem
                settings = json.loads(stem.with_suffix(".json").read_text())["meta"]["settings"]
                assert settings["scenario"] == scenario and settings["shots"] == k
                assert settings["dataset"] == "ml-latest-small" and settings["seeds"] == sorted(SEEDS)
            d = per_user[(per_user["scenario"] == scenario) & (per_user["k"] == k)]
            assert set(d["method"]) == methods, (scenario, k)
            for m, dm in d.groupby("method"):
                assert set(dm["seed"]) == SEEDS, (scenario, k, m)
            # every method scored on exactly the same (seed, user) pairs
            pairs = {m: set(zip(dm["seed"], dm["user_id"])) for m, dm in d.groupby("method")}
            first = next(iter(pairs.values()))
            assert all(p == first for p in pairs.values()) and len(first) >= 3
    for name in ("coldstart_report.csv", "coldstart_report.json", "cost.csv", "cost.json", "speed.csv", "speed.json"):
        assert (RESULTS / name).is_file(), name
        assert (RESULTS / name).stat().st_size < 2_000_000, f"{name} should stay small"


def test_run_all_script_runs_the_sweep_the_test_expects():
    text = (ROOT / "benchmarks" / "run_all.sh").read_text()
    default = text.split('METHODS=${METHODS:-"', 1)[1].split('"', 1)[0]
    assert set(default.split()) == SWEEP
    more = text.split('MORE=${MORE:-"', 1)[1].split('"', 1)[0]
    assert set(more.split()) == MORE
    assert set(benchmark.LIVE_SLICE["methods"]) <= SWEEP
    for scenario, (slug, _) in EXPECTED.items():
        assert f"{scenario}:{slug}" in text


def test_report_file_is_the_aggregate_of_the_per_user_files(per_user):
    rep = pd.read_csv(RESULTS / "coldstart_report.csv").set_index(["scenario", "k", "method"])
    again = benchmark.coldstart_report(per_user)
    assert len(rep) == len(again) == per_user.groupby(["scenario", "k", "method"]).ngroups
    for col in ("mae", "mae low", "mae high", "rmse", "ndcg@10", "ndcg@10 low", "ndcg@10 high", "users"):
        np.testing.assert_allclose(rep[col].to_numpy(float), again.loc[rep.index, col].to_numpy(float), rtol=1e-9, atol=1e-12)


def test_report_against_plain_computation():
    rng = np.random.default_rng(0)
    rows = []
    for m, shift in (("net", 0.0), ("melu", -0.2)):
        for seed in (0, 1):
            for u in range(30):
                e = rng.normal(size=10) + shift
                rows.append({"scenario": "user-cold", "k": 5, "seed": seed, "method": m, "user_id": u,
                             "mae": np.abs(e).mean(), "mse": (e ** 2).mean(),
                             "ndcg@10": np.nan if u % 3 == 0 else rng.uniform()})
    pu = pd.DataFrame(rows)
    rep = benchmark.coldstart_report(pu, metrics_=("mae", "rmse", "ndcg@10"))
    assert list(rep.index.get_level_values("method")) == ["net", "melu"]  # METHODS order
    for m in ("net", "melu"):
        d, r = pu[pu.method == m], rep.loc[("user-cold", 5, m)]
        assert r["mae"] == pytest.approx(d["mae"].mean())
        assert r["rmse"] == pytest.approx(math.sqrt(d["mse"].mean()))
        assert r["ndcg@10"] == pytest.approx(d["ndcg@10"].dropna().mean())
        assert r["mae low"] < r["mae"] < r["mae high"]
        # a 95% interval of a mean of 60 values is about +-2 standard errors
        se = d["mae"].std(ddof=1) / math.sqrt(len(d))
        assert 2.5 * se < r["mae high"] - r["mae low"] < 5.5 * se
        assert r["users"] == 60 and r["seeds"] == 2
    with pytest.raises(ValueError, match="columns"):
        benchmark.coldstart_report(pu.drop(columns=["k"]))


def test_speed_file_records_the_load():
    doc = json.loads((RESULTS / "speed.json").read_text())
    assert {"loadavg_before", "loadavg_after", "uptime_after"} <= set(doc["meta"])
    methods = {r["method"] for r in doc["results"]}
    assert {"vmap", "loop"} <= methods
    assert all(r["grad_rel_diff"] is None or r["grad_rel_diff"] < 1e-3 for r in doc["results"])


@pytest.fixture(scope="module")
def live():
    if not _data_available():
        pytest.skip("ml-latest-small not available (set MREC_DATA_DIR)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sweep ran with --threads 1
    try:
        s = benchmark.LIVE_SLICE
        res = coldstart.run_coldstart("ml-latest-small", s["scenario"], s["shots"], seeds=s["seeds"],
                                      methods=s["methods"], config=coldstart.ColdStartConfig(device="cpu"),
                                      progress=False)
    finally:
        torch.set_num_threads(threads)
    return res


def test_live_slice_matches_the_committed_file(live, per_user):
    s = benchmark.LIVE_SLICE
    f = per_user[(per_user["scenario"] == s["scenario"]) & (per_user["k"] == s["shots"])
                 & per_user["seed"].isin(s["seeds"]) & per_user["method"].isin(s["methods"])]
    assert set(f["method"]) == set(s["methods"])
    key = ["seed", "method", "user_id"]
    a = live.per_user.set_index(key).sort_index()
    b = f.set_index(key).sort_index()
    assert list(a.index) == list(b.index), "the live slice evaluated other users than the file"
    for m in s["methods"]:
        for col, rtol, atol in (("mae", 1e-4, 1e-6), ("mse", 1e-4, 1e-6), ("ndcg@3", 1e-4, 1e-6), ("ndcg@10", 0, 1e-4)):
            x = a.xs(m, level="method")[col].mean()
            y = b.xs(m, level="method")[col].mean()
            assert x == pytest.approx(y, rel=rtol, abs=atol), (m, col, x, y)


def test_cost_table_of_the_live_slice(live):
    filed = pd.read_csv(RESULTS / "cost.csv")
    assert set(filed["method"]) == ALL and (filed["parameters"] > 0).all()
    cost = benchmark.coldstart_cost(live, repeats=1).set_index("method")
    assert list(cost.index) == list(benchmark.LIVE_SLICE["methods"])
    assert (cost["adapt ms / user"] > 0).all() and (cost["train s"] >= 0).all()
    net = live.fitted[0, "net"].info["model"]
    n_net = sum(p.numel() for p in net.parameters())
    assert cost.loc["net", "parameters"] == cost.loc["net_finetune", "parameters"] == n_net
    assert cost.loc["net", "adapted / user"] == 0
    assert 0 < cost.loc["melu", "adapted / user"] < cost.loc["melu", "parameters"]
    mf = live.fitted[0, "mf_foldin"].info["mf"]
    assert cost.loc["mf_foldin", "adapted / user"] == mf.item_factors.shape[1] + 1
    assert cost.loc["global_mean", "parameters"] == 1
    with pytest.raises(TypeError, match="ColdStartResult"):
        benchmark.coldstart_cost(live.summary)
