"""Tests for mrec_utils.tasks: cold-start splits, episodes, padding, leakage checks.

Synthetic frames check the definitions against plain loops; fixtures built to leak check that
every kind of leak is caught. Real-data tests (ml-latest-small) need MREC_DATA_DIR.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils.tasks import (
    MELU_PRESET,
    SCENARIOS,
    ItemIndex,
    LeakageError,
    NotEnoughRatingsError,
    Split,
    TaskBatch,
    check_no_leakage,
    collate_episodes,
    iterate_meta_batches,
    make_episodes,
    make_split,
    scenario_counts,
    visible_tags,
)

SMALL = dict(min_ratings=3, max_ratings=None)  # synthetic users have few new-item ratings


# --------------------------------------------------------------------------- fixtures


def synth_ratings(n_users: int = 80, n_items: int = 150, seed: int = 0) -> pd.DataFrame:
    """Items are released over time; each user rates in one to three sessions, preferring recently
    released items. Item ids are 10 * j (not contiguous, item 0 included); timestamps are tz-aware
    whole seconds; rows come in an arbitrary order."""
    rng = np.random.default_rng(seed)
    release = rng.uniform(0, 1000, n_items)
    rows = []
    for u in range(1, n_users + 1):
        seen: set[int] = set()
        for start in np.sort(rng.uniform(50, 1000, size=int(rng.integers(1, 4)))):
            avail = np.flatnonzero((release <= start) & ~np.isin(np.arange(n_items), list(seen)))
            w = np.exp((release[avail] - start) / 150)
            n = min(len(avail), int(rng.integers(8, 30)))
            items = rng.choice(avail, size=n, replace=False, p=w / w.sum())
            seen |= set(items.tolist())
            times = start + np.cumsum(rng.integers(1, 60, size=n)) / 3600
            rows += [(u, 10 * int(j), float(rng.integers(1, 11)) / 2, tt) for j, tt in zip(items, times)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    df["rating"] = df["rating"].astype("float64")
    df["timestamp"] = pd.to_datetime(np.round(1.4e9 + df["timestamp"] * 86400), unit="s", utc=True)
    return df.sample(frac=1.0, random_state=1).reset_index(drop=True)


@pytest.fixture(scope="module")
def ratings() -> pd.DataFrame:
    return synth_ratings()


@pytest.fixture(scope="module")
def splits(ratings) -> dict[str, Split]:
    return {sc: make_split(ratings, sc, seed=0, **SMALL) for sc in SCENARIOS}


def frame_pairs(df: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(df["user_id"].tolist(), df["item_id"].tolist()))


def plain_new_items(ratings: pd.DataFrame, cutoff) -> set[int]:
    first: dict[int, pd.Timestamp] = {}
    for i, tt in zip(ratings["item_id"].tolist(), ratings["timestamp"].tolist()):
        if i not in first or tt < first[i]:
            first[i] = tt
    return {i for i, tt in first.items() if tt > cutoff}


# --------------------------------------------------------------------------- split definitions


def test_user_cold_definition(ratings, splits):
    sp = splits["user-cold"]
    ev = set(sp.val_users) | set(sp.test_users)
    assert set(sp.val_users).isdisjoint(sp.test_users)
    assert ev.isdisjoint(set(sp.train["user_id"]))
    # train = every rating of every other user, eval pools = every rating of eval users
    expect_train = {p for p in frame_pairs(ratings) if p[0] not in ev}
    assert frame_pairs(sp.train) == expect_train
    for part, us in (("val", sp.val_users), ("test", sp.test_users)):
        f = getattr(sp, part)
        assert frame_pairs(f) == {p for p in frame_pairs(ratings) if p[0] in set(us)}
        assert f["can_support"].all() and f["can_query"].all()
    counts = ratings.groupby("user_id").size()
    n_el = int(((counts >= 3)).sum())
    assert len(sp.test_users) == round(0.2 * n_el) and len(sp.val_users) == round(0.1 * n_el)
    assert len(sp.new_items) == 0 and sp.cutoff is None


@pytest.mark.parametrize("scenario", ["item-cold", "user+item-cold"])
@pytest.mark.parametrize("cold_support", ["new", "old"])
def test_item_scenarios_definition(ratings, scenario, cold_support):
    sp = make_split(ratings, scenario, seed=3, cold_support=cold_support, **SMALL)
    ts = ratings["timestamp"]
    # cutoff is an observed timestamp at the lower 0.8 quantile
    assert (ts == sp.cutoff).any()
    assert (ts <= sp.cutoff).mean() >= 0.8 > (ts < sp.cutoff).mean()
    new = plain_new_items(ratings, sp.cutoff)
    assert set(sp.new_items.tolist()) == new and len(new) > 0
    assert not set(sp.train["item_id"]) & new
    ev = set(sp.val_users) | set(sp.test_users)
    assert set(sp.val_users).isdisjoint(sp.test_users)
    all_pairs = frame_pairs(ratings)
    if scenario == "item-cold":
        assert frame_pairs(sp.train) == {p for p in all_pairs if p[1] not in new}
        assert ev <= set(sp.train["user_id"])  # existing users
        n_el = len(sp.val_users) + len(sp.test_users)
        assert len(sp.val_users) == round(n_el * 0.1 / 0.3)
    else:
        assert frame_pairs(sp.train) == {p for p in all_pairs if p[1] not in new and p[0] not in ev}
    for part in ("val", "test"):
        f = getattr(sp, part)
        isnew = f["item_id"].isin(new)
        assert (f["can_query"] == isnew).all()
        if cold_support == "new":
            assert isnew.all() and f["can_support"].all()
        else:
            assert (f["can_support"] == ~isnew).all()
            users = set(f["user_id"])
            assert frame_pairs(f) == {p for p in all_pairs if p[0] in users}
    assert check_no_leakage(sp).ok


def test_new_items_are_first_rated_strictly_after_the_cutoff():
    # 10 distinct times; the lower 0.5 quantile is t=5: item 50 (first rated at 5) is old,
    # item 60 (first rated at 6) is new, item 10 (rated at 1 and 9) is old
    rows = [(1, 10, 1), (1, 20, 2), (2, 30, 3), (2, 40, 4), (3, 50, 5), (3, 60, 6), (4, 60, 7),
            (4, 70, 8), (5, 10, 9), (5, 80, 10)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(rating=3.0)
    sp = make_split(df, "item-cold", item_cutoff_quantile=0.5, min_ratings=1, max_ratings=None)
    assert sp.cutoff == 5
    assert sp.new_items.tolist() == [60, 70, 80]
    assert set(sp.train["item_id"]) == {10, 20, 30, 40, 50}
    assert check_no_leakage(sp).ok  # numeric timestamps and cutoff


def test_temporal_definition(ratings, splits):
    sp = splits["temporal"]
    m = sp.params["temporal_query_size"]
    ev = set(sp.val_users) | set(sp.test_users)
    held_out = set()
    for uid, g in ratings.groupby("user_id"):
        g = g.sort_values(["timestamp", "item_id"])
        if uid in ev:
            part = sp.val if uid in set(sp.val_users) else sp.test
            f = part[part["user_id"] == uid]
            assert set(f.loc[f["can_query"], "item_id"]) == set(g["item_id"].iloc[-m:])
            assert set(f.loc[f["can_support"], "item_id"]) == set(g["item_id"].iloc[:-m])
            held_out |= {(uid, i) for i in g["item_id"].iloc[-m:]}
    assert frame_pairs(sp.train) == frame_pairs(ratings) - held_out
    assert ev <= set(sp.train["user_id"])  # earlier interactions of eval users may train


def test_split_independent_of_row_order_and_seeded(ratings):
    a = make_split(ratings, "user+item-cold", seed=5, **SMALL)
    b = make_split(ratings.iloc[::-1].reset_index(drop=True), "user+item-cold", seed=5, **SMALL)
    pd.testing.assert_frame_equal(a.train, b.train)
    pd.testing.assert_frame_equal(a.test, b.test)
    np.testing.assert_array_equal(a.test_users, b.test_users)
    for sc in ("user-cold", "temporal", "user+item-cold"):
        s1, s2 = (make_split(ratings, sc, seed=s, **SMALL) for s in (1, 2))
        assert not np.array_equal(s1.test_users, s2.test_users), sc


def test_scenario_counts_match_frames(splits):
    for sc, sp in splits.items():
        c = scenario_counts(sp)
        assert list(c.index) == ["train", "val", "test"]
        for part in ("train", "val", "test"):
            f = getattr(sp, part)
            assert c.loc[part, "interactions"] == len(f)
            assert c.loc[part, "users"] == len(set(f["user_id"]))
            assert c.loc[part, "items"] == len(set(f["item_id"]))
            assert c.loc[part, "new_items"] == len(set(f["item_id"]) & set(sp.new_items.tolist()))
        assert c.loc["train", "query_candidates"] == 0
        assert c.loc["test", "users"] == len(sp.test_users)
        assert c.attrs["scenario"] == sc


# --------------------------------------------------------------------------- episodes


def test_episode_sizes_disjoint_and_from_pools(splits):
    for sc, sp in splits.items():
        k, n = 2, 2
        for order in ("random", "time"):
            eps = make_episodes(sp, "test", k_support=k, n_query=n, seed=0, order=order, on_short="skip")
            assert len(eps) > 0, (sc, order)
            for e in eps:
                assert e.k == k and e.n == n
                assert not set(e.support_items) & set(e.query_items)
                f = sp.test[sp.test["user_id"] == e.user_id].set_index("item_id")
                assert f.loc[e.support_items, "can_support"].all()
                assert f.loc[e.query_items, "can_query"].all()
                np.testing.assert_array_equal(e.query_ratings, f.loc[e.query_items, "rating"].to_numpy())
                assert np.all(np.diff(e.support_times) >= 0) and np.all(np.diff(e.query_times) >= 0)
            assert check_no_leakage(sp, eps).ok, (sc, order, check_no_leakage(sp, eps))


def test_time_order_semantics(ratings, splits):
    # user-cold, time order: the first k ratings are support, the next n the query
    sp = splits["user-cold"]
    eps = make_episodes(sp, "test", k_support=4, n_query=3, order="time")
    for e in eps:
        g = ratings[ratings.user_id == e.user_id].sort_values(["timestamp", "item_id"])
        np.testing.assert_array_equal(e.support_items, g.item_id.iloc[:4].to_numpy())
        np.testing.assert_array_equal(e.query_items, g.item_id.iloc[4:7].to_numpy())
    # k_support=None: the query is the latest n, the support everything before
    eps = make_episodes(sp, "test", k_support=None, n_query=3, order="time")
    for e in eps:
        g = ratings[ratings.user_id == e.user_id].sort_values(["timestamp", "item_id"])
        np.testing.assert_array_equal(e.query_items, g.item_id.iloc[-3:].to_numpy())
        np.testing.assert_array_equal(e.support_items, g.item_id.iloc[:-3].to_numpy())
    # temporal, time order: the k most recent earlier ratings and the first n of the query pool
    sp = splits["temporal"]
    eps = make_episodes(sp, "test", k_support=5, n_query=4, order="time")
    for e in eps:
        g = ratings[ratings.user_id == e.user_id].sort_values(["timestamp", "item_id"])
        np.testing.assert_array_equal(e.support_items, g.item_id.iloc[-15:-10].to_numpy())
        np.testing.assert_array_equal(e.query_items, g.item_id.iloc[-10:-6].to_numpy())


def test_episodes_deterministic_and_seed_dependent(splits):
    sp = splits["user-cold"]
    kw = dict(k_support=5, n_query=5)
    a = make_episodes(sp, "test", seed=7, **kw)
    b = make_episodes(sp, "test", seed=7, **kw)
    c = make_episodes(sp, "test", seed=8, **kw)
    for x, y in zip(a, b):
        for f in ("support_items", "query_items", "support_ratings", "query_times"):
            np.testing.assert_array_equal(getattr(x, f), getattr(y, f))
    assert any(not np.array_equal(x.support_items, z.support_items) for x, z in zip(a, c))


def test_episode_of_a_user_does_not_depend_on_the_list(ratings):
    users = np.unique(ratings.user_id)
    kw = dict(k_support=4, n_query=3, seed=11)
    full = {e.user_id: e for e in make_episodes(ratings, users, **kw)}
    some = make_episodes(ratings, users[::-3], **kw)
    one = make_episodes(ratings, [int(users[5])], **kw)
    assert [e.user_id for e in some] == users[::-3].tolist()  # order of the request
    for e in some + one:
        np.testing.assert_array_equal(e.support_items, full[e.user_id].support_items)
        np.testing.assert_array_equal(e.query_items, full[e.user_id].query_items)


def test_query_pool_on_a_frame(ratings, splits):
    new = splits["item-cold"].new_items
    eps = make_episodes(ratings, None, k_support=3, n_query=1, query_pool=new, on_short="skip")
    assert eps
    for e in eps:
        assert np.isin(e.query_items, new).all() and not np.isin(e.support_items, new).any()


def test_melu_preset_sizes():
    counts = [5, 12, 13, 40, 100, 101, 250]
    rows = [(u, i, 3.0, u * 1000 + i) for u, c in enumerate(counts, start=1) for i in range(1, c + 1)]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    eps = make_episodes(df, None, preset="melu", seed=0)
    assert [e.user_id for e in eps] == [3, 4, 5]  # 13..100 ratings only
    for e, c in zip(eps, [13, 40, 100]):
        assert e.n == 10 == MELU_PRESET.n_query and e.k == c - 10
    assert make_episodes(df, None, preset=MELU_PRESET)[0].k == 3
    with pytest.raises(ValueError, match="preset"):
        make_episodes(df, None, preset="melu", k_support=5)


# --------------------------------------------------------------------------- errors


def test_unknown_scenario_lists_valid_ones(ratings):
    with pytest.raises(ValueError) as ei:
        make_split(ratings, "cold-user")
    for sc in SCENARIOS:
        assert sc in str(ei.value)


def test_k_larger_than_history_is_explained(ratings):
    uid = int(ratings.user_id.iloc[0])
    n_u = int((ratings.user_id == uid).sum())
    with pytest.raises(NotEnoughRatingsError) as ei:
        make_episodes(ratings, [uid], k_support=n_u, n_query=1)
    msg = str(ei.value)
    assert f"user {uid}" in msg and f"{n_u} candidate ratings" in msg
    assert f"k_support={n_u}" in msg and "min_ratings" in msg
    assert make_episodes(ratings, [uid], k_support=n_u, n_query=1, on_short="skip") == []
    assert len(make_episodes(ratings, [uid], k_support=n_u - 1, n_query=1)) == 1


def test_empty_scenario_names_the_filter(ratings):
    with pytest.raises(ValueError, match=r"min_ratings=500.*removed every user"):
        make_split(ratings, "user-cold", min_ratings=500, max_ratings=None)
    with pytest.raises(ValueError, match="min_ratings=40"):
        make_split(ratings, "item-cold", min_ratings=40, max_ratings=None)
    with pytest.raises(ValueError, match="temporal_query_size=100"):
        make_split(ratings, "temporal", temporal_query_size=100, max_ratings=None)


@pytest.mark.parametrize(
    "kwargs, err, pattern",
    [
        (dict(test_frac=0.0), ValueError, "test_frac"),
        (dict(test_frac=0.6, val_frac=0.5), ValueError, "< 1"),
        (dict(item_cutoff_quantile=1.0), ValueError, "item_cutoff_quantile"),
        (dict(cold_support="both"), ValueError, "cold_support"),
    ],
)
def test_bad_split_parameters(ratings, kwargs, err, pattern):
    with pytest.raises(err, match=pattern):
        make_split(ratings, "item-cold", **kwargs)


def test_bad_ratings_frames(ratings):
    with pytest.raises(TypeError, match="DataFrame"):
        make_split(ratings.to_numpy(), "user-cold")
    with pytest.raises(ValueError, match="missing column"):
        make_split(ratings.rename(columns={"user_id": "userId"}), "user-cold")
    with pytest.raises(ValueError, match="repeated"):
        make_split(pd.concat([ratings, ratings.iloc[:1]]), "user-cold")
    bad = ratings.copy()
    bad["item_id"] = bad["item_id"].astype(float)
    with pytest.raises(TypeError, match="item_id"):
        make_split(bad, "user-cold")
    bad = ratings.copy()
    bad.loc[0, "rating"] = np.nan
    with pytest.raises(ValueError, match="missing values"):
        make_split(bad, "user-cold")
    with pytest.raises(ValueError, match="empty"):
        make_split(ratings.iloc[:0], "user-cold")


def test_bad_episode_arguments(ratings, splits):
    sp = splits["user-cold"]
    with pytest.raises(TypeError, match="k_support"):
        make_episodes(sp, "test")
    with pytest.raises(ValueError, match="not evaluation users"):
        make_episodes(sp, sp.train_users[:2], k_support=1, n_query=1)
    with pytest.raises(ValueError, match="order"):
        make_episodes(sp, "test", k_support=1, n_query=1, order="reverse")
    with pytest.raises(ValueError, match="both be None"):
        make_episodes(sp, "test", k_support=None, n_query=None)
    with pytest.raises(ValueError, match="no interactions"):
        make_episodes(ratings, [10**9], k_support=1, n_query=1)
    with pytest.raises(ValueError, match="unknown preset"):
        make_episodes(ratings, None, preset="maml")
    with pytest.raises(TypeError, match="query_pool"):
        make_episodes(sp, "test", k_support=1, n_query=1, query_pool=[1])


# --------------------------------------------------------------------------- leakage checks


def _inject(split: Split, **frames) -> Split:
    return dataclasses.replace(split, **frames)


def _codes(rep) -> set[str]:
    """The problem codes of a LeakageReport: each problem reads "<code>: <message>"."""
    return {p.split(":", 1)[0] for p in rep.problems}


def _add_rows(df: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([df, rows[df.columns.intersection(rows.columns)]], ignore_index=True)


def test_clean_splits_pass(splits):
    for sc, sp in splits.items():
        rep = check_no_leakage(sp)
        assert rep.ok, str(rep)
        rep.raise_if_bad()
        assert len(rep.checks) >= 2


def test_leak_query_in_support(splits):
    sp = splits["user-cold"]
    eps = make_episodes(sp, "test", k_support=3, n_query=3)
    e = eps[0]
    bad = dataclasses.replace(e, support_items=np.r_[e.support_items[:-1], e.query_items[:1]])
    rep = check_no_leakage(sp, [bad] + eps[1:])
    assert _codes(rep) == {"query-in-support"} and f"user {e.user_id}" in rep.problems[0]
    with pytest.raises(LeakageError, match="query-in-support"):
        rep.raise_if_bad()
    with pytest.raises(AssertionError):
        rep.raise_if_bad()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_leak_query_in_train(splits, scenario):
    sp = splits[scenario]
    row = sp.test[sp.test["can_query"]].iloc[:1]
    leaky = _inject(sp, train=_add_rows(sp.train, row))
    rep = check_no_leakage(leaky)
    assert "query-in-train" in _codes(rep), str(rep)
    # the same leak seen through an episode whose query contains that interaction
    uid, item = int(row.user_id.iloc[0]), int(row.item_id.iloc[0])
    e = make_episodes(sp, [uid], k_support=1, n_query=1, on_short="raise")[0]
    eps = [dataclasses.replace(e, query_items=np.array([item]))]
    rep = check_no_leakage(_inject(sp, train=_add_rows(sp.train, row)), eps)
    assert any(p.startswith("query-in-train") and "episode" in p for p in rep.problems)


@pytest.mark.parametrize("scenario", ["user-cold", "user+item-cold"])
def test_leak_test_user_in_train(splits, scenario):
    sp = splits[scenario]
    uid = int(sp.test_users[0])
    # a support-only kind of row: an old-item rating of the test user (not a query candidate)
    row = pd.DataFrame({"user_id": [uid], "item_id": [10**6], "rating": [3.0],
                        "timestamp": [sp.train["timestamp"].iloc[0]]})
    rep = check_no_leakage(_inject(sp, train=_add_rows(sp.train, row)))
    assert _codes(rep) == {"user-overlap"}, str(rep)
    assert str(uid) in rep.problems[0]
    eps = make_episodes(sp, [uid], k_support=1, n_query=1)
    rep = check_no_leakage(_inject(sp, train=_add_rows(sp.train, row)), eps)
    assert any(p.startswith("user-overlap: episode user") for p in rep.problems)
    # item-cold and temporal allow evaluation users in train: same row is fine there
    assert check_no_leakage(_inject(splits["temporal"], train=_add_rows(
        splits["temporal"].train, row.assign(timestamp=splits["temporal"].train["timestamp"].min())))).ok


@pytest.mark.parametrize("scenario", ["item-cold", "user+item-cold"])
def test_leak_new_item_in_train(splits, scenario):
    sp = splits[scenario]
    new_item = int(sp.new_items[0])
    row = pd.DataFrame({"user_id": [10**6], "item_id": [new_item], "rating": [4.0],
                        "timestamp": [sp.train["timestamp"].max()]})
    rep = check_no_leakage(_inject(sp, train=_add_rows(sp.train, row)))
    assert _codes(rep) == {"new-item-in-train"}, str(rep)
    assert str(new_item) in rep.problems[0]
    # a query on an old item breaks the scenario too
    e = make_episodes(sp, "test", k_support=1, n_query=1, on_short="skip")[0]
    old_item = int(sp.train["item_id"].iloc[0])
    rep = check_no_leakage(sp, [dataclasses.replace(e, query_items=np.array([old_item]))])
    assert "query-not-new" in _codes(rep)


def test_leak_time_order_temporal(splits):
    sp = splits["temporal"]
    eps = make_episodes(sp, "test", k_support=3, n_query=3)
    assert check_no_leakage(sp, eps).ok
    # (1) an episode whose support is later than its query
    e = eps[0]
    late = dataclasses.replace(e, support_times=e.support_times + 1e9)
    rep = check_no_leakage(sp, [late] + eps[1:])
    assert _codes(rep) == {"time-order"}, str(rep)
    # (2) a training interaction of an evaluation user after their first query
    uid = int(sp.test_users[0])
    tr = sp.train.copy()
    idx = tr.index[tr["user_id"] == uid][0]
    tr.loc[idx, "timestamp"] = sp.test["timestamp"].max() + pd.Timedelta(days=1)
    rep = check_no_leakage(_inject(sp, train=tr))
    assert _codes(rep) == {"train-after-query"} and str(uid) in rep.problems[0]
    assert "train-after-query" in _codes(check_no_leakage(_inject(sp, train=tr), eps))
    # (2b) the same through an episode alone: its query predates the user's training data
    early = dataclasses.replace(e, query_times=np.full(e.n, e.support_times.min() - 1e6))
    rep = check_no_leakage(sp, [early])
    assert {"train-after-query", "time-order"} <= _codes(rep), str(rep)
    # (3) a support candidate later than a query candidate in the evaluation frame
    te = sp.test.copy()
    idx = te.index[(te["user_id"] == uid) & te["can_support"]][0]
    te.loc[idx, "timestamp"] = te["timestamp"].max() + pd.Timedelta(days=2)
    rep = check_no_leakage(_inject(sp, test=te))
    assert "time-order" in _codes(rep)


def test_leak_val_test_overlap(splits):
    sp = splits["user-cold"]
    rep = check_no_leakage(_inject(sp, val_users=np.r_[sp.val_users, sp.test_users[:1]]))
    assert _codes(rep) == {"user-overlap"}


# --------------------------------------------------------------------------- batching


def _episodes(splits, k=4, n=3):
    sp = splits["user-cold"]
    # different sizes: random k in 1..k, n in 1..n via two calls and a mix
    a = make_episodes(sp, "test", k_support=k, n_query=n, seed=0)
    b = make_episodes(sp, "test", k_support=1, n_query=n + 2, seed=1)
    c = make_episodes(sp, "test", k_support=None, n_query=2, seed=2)
    return [a[0], b[1], c[2], a[3], b[4]]


def test_collate_padding_and_masks(ratings, splits):
    eps = _episodes(splits)
    index = ItemIndex.from_ids(ratings.item_id)
    batch = collate_episodes(eps, item_index=index)
    T = len(eps)
    S, Q = max(e.k for e in eps), max(e.n for e in eps)
    assert isinstance(batch, TaskBatch) and len(batch) == T
    assert batch.x_support.shape == (T, S) and batch.x_query.shape == (T, Q)
    assert batch.x_support.dtype == torch.long and batch.y_support.dtype == torch.float64
    assert batch.mask_support.dtype == torch.bool
    assert batch.mask_support.sum(1).tolist() == [e.k for e in eps]
    assert batch.mask_query.sum(1).tolist() == [e.n for e in eps]
    for r, e in enumerate(eps):
        np.testing.assert_array_equal(index.decode(batch.x_support[r, : e.k].numpy()), e.support_items)
        np.testing.assert_array_equal(batch.y_query[r, : e.n].numpy(), e.query_ratings)
        assert (batch.x_support[r, e.k:] == index.pad_index).all()
        assert (batch.y_support[r, e.k:] == 0).all() and not batch.mask_support[r, e.k:].any()
        assert (batch.x_query[r, e.n:] == index.pad_index).all()
    assert index.pad_index == len(index)
    # raw ids: padded with -1 (never a valid embedding row)
    raw = collate_episodes(eps)
    assert (raw.x_support[~raw.mask_support] == -1).all()
    assert raw.x_support[0, : eps[0].k].tolist() == eps[0].support_items.tolist()
    with pytest.raises(ValueError, match="empty"):
        collate_episodes([])
    # subset and masks: None means "all real"
    sub = batch.subset([3, 1])
    assert torch.equal(sub.x_support, batch.x_support[[3, 1]]) and torch.equal(sub.mask_query, batch.mask_query[[3, 1]])
    plain = TaskBatch(batch.x_support, batch.y_support, batch.x_query, batch.y_query)
    assert plain.mask_support.all() and plain.mask_query.shape == batch.y_query.shape


def test_collate_featurize_never_sees_padding(ratings, splits):
    eps = _episodes(splits)
    index = ItemIndex.from_ids(ratings.item_id)
    table = torch.randn(len(index), 3)  # no padding row: a padded lookup would raise
    seen = []

    def featurize(idx):
        seen.append(idx.clone())
        return table[idx]

    batch = collate_episodes(eps, featurize=featurize, item_index=index)
    items = collate_episodes(eps, item_index=index).x_support
    assert all((s < len(index)).all() for s in seen)
    assert batch.x_support.shape == items.shape + (3,)
    m = batch.mask_support
    torch.testing.assert_close(batch.x_support[m], table[items[m]])
    assert (batch.x_support[~m] == 0).all() and (batch.x_query[~batch.mask_query] == 0).all()


def test_vmap_over_padded_tasks_matches_a_loop(splits):
    eps = _episodes(splits)
    batch = collate_episodes(eps)

    def task_loss(s_r, s_m, q_r, q_m):  # predict the query by the support mean, masked MSE
        mu = (s_r * s_m).sum() / s_m.sum()
        return (((q_r - mu) ** 2) * q_m).sum() / q_m.sum()

    got = torch.func.vmap(task_loss)(
        batch.y_support, batch.mask_support.float(), batch.y_query, batch.mask_query.float()
    )
    want = [float(np.mean((e.query_ratings - np.mean(e.support_ratings)) ** 2)) for e in eps]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6)


def test_iterate_meta_batches(splits):
    eps = make_episodes(splits["user-cold"], "test", k_support=2, n_query=2)
    batches = list(iterate_meta_batches(eps, batch_size=5, seed=0))
    assert [len(b) for b in batches] == [5] * (len(eps) // 5) + ([len(eps) % 5] if len(eps) % 5 else [])
    order = np.random.default_rng(0).permutation(len(eps))  # a seeded permutation, one pass
    want = collate_episodes([eps[i] for i in order])
    assert torch.equal(torch.cat([b.x_query for b in batches]), want.x_query)
    other = torch.cat([b.x_query for b in iterate_meta_batches(eps, 5, seed=1)])
    assert not torch.equal(other, want.x_query) and sorted(other[:, 0].tolist()) == sorted(want.x_query[:, 0].tolist())
    with pytest.raises(ValueError):
        next(iterate_meta_batches(eps, 0))


def test_item_index():
    index = ItemIndex.from_ids([30, 0, 10, 10, 7])
    assert index.item_ids.tolist() == [0, 7, 10, 30] and index.pad_index == 4 and len(index) == 4
    np.testing.assert_array_equal(index.encode([[10, 0], [30, 7]]), [[2, 0], [3, 1]])
    np.testing.assert_array_equal(index.decode(index.encode([30, 0, 7])), [30, 0, 7])
    with pytest.raises(KeyError, match="not in this ItemIndex"):
        index.encode([5])
    np.testing.assert_array_equal(index.encode([5, 40, 7], unknown="pad"), [4, 4, 1])
    with pytest.raises(IndexError):
        index.decode([4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_collate_on_cuda(splits):
    eps = _episodes(splits)
    table = torch.randn(10**4, 2, device="cuda")
    b = collate_episodes(eps, device="cuda", featurize=lambda i: table[i % 10**4])
    assert b.x_support.is_cuda and b.y_support.is_cuda and b.mask_support.is_cuda
    assert b.to("cpu").x_support.device.type == "cpu"


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def ml_ratings():
    if not os.environ.get("MREC_DATA_DIR"):
        pytest.skip("set MREC_DATA_DIR to run the MovieLens tests")
    from mrec_utils.data import load_movielens

    return load_movielens("ml-latest-small").ratings


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_real_data_no_leakage(ml_ratings, scenario):
    t0 = time.perf_counter()
    sp = make_split(ml_ratings, scenario, seed=0)
    t_split = time.perf_counter() - t0
    eps = {}
    for part in ("val", "test"):
        eps[part] = make_episodes(sp, part, preset="melu", seed=0)
        assert len(eps[part]) == len(getattr(sp, f"{part}_users")) > 0
        assert all(e.n == 10 and 3 <= e.k <= 90 for e in eps[part])
    rep = check_no_leakage(sp, eps["val"] + eps["test"])
    assert rep.ok, str(rep)
    # the same facts, checked without check_no_leakage
    train_pairs = frame_pairs(sp.train)
    assert not any((e.user_id, i) in train_pairs for e in eps["test"] for i in e.query_items.tolist())
    if scenario in ("user-cold", "user+item-cold"):
        assert not set(sp.test_users.tolist()) & set(sp.train["user_id"].tolist())
    if scenario in ("item-cold", "user+item-cold"):
        assert not set(sp.train["item_id"].tolist()) & set(sp.new_items.tolist())
    counts = scenario_counts(sp)
    print(f"\n{scenario} (split {t_split:.3f} s, cutoff {sp.cutoff})\n{counts.to_string()}")
    assert counts.loc["test", "users"] == len(sp.test_users)
    assert t_split < 2.0


def test_real_data_episodes_for_all_users_are_fast(ml_ratings):
    users = np.unique(ml_ratings.user_id)
    t0 = time.perf_counter()
    eps = make_episodes(ml_ratings, users, k_support=10, n_query=10, seed=0)
    t_eps = time.perf_counter() - t0
    assert len(eps) == len(users) == 610  # every user has >= 20 ratings
    t0 = time.perf_counter()
    mel = make_episodes(ml_ratings, users, preset="melu", seed=0)
    t_mel = time.perf_counter() - t0
    counts = ml_ratings.groupby("user_id").size()
    assert len(mel) == int(((counts >= 13) & (counts <= 100)).sum())
    print(f"\nmake_episodes, all {len(users)} users: {t_eps:.3f} s (k=10, n=10), {t_mel:.3f} s (melu)")
    assert t_eps < 2.0 and t_mel < 2.0


# --------------------------------------------------------------------------- leakage through item text


def _tags_of(ratings: pd.DataFrame, frac: float, seed: int = 0) -> pd.DataFrame:
    """Tags as MovieLens has them: some rated (user, item) pairs get a tag, at the rating's time."""
    rows = ratings.sample(frac=frac, random_state=seed)
    return pd.DataFrame({"user_id": rows["user_id"].to_numpy(), "item_id": rows["item_id"].to_numpy(),
                         "tag": "planted", "timestamp": rows["timestamp"].to_numpy()})


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_planted_tag_leaks_are_caught_and_visible_tags_removes_exactly_them(ratings, splits, scenario):
    sp = splits[scenario]
    tags = _tags_of(ratings, 0.3)
    rep = check_no_leakage(sp, tags=tags)
    assert "tag-leak" in _codes(rep), rep  # every scenario holds something back that a tag can reveal
    kept = visible_tags(sp, tags)
    assert check_no_leakage(sp, tags=kept).ok
    # plain loop: which tags may a model of this split read?
    held_out = set(sp.val_users.tolist()) | set(sp.test_users.tolist())
    ev = pd.concat([sp.val, sp.test])
    first_query = ev[ev["can_query"]].groupby("user_id")["timestamp"].min().to_dict()
    expect = []
    for u, t in zip(tags["user_id"].tolist(), tags["timestamp"].tolist()):
        ok = not (scenario in ("user-cold", "user+item-cold") and u in held_out)
        ok &= sp.cutoff is None or t <= sp.cutoff
        ok &= not (scenario == "temporal" and u in first_query and t >= first_query[u])
        expect.append(ok)
    assert kept.index.tolist() == tags.index[np.array(expect)].tolist()
    # tags on training interactions of training users, before every cutoff: nothing to report
    safe = tags[tags.index.isin(kept.index)]
    assert visible_tags(sp, safe).equals(safe)


def test_visible_tags_refuses_a_frame_without_times(splits):
    with pytest.raises(TypeError, match="MovieLens.tags"):
        visible_tags(splits["user-cold"], pd.DataFrame({"user_id": [1], "item_id": [10], "tag": ["x"]}))
