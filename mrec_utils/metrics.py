"""Evaluation metrics for rating prediction and ranking, and bootstrap confidence intervals.

Everything here takes array-likes (lists, numpy arrays, torch tensors on any device) and
returns plain Python floats, or numpy arrays for the per-row / per-user forms, so that the
results can go straight into a pandas table or into :func:`paired_bootstrap_ci`.

Conventions
-----------
* Ranks are 1-based. The DCG discount of rank ``r`` is ``1 / log2(r + 1)``.
* Gains: ``"exponential"`` is ``2**rel - 1`` (graded relevance, e.g. star ratings);
  ``"linear"`` is ``rel`` (for 0/1 relevance both give the same numbers).
* Ties in the scores. ``ties="stable"`` (the default) breaks ties by the original candidate
  order, the first candidate wins; the result is deterministic but depends on that order, so
  shuffle candidates (with a seed) if a model can output many equal scores.
  ``ties="average"`` averages the metric over all orderings of each tied group
  (McSherry & Najork, 2008) and matches ``sklearn.metrics.ndcg_score(ignore_ties=False)``.
* A row (user) with no relevant item gets nDCG = 0 and HR = 0, as in scikit-learn; means
  include those rows. Filter them out beforehand if they should not count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "mae",
    "rmse",
    "dcg_at_k",
    "ndcg_at_k",
    "ndcg_at_k_batch",
    "hr_at_k",
    "hr_at_k_batch",
    "rank_of",
    "topk_metrics",
    "auc",
    "BootstrapResult",
    "bootstrap_ci",
    "paired_bootstrap_ci",
]

_GAINS = ("exponential", "linear")
_TIES = ("stable", "average")


# --------------------------------------------------------------------------- helpers
def _as_array(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """Convert a list / numpy array / torch tensor to a numpy array of ``dtype``."""
    if x is None:
        raise TypeError(f"{name} is None; pass an array, a list or a torch tensor.")
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if dtype is not bool and x.is_floating_point():
            x = x.double()  # also handles float16 / bfloat16, which numpy cannot take directly
        x = x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name} could not be converted to a numpy array: {exc}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} has dtype object (ragged or non-numeric); pass a numeric array.")
    if dtype is bool:
        if arr.dtype != bool:
            if arr.size and not np.isin(arr, (0, 1)).all():
                raise ValueError(f"{name} must be a boolean mask (or 0/1 values).")
            arr = arr.astype(bool)
        return arr
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(dtype, copy=False)
    if arr.size == 0:
        raise ValueError(f"{name} is empty; a metric needs at least one value.")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; drop or impute missing values first.")
    return arr


def _check_k(k: Any) -> int:
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int >= 1, got {k!r}.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    return int(k)


def _check_same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have the same shape, got {a.shape} and {b.shape}.")


def _discounts(n: int) -> np.ndarray:
    """``1 / log2(rank + 1)`` for ranks 1..n."""
    return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


# --------------------------------------------------------------------------- rating errors
def mae(y_true: Any, y_pred: Any) -> float:
    """Mean absolute error ``mean(|y_true - y_pred|)``. Inputs of any equal shape."""
    t = _as_array(y_true, "y_true")
    p = _as_array(y_pred, "y_pred")
    _check_same_shape(t, p, "y_true", "y_pred")
    return float(np.mean(np.abs(t - p)))


def rmse(y_true: Any, y_pred: Any) -> float:
    """Root mean squared error ``sqrt(mean((y_true - y_pred)**2))``. Inputs of any equal shape."""
    t = _as_array(y_true, "y_true")
    p = _as_array(y_pred, "y_pred")
    _check_same_shape(t, p, "y_true", "y_pred")
    return float(np.sqrt(np.mean((t - p) ** 2)))


# --------------------------------------------------------------------------- DCG / nDCG
def dcg_at_k(gains_in_rank_order: Any, k: int) -> float:
    """Discounted cumulative gain of the first ``k`` positions.

    Args:
        gains_in_rank_order: shape [n], the gain of the item at rank 1, 2, ... (already
            transformed, e.g. ``2**r - 1``).
        k: cutoff, >= 1; ``k > n`` uses all n positions.

    Returns:
        ``sum_{i=1..min(k,n)} g_i / log2(i + 1)``.
    """
    g = _as_array(gains_in_rank_order, "gains_in_rank_order")
    k = _check_k(k)
    if g.ndim != 1:
        raise ValueError(f"gains_in_rank_order must be 1-D, got shape {g.shape}.")
    g = g[:k]
    return float(g @ _discounts(g.size))


def _prepare_rank_inputs(
    y_true: Any, y_score: Any, k: int, mask: Any
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None, bool]:
    t = _as_array(y_true, "y_true")
    s = _as_array(y_score, "y_score")
    k = _check_k(k)
    _check_same_shape(t, s, "y_true", "y_score")
    if t.ndim not in (1, 2):
        raise ValueError(
            f"y_true / y_score must be 1-D [n_candidates] or 2-D [n_rows, n_candidates], got {t.shape}."
        )
    one_d = t.ndim == 1
    if one_d:
        t, s = t[None, :], s[None, :]
    if t.shape[1] == 0:
        raise ValueError("there are no candidates (second dimension has size 0).")
    if not np.isfinite(s).all():
        raise ValueError("y_score must be finite; use `mask` to drop padded candidates.")
    if (t < 0).any():
        raise ValueError("y_true holds negative relevance grades; grades must be >= 0.")
    m = None
    if mask is not None:
        m = _as_array(mask, "mask", dtype=bool)
        if one_d and m.ndim == 1:
            m = m[None, :]
        if m.shape != t.shape:
            raise ValueError(f"mask must have the shape of y_true, got {m.shape} vs {t.shape}.")
    return t, s, k, m, one_d


def _gain(t: np.ndarray, gain: str) -> np.ndarray:
    if gain == "exponential":
        return np.exp2(t) - 1.0
    if gain == "linear":
        return t
    raise ValueError(f"gain must be one of {_GAINS}, got {gain!r}.")


def _stable_order(s: np.ndarray) -> np.ndarray:
    """Row-wise order by descending score; ties keep the original candidate order."""
    return np.argsort(-s, axis=1, kind="stable")


def ndcg_at_k_batch(
    y_true: Any,
    y_score: Any,
    k: int,
    gain: str = "exponential",
    ties: str = "stable",
    mask: Any = None,
) -> np.ndarray:
    """Per-row nDCG@k.

    Args:
        y_true: [n_rows, n_candidates] (or [n_candidates]) relevance grades >= 0
            (ratings, or 0/1).
        y_score: same shape, model scores (finite); higher is ranked first.
        k: cutoff >= 1 (``k > n_candidates`` uses all candidates).
        gain: ``"exponential"`` (``2**r - 1``) or ``"linear"`` (``r``).
        ties: ``"stable"`` (ties broken by candidate order) or ``"average"`` (averaged over
            the orderings of each tied group; equals scikit-learn's ``ndcg_score``).
        mask: optional boolean, same shape, True for real candidates and False for padding;
            padded candidates are removed from both the ranking and the ideal ranking.

    Returns:
        float64 array [n_rows] in [0, 1]; 0 for a row without any relevant candidate.
    """
    if ties not in _TIES:
        raise ValueError(f"ties must be one of {_TIES}, got {ties!r}.")
    t, s, k, m, _ = _prepare_rank_inputs(y_true, y_score, k, mask)
    g = _gain(t, gain)
    if m is not None:
        g = np.where(m, g, 0.0)
        s = np.where(m, s, -np.inf)  # padding goes after every real candidate
    n_rows, n = g.shape
    disc = _discounts(n)
    disc[k:] = 0.0  # positions after the cutoff do not count

    order = _stable_order(s)
    g_sorted = np.take_along_axis(g, order, axis=1)
    if ties == "stable":
        dcg = g_sorted @ disc
    else:
        s_sorted = np.take_along_axis(s, order, axis=1)
        new_group = np.ones_like(s_sorted, dtype=bool)
        new_group[:, 1:] = s_sorted[:, 1:] != s_sorted[:, :-1]
        # Give each tied group a global id, then replace each gain by its group mean.
        gid = np.cumsum(new_group.ravel()) - 1
        sums = np.bincount(gid, weights=g_sorted.ravel())
        counts = np.bincount(gid)
        avg_gain = (sums / counts)[gid].reshape(n_rows, n)
        dcg = avg_gain @ disc
    ideal = -np.sort(-g, axis=1) @ disc
    out = np.zeros(n_rows)
    ok = ideal > 0
    out[ok] = dcg[ok] / ideal[ok]
    return out


def ndcg_at_k(
    y_true: Any,
    y_score: Any,
    k: int,
    gain: str = "exponential",
    ties: str = "stable",
    mask: Any = None,
) -> float:
    """nDCG@k of one candidate list, or the mean over rows for 2-D input.

    Ranks candidates by ``y_score`` (descending) and divides the DCG of the top ``k`` by
    the DCG of the ideal ordering by ``y_true``. See :func:`ndcg_at_k_batch` for the
    arguments; use that function to get the per-row values (e.g. for bootstrapping).

    Example (hand-computed): grades [3, 2, 0], scores [0.1, 0.9, 0.5], k=3, exponential:
    ranked gains [3, 0, 7] -> DCG = 3 + 0 + 7/2 = 6.5; ideal [7, 3, 0] -> 7 + 3/log2(3);
    nDCG = 6.5 / 8.8928 = 0.7309.
    """
    return float(np.mean(ndcg_at_k_batch(y_true, y_score, k, gain=gain, ties=ties, mask=mask)))


# --------------------------------------------------------------------------- hit rate
def hr_at_k_batch(y_true: Any, y_score: Any, k: int, mask: Any = None) -> np.ndarray:
    """Per-row hit rate: 1.0 if any relevant candidate (``y_true > 0``) is in the top ``k``.

    Args:
        y_true: [n_rows, n_candidates] (or [n_candidates]) relevance (> 0 means relevant).
        y_score: same shape, finite scores; ties broken by candidate order (first wins).
        k: cutoff >= 1.
        mask: optional boolean, same shape; False marks padded candidates (never ranked).

    Returns:
        float64 array [n_rows] of 0.0 / 1.0.
    """
    t, s, k, m, _ = _prepare_rank_inputs(y_true, y_score, k, mask)
    rel = t > 0
    if m is not None:
        rel &= m
        s = np.where(m, s, -np.inf)
    top = _stable_order(s)[:, :k]
    return np.take_along_axis(rel, top, axis=1).any(axis=1).astype(np.float64)


def hr_at_k(y_true: Any, y_score: Any, k: int, mask: Any = None) -> float:
    """Hit rate at k of one candidate list, or the mean over rows for 2-D input.

    See :func:`hr_at_k_batch` for arguments and tie handling.
    """
    return float(np.mean(hr_at_k_batch(y_true, y_score, k, mask=mask)))


def rank_of(target_score: float, other_scores: Any, ties: str = "average") -> float:
    """1-based rank of one target among ``other_scores`` (higher score = better rank).

    Used for leave-one-out evaluation (one held-out item vs sampled negatives):
    ``HR@k = rank <= k`` and ``nDCG@k = 1 / log2(rank + 1)`` if ``rank <= k``.

    Args:
        target_score: the score of the target item.
        other_scores: [n] scores of the other candidates.
        ties: ``"pessimistic"`` (target after all equal scores), ``"optimistic"`` (before),
            or ``"average"`` (midpoint; may be fractional).
    """
    o = _as_array(other_scores, "other_scores").ravel()
    t = float(_as_array([target_score], "target_score")[0])
    if not np.isfinite(t) or not np.isfinite(o).all():
        raise ValueError("scores must be finite.")
    higher = int((o > t).sum())
    equal = int((o == t).sum())
    if ties == "pessimistic":
        return float(1 + higher + equal)
    if ties == "optimistic":
        return float(1 + higher)
    if ties == "average":
        return 1 + higher + equal / 2.0
    raise ValueError(f"ties must be 'pessimistic', 'optimistic' or 'average', got {ties!r}.")


# --------------------------------------------------------------------------- full-catalogue top-k
def topk_metrics(
    scores: Any,
    relevant: Any,
    exclude: Any = None,
    k: int = 10,
    chunk_size: int = 1024,
) -> dict[str, np.ndarray]:
    """HR@k and binary nDCG@k per user, ranking the whole catalogue.

    Args:
        scores: [n_users, n_items] finite scores (numpy or torch, any device).
        relevant: [n_users, n_items] boolean mask of the held-out relevant items.
        exclude: optional [n_users, n_items] boolean mask of items removed from the ranking
            (e.g. the user's support / training items). An item that is both relevant and
            excluded is removed, i.e. it does not count as relevant either.
        k: cutoff >= 1 (``k > n_items`` uses every item).
        chunk_size: users processed at a time (bounds temporary memory).

    Returns:
        dict with float64 arrays of shape [n_users]:
        ``"hr"`` (1 if any relevant item is in the top k), ``"ndcg"`` (binary gains, ideal
        DCG over ``min(n_relevant, k)`` positions; 0 when no relevant item), and
        ``"n_relevant"`` (relevant items left after exclusion).

    Ties are broken by item index (lower index first), exactly as a stable sort would.
    The top k is found with ``np.partition`` (O(n_items) per user), and only those k
    items are sorted.
    """
    s_all = _as_array(scores, "scores")
    r_all = _as_array(relevant, "relevant", dtype=bool)
    k = _check_k(k)
    if s_all.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_users, n_items], got shape {s_all.shape}.")
    if r_all.shape != s_all.shape:
        raise ValueError(f"relevant must have the shape of scores, got {r_all.shape} vs {s_all.shape}.")
    if not np.isfinite(s_all).all():
        raise ValueError("scores must be finite; use `exclude` to remove items from the ranking.")
    x_all = None
    if exclude is not None:
        x_all = _as_array(exclude, "exclude", dtype=bool)
        if x_all.shape != s_all.shape:
            raise ValueError(f"exclude must have the shape of scores, got {x_all.shape} vs {s_all.shape}.")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")

    n_users, n_items = s_all.shape
    kk = min(k, n_items)
    disc = _discounts(kk)
    ideal_cum = np.concatenate([[0.0], np.cumsum(disc)])  # ideal DCG with j relevant items
    hr = np.zeros(n_users)
    ndcg = np.zeros(n_users)
    n_rel = np.zeros(n_users)
    for start in range(0, n_users, chunk_size):
        sl = slice(start, start + chunk_size)
        s = s_all[sl]
        r = r_all[sl]
        if x_all is not None:
            s = np.where(x_all[sl], -np.inf, s)
            r = r & ~x_all[sl]
        # Threshold = k-th largest score; take everything above it, then fill up with the
        # lowest-index items equal to it so that ties are resolved like a stable sort.
        thr = -np.partition(-s, kk - 1, axis=1)[:, kk - 1 : kk]
        above = s > thr
        at = s == thr
        need = kk - above.sum(axis=1, keepdims=True)
        chosen = above | (at & (np.cumsum(at, axis=1) <= need))
        idx = np.nonzero(chosen)[1].reshape(-1, kk)  # item ids, increasing per row
        top_s = np.take_along_axis(s, idx, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        hits = np.take_along_axis(r, np.take_along_axis(idx, order, axis=1), axis=1)
        nr = r.sum(axis=1)
        hr[sl] = hits.any(axis=1)
        ideal = ideal_cum[np.minimum(nr, kk)]
        dcg = hits @ disc
        ndcg[sl] = np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)
        n_rel[sl] = nr
    return {"hr": hr, "ndcg": ndcg, "n_relevant": n_rel}


# --------------------------------------------------------------------------- AUC
def auc(y_true: Any, y_score: Any) -> float:
    """ROC AUC for binary labels, via the Mann-Whitney U statistic with average ranks.

    Equals the probability that a random positive scores higher than a random negative,
    counting ties as 1/2.

    Args:
        y_true: [n] labels in {0, 1} (or booleans).
        y_score: [n] finite scores.

    Raises:
        ValueError: if only one class is present (AUC is undefined).
    """
    from scipy.stats import rankdata

    t = _as_array(y_true, "y_true")
    s = _as_array(y_score, "y_score")
    if t.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-D, got {t.shape} and {s.shape}.")
    _check_same_shape(t, s, "y_true", "y_score")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("y_true must hold binary labels 0/1; binarise ratings first (e.g. rating >= 4).")
    if not np.isfinite(s).all():
        raise ValueError("y_score must be finite.")
    pos = t == 1
    n_pos = int(pos.sum())
    n_neg = t.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC is undefined when y_true holds only one class; need positives and negatives.")
    ranks = rankdata(s, method="average")
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


# --------------------------------------------------------------------------- bootstrap
@dataclass(frozen=True)
class BootstrapResult:
    """A bootstrap percentile interval.

    Attributes:
        estimate: the observed mean (single method) or mean difference ``mean(a - b)``.
        low, high: percentile interval bounds at level ``1 - alpha``.
        p_value: two-sided bootstrap p-value for "mean difference = 0" (paired form only).
        n_units: number of resampled units (users).
        n_boot: number of bootstrap resamples.
        alpha: 1 - confidence level.
    """

    estimate: float
    low: float
    high: float
    p_value: float | None
    n_units: int
    n_boot: int
    alpha: float

    @property
    def mean_diff(self) -> float:
        """Alias of ``estimate`` for the paired form."""
        return self.estimate

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def _check_boot_args(n_boot: Any, alpha: Any, seed: Any) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 100:
        raise ValueError(f"n_boot must be an int >= 100, got {n_boot!r}.")
    if not (isinstance(alpha, (float, int)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), e.g. 0.05 for a 95% interval; got {alpha!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {seed!r}.")


def _boot_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values`` [n], in chunks."""
    rng = np.random.default_rng(seed)
    n = values.size
    chunk = max(1, min(n_boot, 2_000_000 // n))  # bounded index matrix, a function of n only
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        out[start : start + m] = values[idx].mean(axis=1)
    return out


def _values_1d(x: Any, name: str) -> np.ndarray:
    v = _as_array(x, name)
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per unit/user), got shape {v.shape}.")
    if v.size < 2:
        raise ValueError(f"{name} needs at least 2 units to bootstrap, got {v.size}.")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains inf.")
    return v


def bootstrap_ci(
    values: Any, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> BootstrapResult:
    """Percentile bootstrap interval for the mean of per-unit values.

    Args:
        values: [n_units] one metric value per unit (e.g. nDCG@10 per user).
        n_boot: number of resamples (>= 100).
        alpha: 0.05 gives a 95% interval.
        seed: seed of the resampling; same inputs and seed give the same interval.
    """
    _check_boot_args(n_boot, alpha, seed)
    v = _values_1d(values, "values")
    means = _boot_means(v, int(n_boot), int(seed))
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(float(v.mean()), float(low), float(high), None, v.size, int(n_boot), float(alpha))


def paired_bootstrap_ci(
    a: Any, b: Any, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> BootstrapResult:
    """Paired bootstrap for the mean difference of two methods evaluated on the same units.

    Units (users) are resampled with replacement and the same resample is used for both
    methods, so the interval accounts for the correlation between them.

    Args:
        a, b: [n_units] per-unit metric values of method A and method B, aligned by unit.
        n_boot, alpha, seed: as in :func:`bootstrap_ci`.

    Returns:
        :class:`BootstrapResult` with ``estimate = mean(a - b)`` (also ``.mean_diff``),
        the percentile interval, and a two-sided p-value computed from the bootstrap
        distribution shifted to the null: ``(1 + #{|m* - d| >= |d|}) / (n_boot + 1)``.
    """
    _check_boot_args(n_boot, alpha, seed)
    av = _values_1d(a, "a")
    bv = _values_1d(b, "b")
    _check_same_shape(av, bv, "a", "b")
    d = av - bv
    means = _boot_means(d, int(n_boot), int(seed))
    est = float(d.mean())
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    extreme = int((np.abs(means - est) >= abs(est)).sum())
    p = (1 + extreme) / (n_boot + 1)
    return BootstrapResult(est, float(low), float(high), float(p), d.size, int(n_boot), float(alpha))
