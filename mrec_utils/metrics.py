"""Evaluation metrics for rating prediction and ranking, and bootstrap confidence intervals.

Inputs are array-likes (lists, numpy arrays, torch tensors on any device); results are floats, or
numpy arrays for the per-row forms that feed :func:`paired_bootstrap_ci`.

* Ranks are 1-based; the DCG discount of rank r is ``1 / log2(r + 1)``. Gains: ``"exponential"``
  ``2**rel - 1`` (graded relevance) or ``"linear"`` ``rel`` (the same for 0/1 relevance).
* Ties in the scores: ``ties="stable"`` (default) breaks them by candidate order, the first wins;
  ``ties="average"`` averages over all orderings of each tied group (McSherry & Najork 2008) and
  equals ``sklearn.metrics.ndcg_score(ignore_ties=False)``.
* A row without any relevant item gets nDCG = HR = 0 (as in scikit-learn) and counts in means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import numpy as np

ArrayLike = Union[Sequence, np.ndarray, "torch.Tensor"]  # noqa: F821 - torch is not imported here


def _need(ok: bool, message: str, error: Callable[[str], Exception] = ValueError) -> None:
    """The package's one validation helper: raise ``error(message)`` (an exception class or a function making one)
    unless ``ok``."""
    if not ok:
        raise error(message)


def _arr(x: ArrayLike, name: str, dtype: type = np.float64) -> np.ndarray:
    """A numpy array of ``dtype`` from a list, array or torch tensor; no NaN, not empty."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() and dtype is not bool else x).numpy()
    arr = np.asarray(x)
    if dtype is bool:
        _need(arr.dtype == bool or not arr.size or np.isin(arr, (0, 1)).all(),
              f"{name} must be a boolean mask (or 0/1 values).")
        return arr.astype(bool)
    _need(arr.dtype.kind in "biuf", f"{name} must be numeric, got dtype {arr.dtype}.", TypeError)
    arr = arr.astype(dtype)
    _need(arr.size > 0 and not np.isnan(arr).any(), f"{name} is empty or contains NaN; a metric needs numbers.")
    return arr


def _pair(y_true: ArrayLike, y_pred: ArrayLike, a: str = "y_true", b: str = "y_pred") -> tuple[np.ndarray, np.ndarray]:
    t, p = _arr(y_true, a), _arr(y_pred, b)
    _need(t.shape == p.shape, f"{a} and {b} must have the same shape, got {t.shape} and {p.shape}.")
    return t, p


def _check_k(k: int) -> int:
    _need(not isinstance(k, bool) and isinstance(k, (int, np.integer)) and k >= 1, f"k must be an int >= 1, got {k!r}.")
    return int(k)


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` for ranks 1..n."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


# ============================================================================ rating errors
def mae(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mean absolute error ``mean(|y_true - y_pred|)``."""
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t - p)))


def rmse(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Root mean squared error ``sqrt(mean((y_true - y_pred)**2))``."""
    t, p = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((t - p) ** 2)))


# ============================================================================ ranking
def _rank_inputs(y_true, y_score, k, mask):
    """Rows ``[n_rows, n]`` of grades and scores (1-D input becomes one row), k, mask or None."""
    t, s = _pair(y_true, y_score, "y_true", "y_score")
    k = _check_k(k)
    _need(t.ndim in (1, 2),
          f"y_true / y_score must be 1-D [n_candidates] or 2-D [n_rows, n_candidates], got {t.shape}.")
    t, s = np.atleast_2d(t), np.atleast_2d(s)
    _need(np.isfinite(s).all() and not (t < 0).any(),
          "y_score must be finite (use `mask` for padding) and y_true grades >= 0.")
    m = None if mask is None else np.atleast_2d(_arr(mask, "mask", bool))
    if m is not None and m.shape != t.shape:
        raise ValueError(f"mask must have the shape of y_true, got {m.shape} vs {t.shape}.")
    return t, s, k, m


def ndcg_at_k_batch(y_true: ArrayLike, y_score: ArrayLike, k: int, gain: str = "exponential",
                    ties: str = "stable", mask: ArrayLike | None = None) -> np.ndarray:
    """Per-row nDCG@k ``[n_rows]``: the DCG of the top ``k`` by ``y_score`` over that of the ideal order.
    ``y_true [n_rows, n_candidates]`` (or ``[n_candidates]``) grades >= 0, ``y_score`` the same shape, finite, higher
    first; ``k >= 1`` (larger than n_candidates: all); ``gain`` and ``ties`` as in the module docstring; ``mask`` False
    for padding (removed from the ranking and the ideal)."""
    _need(gain in ("exponential", "linear") and ties in ("stable", "average"),
          f"gain must be 'exponential' or 'linear' and ties 'stable' or 'average', got {gain!r}, {ties!r}.")
    t, s, k, m = _rank_inputs(y_true, y_score, k, mask)
    g = np.exp2(t) - 1.0 if gain == "exponential" else t
    if m is not None:
        g, s = np.where(m, g, 0.0), np.where(m, s, -np.inf)  # padding goes after every real candidate
    n_rows, n = g.shape
    disc = _discounts(n)
    disc[k:] = 0.0  # positions after the cutoff do not count
    order = np.argsort(-s, axis=1, kind="stable")
    g_sorted = np.take_along_axis(g, order, axis=1)
    if ties == "average":  # replace each gain by the mean gain of its tied group
        s_sorted = np.take_along_axis(s, order, axis=1)
        new_group = np.ones_like(s_sorted, dtype=bool)
        new_group[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
        gid = np.cumsum(new_group.ravel()) - 1
        g_sorted = (np.bincount(gid, weights=g_sorted.ravel()) / np.bincount(gid))[gid].reshape(n_rows, n)
    dcg, ideal = g_sorted @ disc, -np.sort(-g, axis=1) @ disc
    return np.divide(dcg, ideal, out=np.zeros(n_rows), where=ideal > 0)


def ndcg_at_k(y_true: ArrayLike, y_score: ArrayLike, k: int, gain: str = "exponential", ties: str = "stable",
              mask: ArrayLike | None = None) -> float:
    """nDCG@k of one candidate list, or the mean over rows (arguments of :func:`ndcg_at_k_batch`).

    Example: grades [3, 2, 0], scores [0.1, 0.9, 0.5], k=3, exponential: ranked gains [3, 0, 7] give
    DCG = 3 + 0 + 7/2 = 6.5; ideal [7, 3, 0] gives 7 + 3/log2(3); nDCG = 6.5 / 8.8928 = 0.7309."""
    return float(np.mean(ndcg_at_k_batch(y_true, y_score, k, gain=gain, ties=ties, mask=mask)))


def hr_at_k_batch(y_true: ArrayLike, y_score: ArrayLike, k: int, mask: ArrayLike | None = None) -> np.ndarray:
    """Per-row hit rate: 1.0 if a relevant candidate (``y_true > 0``) is in the top ``k`` (ties: the
    first candidate wins; ``mask`` False = padding, never ranked)."""
    t, s, k, m = _rank_inputs(y_true, y_score, k, mask)
    rel = t > 0
    if m is not None:
        rel, s = rel & m, np.where(m, s, -np.inf)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rel, top, axis=1).any(axis=1).astype(np.float64)


def hr_at_k(y_true: ArrayLike, y_score: ArrayLike, k: int, mask: ArrayLike | None = None) -> float:
    """Hit rate at k of one candidate list, or the mean over rows (see :func:`hr_at_k_batch`)."""
    return float(np.mean(hr_at_k_batch(y_true, y_score, k, mask=mask)))


def rank_of(target_score: float, other_scores: ArrayLike, ties: str = "average") -> float:
    """1-based rank of one target among ``other_scores`` (higher is better), for leave-one-out
    evaluation: ``HR@k = rank <= k``, ``nDCG@k = 1 / log2(rank + 1)``. ``ties``: "pessimistic" (after
    all equal scores), "optimistic" (before) or "average" (the midpoint, possibly fractional)."""
    o, t = _arr(other_scores, "other_scores").ravel(), float(target_score)
    higher, equal = int((o > t).sum()), int((o == t).sum())
    offsets = {"pessimistic": equal, "optimistic": 0, "average": equal / 2.0}
    _need(ties in offsets, f"ties must be 'pessimistic', 'optimistic' or 'average', got {ties!r}.")
    return float(1 + higher + offsets[ties])


def topk_metrics(scores: ArrayLike, relevant: ArrayLike, exclude: ArrayLike | None = None, k: int = 10,
                 chunk_size: int = 1024) -> dict[str, np.ndarray]:
    """HR@k and binary nDCG@k per user, ranking the whole catalogue: float64 ``[n_users]`` arrays ``hr``, ``ndcg``
    (ideal DCG over ``min(n_relevant, k)`` positions) and ``n_relevant``. ``scores``, ``relevant`` and ``exclude``
    (items removed from the ranking and the relevant ones, e.g. support items) are ``[n_users, n_items]``; users go in
    chunks of ``chunk_size``. Ties go to the lower item index; the top k comes from ``np.partition`` (O(n_items) per
    user), then is sorted."""
    s_all, r_all, k = _arr(scores, "scores"), _arr(relevant, "relevant", bool), _check_k(k)
    x_all = None if exclude is None else _arr(exclude, "exclude", bool)
    _need(s_all.ndim == 2 and r_all.shape == s_all.shape and (x_all is None or x_all.shape == s_all.shape),
          f"scores, relevant (and exclude) must be 2-D [n_users, n_items] of one shape, got {s_all.shape}, "
          f"{r_all.shape}{'' if x_all is None else ', ' + str(x_all.shape)}.")
    _need(np.isfinite(s_all).all(), "scores must be finite; use `exclude` to remove items from the ranking.")
    n_users, n_items = s_all.shape
    kk = min(k, n_items)
    disc = _discounts(kk)
    ideal_cum = np.concatenate([[0.0], np.cumsum(disc)])  # ideal DCG with j relevant items
    out = {name: np.zeros(n_users) for name in ("hr", "ndcg", "n_relevant")}
    for start in range(0, n_users, chunk_size):
        sl = slice(start, start + chunk_size)
        s, r = s_all[sl], r_all[sl]
        if x_all is not None:
            s, r = np.where(x_all[sl], -np.inf, s), r & ~x_all[sl]
        # the k-th largest score; take everything above it, then the lowest-index items equal to it
        thr = -np.partition(-s, kk - 1, axis=1)[:, kk - 1:kk]
        at = s == thr
        chosen = (s > thr) | (at & (np.cumsum(at, axis=1) <= kk - (s > thr).sum(axis=1, keepdims=True)))
        idx = np.nonzero(chosen)[1].reshape(-1, kk)  # item ids, increasing per row
        order = np.argsort(-np.take_along_axis(s, idx, axis=1), axis=1, kind="stable")
        hits = np.take_along_axis(r, np.take_along_axis(idx, order, axis=1), axis=1)
        nr = r.sum(axis=1)
        ideal, dcg = ideal_cum[np.minimum(nr, kk)], hits @ disc
        out["hr"][sl], out["n_relevant"][sl] = hits.any(axis=1), nr
        out["ndcg"][sl] = np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
    return out


def auc_batch(y_true: ArrayLike, y_score: ArrayLike, mask: ArrayLike | None = None) -> np.ndarray:
    """Per-row ROC AUC ``[n_rows]``: :func:`auc` of every row of 0/1 labels ``y_true [n_rows, n]`` (or ``[n]``) and
    finite scores ``y_score`` of the same shape at once; ``mask`` False for padding (left out); NaN for a row whose
    real entries hold one class."""
    from scipy.stats import rankdata

    t, s = _pair(y_true, y_score, "y_true", "y_score")
    _need(t.ndim in (1, 2) and np.isin(t, (0.0, 1.0)).all() and np.isfinite(s).all(),
          "y_true must be 0/1 labels (binarise ratings first, e.g. rating >= 4), 1-D or 2-D, y_score finite.")
    t, s = np.atleast_2d(t), np.atleast_2d(s)
    m = np.ones(t.shape, dtype=bool) if mask is None else np.atleast_2d(_arr(mask, "mask", bool))
    _need(m.shape == t.shape, f"mask must have the shape of y_true, got {m.shape} vs {t.shape}.")
    pos = (t == 1) & m
    n_pos, n_neg = pos.sum(1), (m & ~pos).sum(1)
    ranks = rankdata(np.where(m, s, np.inf), method="average", axis=1)  # padding ranks after every real score
    u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def auc(y_true: ArrayLike, y_score: ArrayLike) -> float:
    """ROC AUC for 0/1 labels: the Mann-Whitney U statistic with average ranks, the probability that a
    random positive scores above a random negative, ties counting 1/2 (ValueError for one class)."""
    t = _arr(y_true, "y_true")
    _need(t.ndim == 1, f"y_true must be 1-D, got shape {t.shape} (auc_batch takes rows).")
    a = auc_batch(t, y_score)[0]
    _need(not np.isnan(a), "AUC is undefined when y_true holds only one class; need positives and negatives.")
    return float(a)


# ============================================================================ bootstrap
@dataclass(frozen=True)
class BootstrapResult:
    """A percentile bootstrap interval: ``estimate`` (the mean, or the mean difference ``mean(a - b)``),
    ``low``/``high`` at level ``1 - alpha``, ``p_value`` (two-sided, "mean difference = 0"; paired
    form only), ``n_units`` values, ``n_boot`` resamples, ``n_clusters`` the resampled clusters (users)
    when the values were grouped, else None."""

    estimate: float
    low: float
    high: float
    p_value: float | None
    n_units: int
    n_boot: int
    alpha: float
    n_clusters: int | None = None

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _units(x: ArrayLike, name: str, n_boot: int, alpha: float) -> np.ndarray:
    _need(not isinstance(n_boot, bool) and isinstance(n_boot, (int, np.integer)) and n_boot >= 100 and 0 < alpha < 1,
          f"n_boot must be an int >= 100 and alpha in (0, 1) (0.05: a 95% interval), got {n_boot!r}, {alpha!r}.")
    v = _arr(x, name)
    _need(v.ndim == 1 and v.size >= 2 and np.isfinite(v).all(),
          f"{name} must be 1-D, finite, one value per unit (user), at least 2 units; got shape {v.shape}.")
    return v


def _boot_means(values: np.ndarray, n_boot: int, seed: int, clusters: np.ndarray | None = None) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values [n]``, in chunks of bounded size.
    With ``clusters [n]`` (e.g. the user of each (seed, user) value) whole clusters are resampled: one
    user's values are not independent, and resampling them one by one gives too narrow an interval."""
    rng = np.random.default_rng(seed)
    if clusters is None:
        sums, counts = values, None
    else:
        _, code = np.unique(clusters, return_inverse=True)
        sums, counts = np.bincount(code, weights=values), np.bincount(code).astype(np.float64)
    n = sums.size
    chunk = max(1, min(n_boot, 2_000_000 // n))  # a function of n only: the same draws on every machine
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start:start + m] = sums[idx].mean(axis=1) if counts is None else sums[idx].sum(1) / counts[idx].sum(1)
    return out


def _interval(v: np.ndarray, n_boot: int, alpha: float, seed: int, clusters: ArrayLike | None,
              paired: bool) -> BootstrapResult:
    """Percentile interval of the mean of ``v [n]`` (paired: with the p-value); ``clusters [n]``: resampled whole."""
    c, n = None if clusters is None else np.asarray(clusters), v.size
    if c is not None and c.shape != (n,):
        raise ValueError(f"clusters must give one cluster id (e.g. the user) per value: {n} ids, got shape {c.shape}.")
    _need(c is None or len(np.unique(c)) >= 2, "clusters must hold at least 2 different ids to resample.")
    means, est = _boot_means(v, int(n_boot), int(seed), c), float(v.mean())
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    p = float((1 + int((np.abs(means - est) >= abs(est)).sum())) / (n_boot + 1)) if paired else None
    return BootstrapResult(est, float(low), float(high), p, v.size, int(n_boot), float(alpha),
                           None if c is None else len(np.unique(c)))


def bootstrap_ci(values: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                 clusters: ArrayLike | None = None) -> BootstrapResult:
    """Percentile bootstrap interval for the mean of per-unit values (e.g. nDCG@10 per user); the same
    inputs and seed give the same interval. ``clusters``: one id per value (e.g. the user when a user
    appears under several seeds); then whole clusters are resampled."""
    return _interval(_units(values, "values", n_boot, alpha), n_boot, alpha, seed, clusters, paired=False)


def paired_bootstrap_ci(a: ArrayLike, b: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                        clusters: ArrayLike | None = None) -> BootstrapResult:
    """Paired bootstrap for the mean difference of two methods on the same units (users). Units are resampled with
    replacement, the same resample for both methods, so the interval accounts for their correlation. The two-sided
    p-value comes from the bootstrap distribution shifted to the null: ``(1 + #{|m* - d| >= |d|}) / (n_boot + 1)``.
    ``clusters``: one id per unit (e.g. the user of each (seed, user) pair); then whole clusters are resampled."""
    av, bv = _units(a, "a", n_boot, alpha), _units(b, "b", n_boot, alpha)
    _need(av.shape == bv.shape, f"a and b must be aligned by unit, got shapes {av.shape} and {bv.shape}.")
    return _interval(av - bv, n_boot, alpha, seed, clusters, paired=True)


def verdict(ci: BootstrapResult, lower_is_better: bool, a: str = "a", b: str = "b") -> str:
    """The words for an interval of ``a - b`` (e.g. from :func:`paired_bootstrap_ci`): "<a> better" or "<b> better"
    when the interval excludes 0, else "not distinguishable". ``lower_is_better``: True for errors (MAE)."""
    if ci.low <= 0 <= ci.high:
        return "not distinguishable"
    return f"{a if (ci.low > 0) != lower_is_better else b} better"
