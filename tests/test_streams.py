"""Rating streams (chapter 6): time-ordered replay, recency-weighted inner loss, strategies.

The reference implementations here are plain loops with ``torch.autograd`` on a copy of the
model, written independently of ``mrec_utils.meta`` / ``torch.func``.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import coldstart as cs
from mrec_utils import meta
from mrec_utils import streams as S
from mrec_utils.models import MeLURatingModel, build_features, melu_adapt_spec
from mrec_utils.streams import Continual, Readapt, Static

GENRES = ["Action", "Comedy", "Drama", "Horror"]


def stream_frames(n_users: int = 6, n_items: int = 20, seed: int = 0):
    """(ratings, items) in the MovieLens schema; users have 5..12 ratings, some in the same second."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        n = int(rng.integers(5, 13))
        its = rng.choice(n_items, size=n, replace=False) + 1
        ts = 1_000_000_000 + np.sort(rng.integers(0, 5, n)) * 3600 * 24 * rng.integers(1, 3)
        rows += [(u, int(i), float(rng.integers(1, 11)) / 2, int(t)) for i, t in zip(its, ts)]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    ratings["rating"] = ratings["rating"].astype(np.float64)
    ratings["timestamp"] = pd.to_datetime(ratings["timestamp"], unit="s", utc=True)
    items = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1, dtype=np.int64),
        "title": [f"Movie {i}" for i in range(1, n_items + 1)],
        "year": pd.array(rng.integers(1950, 2015, n_items), dtype="Int64"),
        "genres": [[GENRES[j] for j in rng.choice(4, size=rng.integers(1, 3), replace=False)] for _ in range(n_items)],
    })
    return ratings, items


@pytest.fixture(scope="module")
def setup():
    ratings, items = stream_frames()
    feats = build_features(items, ratings[ratings.user_id <= 3], None)
    torch.manual_seed(0)
    model = MeLURatingModel(feats.genre_matrix, feats.year_bucket, 8, feats.n_item_rows, (), emb_dim=4,
                               hidden=(6, 5), offset=3.0)
    streams = S.make_streams(feats, ratings)
    params, frozen = meta.split_params(model, melu_adapt_spec("head"))
    return ratings, items, feats, model, params, frozen, streams


def sgd_copy(model, x, y, weights, lr, steps, prefixes=("decision", "out")):
    """A copy of ``model`` after ``steps`` SGD steps on sum_j weights_j (f(x_j) - y_j)^2 (plain autograd)."""
    m = copy.deepcopy(model)
    ps = [p for n, p in m.named_parameters() if n.startswith(prefixes)]
    for _ in range(steps):
        loss = (weights * (m(x) - y) ** 2).sum()
        grads = torch.autograd.grad(loss, ps)
        with torch.no_grad():
            for p, g in zip(ps, grads):
                p -= lr * g
    return m


# --------------------------------------------------------------------------------------------
# Recency weights and the weighted inner loss
# --------------------------------------------------------------------------------------------


def test_recency_weights_normalisation_and_ratios():
    ages = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    w = S.recency_weights(ages, mask, 0.5)
    torch.testing.assert_close(w.sum(1), torch.tensor([4.0, 2.0]))  # each row sums to its count n
    assert w[0, 4] == 0 and (w[1, 2:] == 0).all()  # padding
    torch.testing.assert_close(w[0, :3] / w[0, 1:4], torch.full((3,), 0.5))  # ratio gamma per unit of age
    expected = 4 * torch.tensor([0.125, 0.25, 0.5, 1.0]) / 1.875
    torch.testing.assert_close(w[0, :4], expected)
    torch.testing.assert_close(S.recency_weights(ages, mask, 1.0), mask.to(torch.get_default_dtype()))  # gamma = 1: plain mean
    # long histories: no underflow to 0/0
    long = torch.arange(5000, dtype=torch.float64).flip(0)[None]
    wl = S.recency_weights(long, torch.ones_like(long, dtype=torch.bool), 0.5)
    assert torch.isfinite(wl).all() and abs(float(wl.sum()) - 5000) < 1e-2
    torch.testing.assert_close(wl[0, -1], torch.tensor(5000 * 0.5))  # newest: n (1 - gamma)
    # an all-padding row gives zeros, not NaN
    assert (S.recency_weights(ages, torch.zeros_like(mask), 0.7) == 0).all()


def test_weighted_inner_step_is_the_weighted_mean_loss(setup):
    """adapt_batch with recency_weights takes a step on sum_j w~_j e_j^2 with w~ summing to 1."""
    _, _, _, model, params, frozen, st = setup
    n = int(st.lengths[0])
    x, y, m = st.x[:1, :n], st.y[:1, :n], st.mask[:1, :n]
    ages = torch.arange(n - 1, -1, -1, dtype=torch.float64)[None]
    gamma, lr = 0.6, 0.2
    w = S.recency_weights(ages, m, gamma)
    ad = S.adapt_weighted(model, params, frozen, x, y, m, w, steps=2, lr=lr)
    w_tilde = gamma ** ages[0] / (gamma ** ages[0]).sum()
    ref = sgd_copy(model, x[0], y[0], w_tilde.float(), lr, steps=2)
    for k in ad:
        torch.testing.assert_close(ad[k][0], dict(ref.named_parameters())[k].detach(), atol=1e-6, rtol=1e-5)
    # and it is not the unweighted step
    plain = cs.adapt_batch(model, params, frozen, x, y, m, steps=2, lr=lr)
    assert not torch.allclose(plain["out.weight"], ad["out.weight"])


def test_weights_one_are_the_plain_step_and_weight_zero_drops_a_rating(setup):
    _, _, _, model, params, frozen, _ = setup
    xs = torch.tensor([[[0, 0], [1, 1], [3, 2]], [[1, 1], [2, 0], [0, 0]]])
    ys = torch.tensor([[5.0, 1.0, 3.0], [2.0, 4.0, 0.0]])
    ms = torch.tensor([[True, True, True], [True, True, False]])
    plain = cs.adapt_batch(model, params, frozen, xs, ys, ms, steps=3, lr=0.2)
    ones = S.adapt_weighted(model, params, frozen, xs, ys, ms, torch.ones(2, 3), steps=3, lr=0.2)
    for k in plain:
        torch.testing.assert_close(plain[k], ones[k])
    # weight 0 on a rating = leaving it out, up to the 1/n of the mean (n counts it): rescale lr
    zero = S.adapt_weighted(model, params, frozen, xs, ys, ms, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
                            steps=1, lr=0.3)
    ms2 = ms.clone()
    ms2[0, 2] = False
    dropped = cs.adapt_batch(model, params, frozen, xs, ys, ms2, steps=1, lr=0.2)
    for k in plain:
        torch.testing.assert_close(zero[k][0], dropped[k][0])


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------


def test_make_streams_order_ties_and_row_order(setup):
    ratings, _, feats, _, _, _, st = setup
    assert st.x.shape[:2] == st.y.shape == st.mask.shape == st.days.shape == st.item_ids.shape
    assert st.user_ids.tolist() == sorted(ratings.user_id.unique().tolist())
    lengths = ratings.groupby("user_id").size().to_numpy()
    assert st.lengths.tolist() == lengths.tolist()
    for u, uid in enumerate(st.user_ids):
        n = lengths[u]
        assert st.mask[u, :n].all() and not st.mask[u, n:].any()
        d = st.days[u, :n].numpy()
        assert d[0] == 0 and (np.diff(d) >= 0).all()  # time order
        mine = ratings[ratings.user_id == uid]
        assert sorted(st.item_ids[u, :n].tolist()) == sorted(mine.item_id.tolist())
        got = dict(zip(st.item_ids[u, :n].tolist(), st.y[u, :n].tolist()))
        assert got == dict(zip(mine.item_id.tolist(), mine.rating.tolist()))
        torch.testing.assert_close(st.x[u, :n], torch.as_tensor(feats.encode(np.full(n, uid), st.item_ids[u, :n])))
    # ties (same second) are broken by the seed, not by the input's row order
    shuffled_rows = ratings.sample(frac=1.0, random_state=1)
    again = S.make_streams(feats, shuffled_rows)
    assert np.array_equal(again.item_ids, st.item_ids)
    ties = ratings.duplicated(["user_id", "timestamp"], keep=False).any()
    assert ties, "the fixture must contain same-second ratings"
    other = [S.make_streams(feats, ratings, seed=s).item_ids for s in range(1, 6)]
    assert any(not np.array_equal(o, st.item_ids) for o in other), "the seed should reorder some ties"
    for o in other:  # but only within a second: the time sequence is the same
        assert np.array_equal(np.sort(o, 1), np.sort(st.item_ids, 1))


def test_make_streams_options_and_errors(setup):
    ratings, _, feats, _, _, _, st = setup
    short = S.make_streams(feats, ratings, users=[3, 1], max_len=4)
    assert short.user_ids.tolist() == [3, 1] and short.y.shape == (2, 4)
    assert np.array_equal(short.item_ids[1], st.item_ids[0, :4])  # the *first* ratings are kept
    with pytest.raises(ValueError, match="without any rating"):
        S.make_streams(feats, ratings, users=[999])
    with pytest.raises(ValueError, match="min_len"):
        S.make_streams(feats, ratings, min_len=100)
    with pytest.raises(ValueError, match="missing column"):
        S.make_streams(feats, ratings.drop(columns="timestamp"))


def test_shuffled_keeps_ratings_and_times(setup):
    *_, st = setup
    sh = st.shuffled(3)
    assert torch.equal(sh.mask, st.mask) and torch.equal(sh.days, st.days)
    for u, n in enumerate(st.lengths):
        a = sorted(zip(st.item_ids[u, :n].tolist(), st.y[u, :n].tolist()))
        assert a == sorted(zip(sh.item_ids[u, :n].tolist(), sh.y[u, :n].tolist()))
    assert not np.array_equal(sh.item_ids, st.item_ids)
    assert np.array_equal(st.shuffled(3).item_ids, sh.item_ids)  # seeded
    # x stays aligned with item ids after the shuffle
    again = S.make_streams(setup[2], setup[0])
    enc = {int(i): row for u in range(len(again)) for i, row in zip(again.item_ids[u], again.x[u].tolist()) if i >= 0}
    for u in range(len(sh)):
        for i, row in zip(sh.item_ids[u], sh.x[u].tolist()):
            if i >= 0:
                assert enc[int(i)] == row


# --------------------------------------------------------------------------------------------
# Replay strategies
# --------------------------------------------------------------------------------------------


def loop_reference(model, st, strategy, steps=1):
    """Plain per-user, per-position loop with autograd on copies of the model."""
    U, L = st.y.shape
    out = torch.full((U, L), float("nan"))
    for u in range(U):
        n = int(st.lengths[u])
        cur = copy.deepcopy(model)
        with torch.no_grad():
            out[u, 0] = model(st.x[u, :1])[0]
        for t in range(1, n):
            if isinstance(strategy, Continual):
                cur = sgd_copy(cur, st.x[u, t - 1:t], st.y[u, t - 1:t], torch.ones(1), strategy.lr, steps)
                m = cur
            else:
                lo = 0 if strategy.window is None else max(0, t - strategy.window)
                xs, ys = st.x[u, lo:t], st.y[u, lo:t]
                if strategy.gamma < 1:
                    if strategy.decay == "position":
                        ages = torch.arange(t - 1, lo - 1, -1, dtype=torch.float64)
                    else:
                        ages = st.days[u, t - 1] - st.days[u, lo:t]
                    w = strategy.gamma ** ages / (strategy.gamma ** ages).sum()
                else:
                    w = torch.full((t - lo,), 1.0 / (t - lo), dtype=torch.float64)
                m = sgd_copy(model, xs, ys, w, strategy.lr, steps)
            with torch.no_grad():
                out[u, t] = m(st.x[u, t:t + 1])[0]
    return out


CASES = [Readapt(0.3), Readapt(0.3, window=3), Readapt(0.3, gamma=0.7), Readapt(0.3, gamma=0.5, decay="days"),
         Continual(0.1)]


@pytest.mark.parametrize("strategy", CASES, ids=[f"{s.name}-{getattr(s, 'decay', '')}" for s in CASES])
def test_replay_matches_plain_loop(setup, strategy):
    _, _, _, model, params, frozen, st = setup
    ref = loop_reference(model, st, strategy)
    for vectorize in (True, False):
        got = S.replay_streams(model, params, frozen, st, strategy, vectorize=vectorize)
        assert torch.equal(got.isnan(), ~st.mask)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_replay_two_steps_loop_path(setup):
    _, _, _, model, params, frozen, st = setup
    got = S.replay_streams(model, params, frozen, st, Readapt(0.2, steps=2, gamma=0.8))
    ref = loop_reference(model, st, Readapt(0.2, gamma=0.8), steps=2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, equal_nan=True)
    one = S.replay_streams(model, params, frozen, st, Readapt(0.2, gamma=0.8))
    assert not torch.allclose(got[:, 1:].nan_to_num(), one[:, 1:].nan_to_num())


def test_special_cases_agree(setup):
    _, _, _, model, params, frozen, st = setup
    replay = lambda s: S.replay_streams(model, params, frozen, st, s)  # noqa: E731
    reset, wide, flat = replay(Readapt(0.3)), replay(Readapt(0.3, window=1000)), replay(Readapt(0.3, gamma=1.0))
    torch.testing.assert_close(wide, reset, equal_nan=True)
    torch.testing.assert_close(flat, reset, equal_nan=True, atol=1e-6, rtol=1e-5)
    last, sharp = replay(Readapt(0.3, window=1)), replay(Readapt(0.3, gamma=1e-9))
    torch.testing.assert_close(sharp, last, equal_nan=True, atol=1e-5, rtol=1e-5)
    static = replay(Static())
    with torch.no_grad():
        torch.testing.assert_close(static, torch.where(st.mask, model(st.x), torch.tensor(float("nan"))), equal_nan=True)
    # position 0 is the unadapted model for every strategy
    for p in (reset, last, sharp):
        torch.testing.assert_close(p[:, 0], static[:, 0])
    assert not torch.allclose(reset[:, 2:].nan_to_num(), static[:, 2:].nan_to_num())
    assert [s.name for s in (Static(), Readapt(0.1), Readapt(0.1, window=5), Readapt(0.1, gamma=0.9), Continual(0.1))] \
        == list(S.STREAM_STRATEGIES)


@pytest.mark.parametrize("strategy", CASES + [Static()], ids=[s.name for s in CASES] + ["static"])
def test_no_peeking_at_the_rating_being_predicted(setup, strategy):
    """pred[:, t] may depend on ratings 0..t-1 only: change ratings t.. and nothing before moves."""
    _, _, _, model, params, frozen, st = setup
    base = S.replay_streams(model, params, frozen, st, strategy)
    t = 3
    changed = copy.copy(st)
    y = st.y.clone()
    y[:, t:] = torch.where(st.mask[:, t:], 5.5 - y[:, t:], y[:, t:])
    changed.y = y
    after = S.replay_streams(model, params, frozen, changed, strategy)
    torch.testing.assert_close(after[:, :t + 1], base[:, :t + 1], equal_nan=True)
    if not isinstance(strategy, Static):
        assert not torch.allclose(after[:, t + 1:].nan_to_num(), base[:, t + 1:].nan_to_num())


# --------------------------------------------------------------------------------------------
# Errors and summaries
# --------------------------------------------------------------------------------------------


def test_stream_errors_clip_and_padding(setup):
    *_, st = setup
    pred = torch.where(st.mask, torch.full_like(st.y, 9.0), torch.tensor(float("nan")))
    e = S.stream_errors(pred, st, (0.5, 5.0))
    m = st.mask.numpy()
    np.testing.assert_allclose(e[m], np.abs(5.0 - st.y.numpy()[m]))
    assert np.isnan(e[~m]).all()


def test_summarize_streams_against_hand_computation():
    nan = np.nan
    a = np.array([[1.0, 2.0, 3.0, nan], [0.0, 1.0, nan, nan], [2.0, 2.0, 2.0, 4.0]])
    b = a - np.array([[0.0, 1.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    tab = S.summarize_streams({"a": a, "b": b}, [(1, 1), (2, None)], reference="a", n_boot=200)
    assert tab["bin"].tolist() == ["1", "1", "2+", "2+"]
    r = tab.set_index(["strategy", "bin"])
    assert r.loc[("a", "1"), "users"] == 3 and r.loc[("a", "2+"), "users"] == 2  # user 2 has nothing at t >= 2
    assert r.loc[("a", "1"), "mean"] == pytest.approx(np.mean([2.0, 1.0, 2.0]))
    assert r.loc[("a", "2+"), "mean"] == pytest.approx(np.mean([3.0, 3.0]))
    assert r.loc[("b", "2+"), "mean"] == pytest.approx(np.mean([2.0, 2.0]))
    assert r.loc[("b", "2+"), "diff"] == pytest.approx(-1.0)
    assert r.loc[("b", "1"), "diff"] == pytest.approx(-0.5)
    assert np.isnan(r.loc[("a", "1"), "diff"])  # the reference itself
    assert r.loc[("b", "1"), "low"] <= r.loc[("b", "1"), "mean"] <= r.loc[("b", "1"), "high"]
