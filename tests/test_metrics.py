"""Tests of mrec_utils.metrics against scikit-learn, hand-computed cases and plain loops."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import mean_absolute_error, mean_squared_error, ndcg_score, roc_auc_score

from mrec_utils import metrics as M


# ----------------------------------------------------------------------------- MAE / RMSE
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mae_rmse_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(1, 6, size=200).astype(float)
    p = t + rng.normal(0, 0.8, size=200)
    assert M.mae(t, p) == pytest.approx(mean_absolute_error(t, p), rel=1e-12)
    assert M.rmse(t, p) == pytest.approx(math.sqrt(mean_squared_error(t, p)), rel=1e-12)


def test_mae_rmse_hand_and_torch():
    # errors 1, -2, 0 -> MAE = 3/3 = 1; RMSE = sqrt((1 + 4 + 0)/3) = sqrt(5/3)
    t, p = [3.0, 4.0, 5.0], [4.0, 2.0, 5.0]
    assert M.mae(t, p) == pytest.approx(1.0)
    assert M.rmse(t, p) == pytest.approx(math.sqrt(5 / 3))
    tt = torch.tensor(t, requires_grad=True)
    assert M.rmse(tt, torch.tensor(p)) == pytest.approx(math.sqrt(5 / 3))
    assert isinstance(M.mae(tt, torch.tensor(p, dtype=torch.bfloat16)), float)


@pytest.mark.parametrize(
    "t,p,err",
    [([], [], ValueError), ([1.0, 2.0], [1.0], ValueError), ([1.0, float("nan")], [1.0, 2.0], ValueError),
     (None, [1.0], TypeError), (["a", "b"], [1.0, 2.0], TypeError)],
)
def test_mae_bad_inputs(t, p, err):
    with pytest.raises(err):
        M.mae(t, p)


# ----------------------------------------------------------------------------- nDCG
def test_ndcg_hand_exponential_and_linear():
    # grades [3, 2, 0], scores [0.1, 0.9, 0.5] -> order: item1 (2), item2 (0), item0 (3)
    # exponential gains in rank order [3, 0, 7]: DCG = 6.5; ideal [7, 3, 0]: 7 + 3/log2(3)
    ideal = 7 + 3 / math.log2(3)
    assert M.ndcg_at_k([3, 2, 0], [0.1, 0.9, 0.5], k=3) == pytest.approx(6.5 / ideal)
    # linear gains [2, 0, 3]: DCG = 2 + 3/2 = 3.5; ideal [3, 2, 0] = 3 + 2/log2(3)
    assert M.ndcg_at_k([3, 2, 0], [0.1, 0.9, 0.5], k=3, gain="linear") == pytest.approx(
        3.5 / (3 + 2 / math.log2(3))
    )
    # k=1: top item has gain 3 vs ideal 7
    assert M.ndcg_at_k([3, 2, 0], [0.1, 0.9, 0.5], k=1) == pytest.approx(3 / 7)


def test_ndcg_ties_stable_vs_average_hand():
    # binary grades [0, 1], equal scores. stable: item0 first -> DCG = 1/log2(3); ideal = 1.
    assert M.ndcg_at_k([0, 1], [0.5, 0.5], k=2) == pytest.approx(1 / math.log2(3))
    # average of the two orders: (1 + 1/log2(3)) / 2
    assert M.ndcg_at_k([0, 1], [0.5, 0.5], k=2, ties="average") == pytest.approx((1 + 1 / math.log2(3)) / 2)
    # k=1, stable: item0 (irrelevant) first -> 0; average: 1/2
    assert M.ndcg_at_k([0, 1], [0.5, 0.5], k=1) == 0.0
    assert M.ndcg_at_k([0, 1], [0.5, 0.5], k=1, ties="average") == pytest.approx(0.5)


def test_ndcg_no_relevant_is_zero():
    assert M.ndcg_at_k([0, 0, 0], [0.3, 0.2, 0.1], k=2) == 0.0
    assert M.ndcg_at_k([0, 0, 0], [0.3, 0.2, 0.1], k=2, ties="average") == 0.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_ndcg_average_ties_matches_sklearn(seed, k):
    rng = np.random.default_rng(seed)
    n_rows, n = 8, 20
    grades = rng.integers(0, 6, size=(n_rows, n)).astype(float)
    grades[0] = 0  # a row without relevant items
    scores = rng.integers(0, 5, size=(n_rows, n)).astype(float)  # many ties
    # linear gains
    ours = M.ndcg_at_k(grades, scores, k=k, gain="linear", ties="average")
    assert ours == pytest.approx(ndcg_score(grades, scores, k=k, ignore_ties=False), abs=1e-12)
    # exponential gains: sklearn uses y_true as the gain, so pass 2**r - 1
    ours = M.ndcg_at_k_batch(grades, scores, k=k, gain="exponential", ties="average")
    ref = [ndcg_score((2**grades - 1)[i : i + 1], scores[i : i + 1], k=k) for i in range(n_rows)]
    np.testing.assert_allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_ndcg_stable_matches_sklearn_without_ties_and_loop_with_ties(seed):
    rng = np.random.default_rng(seed)
    grades = rng.integers(0, 2, size=(6, 15)).astype(float)
    cont = rng.normal(size=(6, 15))  # no ties: both tie modes equal sklearn
    ref = ndcg_score(grades, cont, k=5)
    assert M.ndcg_at_k(grades, cont, k=5, gain="linear") == pytest.approx(ref, abs=1e-12)
    assert M.ndcg_at_k(grades, cont, k=5, gain="linear", ties="average") == pytest.approx(ref, abs=1e-12)
    # with ties, "stable" equals a plain loop with a first-come tie-break
    tied = rng.integers(0, 3, size=(6, 15)).astype(float)
    for i in range(6):
        order = sorted(range(15), key=lambda j: (-tied[i, j], j))
        dcg = sum((2 ** grades[i, j] - 1) / math.log2(r + 2) for r, j in enumerate(order[:5]))
        ideal_g = sorted(2 ** grades[i] - 1, reverse=True)[:5]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal_g))
        want = dcg / idcg if idcg > 0 else 0.0
        assert M.ndcg_at_k(grades[i], tied[i], k=5) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("ties", ["stable", "average"])
def test_ndcg_mask_equals_unpadded(ties):
    rng = np.random.default_rng(3)
    lengths = [5, 9, 3]
    n = max(lengths)
    g = np.zeros((3, n))
    s = np.zeros((3, n))  # padding scores equal to real ones on purpose (would tie)
    mask = np.zeros((3, n), dtype=bool)
    want = []
    for i, L in enumerate(lengths):
        g[i, :L] = rng.integers(0, 5, size=L)
        g[i, L:] = 5  # padded grades must be ignored
        s[i, :L] = rng.integers(0, 3, size=L)
        mask[i, :L] = True
        want.append(M.ndcg_at_k(g[i, :L], s[i, :L], k=4, ties=ties))
    got = M.ndcg_at_k_batch(g, s, k=4, ties=ties, mask=mask)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert M.ndcg_at_k(g, s, k=4, ties=ties, mask=mask) == pytest.approx(np.mean(want))
    assert M.ndcg_at_k(torch.tensor(g), torch.tensor(s), k=4, ties=ties, mask=torch.tensor(mask)) == pytest.approx(
        np.mean(want)
    )


@pytest.mark.parametrize(
    "kw,err",
    [
        (dict(y_true=[1, 0], y_score=[0.1], k=1), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, 0.2], k=0), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, 0.2], k=1.5), ValueError),
        (dict(y_true=[1, -1], y_score=[0.1, 0.2], k=1), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, np.nan], k=1), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, np.inf], k=1), ValueError),
        (dict(y_true=[], y_score=[], k=1), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, 0.2], k=1, gain="log"), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, 0.2], k=1, ties="random"), ValueError),
        (dict(y_true=np.zeros((2, 2, 2)), y_score=np.zeros((2, 2, 2)), k=1), ValueError),
        (dict(y_true=[1, 0], y_score=[0.1, 0.2], k=1, mask=[True]), ValueError),
    ],
)
def test_ndcg_bad_inputs(kw, err):
    with pytest.raises(err):
        M.ndcg_at_k(**kw)


# ----------------------------------------------------------------------------- HR
def test_hr_hand_and_batch():
    # scores rank items 2, 0, 1, 3; the relevant item is 1 at rank 3
    y, s = [0, 1, 0, 0], [0.5, 0.2, 0.9, 0.1]
    assert M.hr_at_k(y, s, k=2) == 0.0
    assert M.hr_at_k(y, s, k=3) == 1.0
    # ties: first candidate wins, so item 0 beats item 1 at k=1
    assert M.hr_at_k([0, 1], [0.5, 0.5], k=1) == 0.0
    assert M.hr_at_k([1, 0], [0.5, 0.5], k=1) == 1.0
    Y = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    S = np.array([s, s, s])
    np.testing.assert_array_equal(M.hr_at_k_batch(Y, S, k=2), [0.0, 1.0, 0.0])
    assert M.hr_at_k(Y, S, k=2) == pytest.approx(1 / 3)
    # mask removes item 2 from row 0, moving item 1 into the top 2
    mask = np.array([[1, 1, 0, 1]] + [[1, 1, 1, 1]] * 2, dtype=bool)
    np.testing.assert_array_equal(M.hr_at_k_batch(Y, S, k=2, mask=mask), [1.0, 1.0, 0.0])


def test_rank_of():
    # 2 higher, 2 equal: pessimistic 5, optimistic 3, average 4
    other = [0.9, 0.8, 0.5, 0.5, 0.1]
    assert M.rank_of(0.5, other, ties="pessimistic") == 5
    assert M.rank_of(0.5, other, ties="optimistic") == 3
    assert M.rank_of(0.5, other) == 4
    assert M.rank_of(1.0, other) == 1
    with pytest.raises(ValueError):
        M.rank_of(0.5, other, ties="best")


# ----------------------------------------------------------------------------- top-k full catalogue
def _topk_loop(scores, relevant, exclude, k):
    hr, nd = [], []
    for u in range(scores.shape[0]):
        items = [i for i in range(scores.shape[1]) if exclude is None or not exclude[u, i]]
        rel = {i for i in items if relevant[u, i]}
        ranked = sorted(items, key=lambda i: (-scores[u, i], i))[:k]
        hits = [1.0 if i in rel else 0.0 for i in ranked]
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1 / math.log2(r + 2) for r in range(min(len(rel), k)))
        hr.append(float(any(hits)))
        nd.append(dcg / idcg if idcg else 0.0)
    return np.array(hr), np.array(nd)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 5, 40])
def test_topk_metrics_matches_loop(seed, k):
    rng = np.random.default_rng(seed)
    n_users, n_items = 23, 30
    scores = rng.integers(0, 6, size=(n_users, n_items)).astype(float)  # heavy ties
    relevant = rng.random((n_users, n_items)) < 0.15
    relevant[0] = False
    exclude = rng.random((n_users, n_items)) < 0.3
    exclude[1] = True  # a user with everything excluded
    for ex in (None, exclude):
        got = M.topk_metrics(scores, relevant, exclude=ex, k=k, chunk_size=7)
        hr, nd = _topk_loop(scores, relevant, ex, k)
        np.testing.assert_array_equal(got["hr"], hr)
        np.testing.assert_allclose(got["ndcg"], nd, atol=1e-12)
        want_nrel = (relevant & ~ex).sum(1) if ex is not None else relevant.sum(1)
        np.testing.assert_array_equal(got["n_relevant"], want_nrel)


def test_topk_metrics_agrees_with_ndcg_at_k_and_torch():
    rng = np.random.default_rng(7)
    scores = rng.normal(size=(10, 50)).astype(np.float64)
    relevant = rng.random((10, 50)) < 0.1
    got = M.topk_metrics(torch.from_numpy(scores), torch.from_numpy(relevant), k=10)
    np.testing.assert_allclose(got["ndcg"], M.ndcg_at_k_batch(relevant, scores, k=10, gain="linear"), atol=1e-12)
    np.testing.assert_array_equal(got["hr"], M.hr_at_k_batch(relevant, scores, k=10))


def test_topk_metrics_bad_inputs():
    s = np.zeros((2, 3))
    r = np.zeros((2, 3), dtype=bool)
    with pytest.raises(ValueError):
        M.topk_metrics(s[0], r[0])
    with pytest.raises(ValueError):
        M.topk_metrics(s, r[:, :2])
    with pytest.raises(ValueError):
        M.topk_metrics(s, r, exclude=r[:1])
    with pytest.raises(ValueError):
        M.topk_metrics(np.full((2, 3), -np.inf), r)
    with pytest.raises(ValueError):
        M.topk_metrics(s, np.full((2, 3), 0.5))
    with pytest.raises(ValueError):
        M.topk_metrics(s, r, k=0)


# ----------------------------------------------------------------------------- AUC
@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=300)
    s = rng.integers(0, 7, size=300) + 0.5 * y  # ties within and across classes
    assert M.auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert M.auc(torch.tensor(y).bool(), torch.tensor(s)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_auc_hand():
    # positives scored 0.8, 0.4; negatives 0.4, 0.1. Pairs (pos > neg): (0.8,0.4)=1, (0.8,0.1)=1,
    # (0.4,0.4)=1/2, (0.4,0.1)=1 -> 3.5 / 4 = 0.875
    assert M.auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)


def test_auc_batch_is_sklearn_row_by_row_with_padding_and_one_class_rows():
    """Each row's AUC over its real entries equals scikit-learn's; padding (any score) is left out, and a row
    whose real entries hold one class is NaN."""
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=(6, 40))
    s = rng.integers(0, 5, size=(6, 40)) + 0.5 * y  # ties within and across classes
    m = np.arange(40) < rng.integers(5, 41, size=6)[:, None]
    y[4] = 1 - m[4]  # row 4: only negatives among the real entries
    got = M.auc_batch(y, np.where(m, s, 99.0), mask=m)  # padding scored highest: must not count
    for i in range(6):
        if i == 4:
            assert np.isnan(got[i])
        else:
            assert got[i] == pytest.approx(roc_auc_score(y[i][m[i]], s[i][m[i]]), abs=1e-12)
            assert got[i] == M.auc(y[i][m[i]], s[i][m[i]])  # one formula: bit for bit


def test_auc_bad_inputs():
    with pytest.raises(ValueError, match="one class"):
        M.auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        M.auc([1, 2, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        M.auc([1, 0], [0.1])


# ----------------------------------------------------------------------------- bootstrap
def test_paired_bootstrap_contains_truth_and_excludes_zero():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.uniform(0, 2, size=n)  # strong shared per-user effect
    a = base + 0.05 + rng.normal(0, 0.05, size=n)
    b = base + rng.normal(0, 0.05, size=n)
    res = M.paired_bootstrap_ci(a, b, n_boot=2000, seed=1)
    assert res.estimate == pytest.approx(np.mean(a - b))
    assert res.low < 0.05 < res.high
    assert res.low > 0  # clear difference: zero is outside the interval
    assert res.p_value < 0.01
    # percentile interval close to the normal approximation mean +- 1.96 * sd / sqrt(n)
    se = np.std(a - b, ddof=1) / np.sqrt(n)
    assert res.high - res.low == pytest.approx(2 * 1.96 * se, rel=0.15)
    # the unpaired (single-method) intervals overlap though: pairing matters
    ra, rb = M.bootstrap_ci(a), M.bootstrap_ci(b)
    assert ra.low < rb.high


def test_paired_bootstrap_no_difference_and_determinism():
    rng = np.random.default_rng(5)
    a = rng.normal(size=300)
    b = a + rng.normal(0, 0.1, size=300)
    b = b - np.mean(b - a)  # make mean(a - b) exactly 0
    res = M.paired_bootstrap_ci(a, b, seed=3)
    assert res.low < 0 < res.high
    assert res.p_value > 0.5
    assert M.paired_bootstrap_ci(a, b, seed=3) == res
    assert M.paired_bootstrap_ci(a, b, seed=4) != res


def test_bootstrap_interval_shrinks_with_n():
    rng = np.random.default_rng(2)
    widths = []
    for n in (50, 500, 5000):
        r = M.bootstrap_ci(rng.normal(1.0, 1.0, size=n), n_boot=1000, seed=0)
        assert r.low < r.estimate < r.high
        widths.append(r.high - r.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.3)  # width ~ 1/sqrt(n)


def test_bootstrap_bad_inputs():
    with pytest.raises(ValueError):
        M.paired_bootstrap_ci([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        M.bootstrap_ci([1.0])
    with pytest.raises(ValueError):
        M.bootstrap_ci([1.0, np.nan, 2.0])
    with pytest.raises(ValueError):
        M.bootstrap_ci([1.0, 2.0], alpha=1.5)
    with pytest.raises(ValueError):
        M.bootstrap_ci([1.0, 2.0], n_boot=10)
    with pytest.raises(ValueError):
        M.bootstrap_ci(np.ones((3, 2)))


def test_clustered_bootstrap_keeps_its_coverage_where_the_naive_interval_is_too_narrow():
    """40 users, each scored under 3 seeds: the seeds agree closely (a user's level dominates), so the
    120 values are worth about 40. Over 300 simulated data sets the naive interval (values resampled one
    by one) covers the true mean far less often than 95%; resampling users keeps it near 95%."""
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(40), 3)
    hits = {"naive": 0, "clustered": 0}
    for rep in range(300):
        values = (rng.normal(0.0, 1.0, 40)[users] + rng.normal(0.0, 0.2, 120))  # true mean 0
        for name, clusters in (("naive", None), ("clustered", users)):
            r = M.bootstrap_ci(values, n_boot=400, seed=rep, clusters=clusters)
            hits[name] += r.low <= 0.0 <= r.high
    assert hits["naive"] / 300 < 0.75
    assert 0.88 <= hits["clustered"] / 300 <= 0.99


def test_clustered_bootstrap_reduces_to_the_plain_one_and_pairs_by_cluster():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=30), rng.normal(size=30)
    plain, one_each = M.paired_bootstrap_ci(a, b, seed=5), M.paired_bootstrap_ci(a, b, seed=5, clusters=np.arange(30))
    assert (plain.low, plain.high, plain.p_value) == (one_each.low, one_each.high, one_each.p_value)
    assert one_each.n_clusters == 30 and plain.n_clusters is None
    # two values per cluster: the estimate is the mean over values, the interval widens
    users = np.repeat(np.arange(15), 2)
    shared = rng.normal(size=15)[users]
    r_naive = M.bootstrap_ci(shared + 0.01 * a, seed=2)
    r_clu = M.bootstrap_ci(shared + 0.01 * a, seed=2, clusters=users)
    assert r_clu.estimate == r_naive.estimate and r_clu.n_clusters == 15
    assert (r_clu.high - r_clu.low) > 1.2 * (r_naive.high - r_naive.low)
    with pytest.raises(ValueError, match="one cluster id"):
        M.bootstrap_ci(a, clusters=users[:20])


def test_verdict_follows_the_interval_and_the_direction_of_the_metric():
    ci = lambda lo, hi: M.BootstrapResult((lo + hi) / 2, lo, hi, None, 10, 1000, 0.05)  # noqa: E731
    assert M.verdict(ci(-0.3, -0.1), lower_is_better=True, a="maml", b="net") == "maml better"
    assert M.verdict(ci(-0.3, -0.1), lower_is_better=False, a="maml", b="net") == "net better"
    assert M.verdict(ci(0.1, 0.3), lower_is_better=False, a="gpt", b="popularity") == "gpt better"
    assert M.verdict(ci(0.1, 0.3), lower_is_better=True) == "b better"
    assert M.verdict(ci(-0.1, 0.0), lower_is_better=True) == M.verdict(ci(0.0, 0.2), False) == "not distinguishable"
