"""``python -m mrec_bench ranking``: chapters 5, 7 and 9 on chapter 5's episodes.

Small synthetic MovieLens-shaped data (films released over time, users with a planted genre taste)
and a tiny random language model stand in for speed; the settings are shrunk, the code paths are
the book's. The checks: every method is scored on the same test episodes as ``mrec_bench coldstart``
(and chapter 5's methods give the same nDCG@3 there), scores are finite, films a model has never
seen are handled as documented (the id-based models of chapter 7 tie on new films), the metrics
agree with scikit-learn, and bad input fails with a clear message.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import ndcg_score, roc_auc_score

from mrec_bench import cli, ranking, reports
from mrec_utils import coldstart as cs, data as D
from bench_data import CCFG, RCFG, SPLIT, synthetic  # tests/bench_data.py
from tiny_lm import tiny_lm  # tests/tiny_lm.py


@pytest.fixture(autouse=True)
def one_thread_and_cache(tmp_path_factory, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("MREC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ranking_cache"))
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ml() -> D.MovieLens:
    return synthetic()


@pytest.fixture(scope="module")
def llm():
    return tiny_lm(0)


def run(ml, llm, scenario, k=5, seeds=(0,), methods=None):
    return ranking.ranking_benchmark(ml, scenario, k, seeds=seeds, methods=methods, settings=RCFG, llm=llm, **SPLIT)


# ------------------------------------------------------------------------------------------------ metrics


def test_ranking_metrics_match_sklearn_and_a_loop():
    rng = np.random.default_rng(1)
    y = rng.integers(1, 6, size=(40, 10)).astype(float)
    s = rng.normal(size=(40, 10))
    s[:, 3] = s[:, 4]  # ties are averaged
    m = np.ones_like(y, dtype=bool)
    m[5, 7:] = False  # padding
    got = ranking.ranking_metrics(s, y, m)
    for t in range(len(y)):
        yt, st = y[t][m[t]], s[t][m[t]]
        assert got["ndcg@3"][t] == pytest.approx(ndcg_score([2 ** yt - 1], [st], k=3))
        like = yt >= 4
        if 0 < like.sum() < len(like):
            assert got["auc"][t] == pytest.approx(roc_auc_score(like, st))
        else:
            assert np.isnan(got["auc"][t])
        assert got["n_like"][t] == like.sum() and got["n_query"][t] == m[t].sum()
    # constant scores: AUC exactly one half, nDCG@3 the mean over random orders
    flat = ranking.ranking_metrics(np.zeros((1, 4)), np.array([[5.0, 1, 1, 1]]), np.ones((1, 4), bool))
    assert flat["auc"][0] == 0.5
    disc = np.array([1, 1 / np.log2(3), 1 / np.log2(4)])  # gains 2**r - 1: 31, 1, 1, 1
    assert flat["ndcg@3"][0] == pytest.approx((34 / 4) * disc.sum() / (np.array([31, 1, 1]) @ disc))
    with pytest.raises(ValueError, match="NaN or inf"):
        ranking.ranking_metrics(np.full((1, 4), np.nan), np.ones((1, 4)), np.ones((1, 4), bool))
    with pytest.raises(ValueError, match="one shape"):
        ranking.ranking_metrics(np.zeros((2, 4)), np.ones((2, 3)), np.ones((2, 4), bool))


def test_unknown_films_score_below_every_known_film():
    full = np.array([[0.5, -2.0, 3.0], [1.0, 1.0, 1.0]])
    idx = np.array([[2, -1, 1], [-1, 0, -1]])
    out = ranking.lowest_for_unknown(full, idx)
    np.testing.assert_allclose(out, [[3.0, -3.0, -2.0], [0.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------------------------ the runner


@pytest.fixture(scope="module")
def user_cold(ml, llm):
    return run(ml, llm, "user-cold", k=5, seeds=(0, 1))


def test_every_method_is_scored_on_the_same_episodes_as_coldstart(user_cold, ml):
    pu = user_cold.per_user
    assert list(pu["method"].unique()) == list(ranking.RANKING_METHODS)
    pairs = {m: sorted(map(tuple, d[["seed", "user_id"]].to_numpy())) for m, d in pu.groupby("method")}
    first = next(iter(pairs.values()))
    assert all(p == first for p in pairs.values()) and len(first) >= 4
    for seed in (0, 1):
        d = cs.prepare_data(ml, "user-cold", 5, seed, CCFG, **SPLIT)
        assert sorted(pu[(pu.seed == seed) & (pu.method == "item_gpt")].user_id) == sorted(d.test_users.tolist())
    assert np.isfinite(pu["ndcg@3"]).all() and pu["ndcg@3"].between(0, 1).all()
    assert pu["auc"].dropna().between(0, 1).all()
    assert (pu["n_query"] == 10).all()
    assert set(pu["chapter"]) == {5, 7, 9}


def test_chapter5_methods_give_coldstart_numbers(user_cold, ml):
    """Same episodes, same fitted models: the in-query nDCG@3 of benchmark coldstart, user by user."""
    ch5 = [m for m, c in ranking.RANKING_CHAPTER.items() if c == 5]
    ref = cs.run_coldstart(ml, "user-cold", 5, seeds=(0, 1), methods=[cs.METHODS[m] for m in ch5], settings=CCFG,
                           progress=False, catalogue=False, **SPLIT).per_user
    got = user_cold.per_user[user_cold.per_user.method.isin(ch5)]
    a = got.set_index(["seed", "method", "user_id"])["ndcg@3"].sort_index()
    b = ref.set_index(["seed", "method", "user_id"])["ndcg@3"].sort_index()
    assert list(a.index) == list(b.index)
    np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-9, atol=1e-12)


def test_summary_and_cost(user_cold):
    s = reports.ranking_report(user_cold.per_user)
    assert list(s.index) == list(ranking.RANKING_METHODS)
    pu = user_cold.per_user
    for m in ("item_gpt", "head_maml"):
        d = pu[pu.method == m]
        assert s.loc[m, "ndcg@3"] == pytest.approx(d["ndcg@3"].mean())
        assert s.loc[m, "auc"] == pytest.approx(d["auc"].dropna().mean())
        assert s.loc[m, "ndcg@3 low"] <= s.loc[m, "ndcg@3"] <= s.loc[m, "ndcg@3 high"]
        assert s.loc[m, "users"] == len(d) and s.loc[m, "seeds"] == 2
    c = user_cold.cost[user_cold.cost.seed == 0].set_index("method")
    assert (c["adapt ms / user"] > 0).all() and (c["train s"] >= 0).all()
    head = 8 * 8 + 8 + 8 + 1  # components=8 -> d_proj=8 -> 1
    assert c.loc["head_global", "parameters"] == head and c.loc["head_global", "adapted / user"] == 0
    assert c.loc["head_maml", "adapted / user"] == head and c.loc["head_anil", "adapted / user"] == 9
    assert c.loc["head_logreg", "parameters"] == 0 and c.loc["head_logreg", "adapted / user"] == 9
    # residual: frozen global head + per-user start (w, b) + one step size per adapted number
    assert c.loc["head_residual", "adapted / user"] == 9 and c.loc["head_residual", "parameters"] == head + 9 + 9
    assert info_has_choice(user_cold.info[0])
    assert c.loc["item_gpt", "parameters"] > 0 and c.loc["item_gpt", "adapted / user"] == 0
    assert c.loc["item_gpt", "train s"] > 0
    assert pd.isna(c.loc["mf_foldin", "parameters"])  # chapter 5's sizes live in its own cost table
    info = user_cold.info[0]
    assert info["vocabulary"] > 0 and info["cooc_window"] in RCFG.gpt.cooc_windows and info["texts embedded"] > 0


def info_has_choice(info: dict) -> bool:
    return info.get("residual_learn_init") in (True, False) and info.get("logreg_l2") in RCFG.heads.logreg_l2s


def test_new_films_tie_for_id_models_but_not_for_text_heads(ml, llm):
    """Item-cold: every support and query film is new. The GPT, popularity and co-occurrence know none of
    them, so every query film ties (AUC exactly 0.5, nDCG@3 that of the global mean, which ties too);
    the LM heads read the films' text and tell them apart."""
    methods = ["global_mean", "popularity", "cooccurrence", "item_gpt", "head_global", "head_logreg"]
    res = run(ml, llm, "item-cold", k=5, methods=methods)
    pu = res.per_user.set_index(["method", "user_id"])
    ref = pu.loc["global_mean"]
    for m in ("popularity", "cooccurrence", "item_gpt"):
        d = pu.loc[m]
        assert (d["auc"].dropna() == 0.5).all() and d["auc"].notna().any()
        np.testing.assert_allclose(d["ndcg@3"], ref["ndcg@3"])
    assert res.info[0]["test query films unknown to the GPT"] == 1.0
    assert res.info[0]["test users with an empty prompt"] == len(ref)
    assert (pu.loc["head_logreg", "auc"].dropna() != 0.5).any()
    assert res.cost.set_index("method").loc["item_gpt", "train s"] == 0  # nothing it could rank: not trained


def test_a_method_does_not_depend_on_the_others(ml, llm, user_cold):
    alone = run(ml, llm, "user-cold", k=5, seeds=(1,), methods=["head_logreg", "cooccurrence"]).per_user
    joint = user_cold.per_user[(user_cold.per_user.seed == 1) & user_cold.per_user.method.isin(["head_logreg", "cooccurrence"])]
    np.testing.assert_allclose(alone["ndcg@3"].to_numpy(), joint["ndcg@3"].to_numpy())


def test_head_texts_carry_no_user_written_tags(ml, llm, monkeypatch):
    """Tags come from users, evaluated users included (chapter 1), so the heads read title, year and
    genres only: a tag planted on every rated film reaches no embedded text."""
    tags = pd.DataFrame({"user_id": ml.ratings.user_id, "item_id": ml.ratings.item_id, "tag": "plantedtag",
                         "timestamp": ml.ratings.timestamp.astype("int64") // 10**9})
    seen = []
    embed = ranking.lm.embed_texts
    monkeypatch.setattr(ranking.lm, "embed_texts", lambda texts, *a, **kw: seen.extend(texts) or embed(texts, *a, **kw))
    run(dataclasses.replace(ml, tags=tags), llm, "user-cold", k=5, methods=["head_global"])
    assert seen and all("Genres:" in t and "plantedtag" not in t for t in seen)


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("kw, match", [
    (dict(scenario="new-users"), "unknown scenario"),
    (dict(shots=0), "shots"),
    (dict(shots=True), "shots"),
    (dict(shots="10"), "shots"),
    (dict(methods=["gpt4"]), "methods"),
    (dict(methods=["popularity", "popularity"]), "duplicates"),
    (dict(seeds=[]), "seeds"),
])
def test_bad_input(ml, kw, match):
    args = dict(scenario="user-cold", shots=5, seeds=(0,), methods=["popularity"])
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        ranking.ranking_benchmark(ml, args.pop("scenario"), args.pop("shots"), **args)


def test_k_too_large_for_the_data(ml):
    with pytest.raises(ValueError, match="lower shots"):
        ranking.ranking_benchmark(ml, "user-cold", 95, methods=["popularity"], settings=RCFG)
    with pytest.raises(TypeError, match="RankingSettings"):
        ranking.ranking_benchmark(ml, "user-cold", 5, methods=["popularity"], settings=CCFG)


@pytest.mark.parametrize("argv, match", [
    (["ranking", "--scenario", "sideways"], "invalid choice: 'sideways'"),
    (["ranking", "--shots", "ten"], "expected an integer >= 1, got 'ten'"),
    (["ranking", "--shots", "5", "--out", "table.txt"], "must end in .csv or .json"),
    (["ranking", "--methods", "oracle"], "invalid choice: 'oracle'"),
])
def test_cli_bad_arguments_exit_2_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_cli_missing_input_exits_2_with_a_message(capsys):
    assert cli.main(["ranking-report", "--results", "/nonexistent"]) == 2
    assert "no ranking per-user file" in capsys.readouterr().err


def test_ranking_report_reads_the_runs(user_cold, tmp_path, capsys):
    for k in (5, 10):
        user_cold.per_user.assign(scenario="user-cold", k=k).to_csv(tmp_path / f"ranking_user-cold_k{k}_per_user.csv", index=False)
    assert cli.main(["ranking-report", "--results", str(tmp_path), "--out", str(tmp_path / "rep.csv")]) == 0
    rep = pd.read_csv(tmp_path / "rep.csv")
    assert len(rep) == 2 * len(ranking.RANKING_METHODS) and set(rep.k) == {5, 10}
    assert "item_gpt" in capsys.readouterr().out
