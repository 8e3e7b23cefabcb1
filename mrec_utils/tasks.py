"""Users as tasks: cold-start splits, support/query episodes, padded batches, leakage checks.

>>> from mrec_utils.data import load_movielens
>>> from mrec_utils.tasks import make_split, make_episodes, collate_episodes, ItemIndex, check_no_leakage
>>> ratings = load_movielens().ratings
>>> split = make_split(ratings, "user-cold", seed=0)
>>> test_eps = make_episodes(split, "test", preset="melu", seed=0)
>>> check_no_leakage(split, test_eps).raise_if_bad()
>>> batch = collate_episodes(test_eps[:32], item_index=ItemIndex.from_ids(ratings.item_id))
>>> batch.support_items.shape, batch.support_mask.sum(1)[:3]       # (T, S) and the true sizes

Input
-----
Every function takes a ratings frame with the columns ``user_id`` (int), ``item_id`` (int),
``rating`` (float) and ``timestamp`` (datetime64, tz-aware or not, or plain numbers such as Unix
seconds), one row per (user, item) pair: the schema of :func:`mrec_utils.data.load_movielens`.
Extra columns are kept. Rows are put in the order (user_id, timestamp, item_id) everywhere, so
every result is independent of the input's row order.

The four scenarios (:data:`SCENARIOS`)
--------------------------------------
A scenario says which interactions meta-training may use (``split.train``) and, for every
evaluation user, which interactions may be used as *support* (what the model adapts on) and which
as *query* (what it is scored on). The evaluation frames ``split.val`` and ``split.test`` hold the
evaluation users' candidate interactions with two boolean columns ``can_support`` and
``can_query``; :func:`make_episodes` draws the support set only from ``can_support`` rows and the
query set only from ``can_query`` rows, never the same interaction twice.

Eligibility: a user can be an evaluation user only if the number of their candidate interactions
(rows with ``can_support`` or ``can_query``) lies in ``[min_ratings, max_ratings]``; the defaults
13 and 100 are MeLU's user filter (Lee et al. 2019). Training data is *not* filtered by count.
``test_frac`` and ``val_frac`` are fractions of the eligible users (rounded, at least one user
when the fraction is positive), except in item-cold (see there).

``"user-cold"`` -- new users, existing items.
    Eligible users are partitioned at random (seeded) into test, validation and the rest.
    ``train`` = every interaction of the non-evaluation users (ineligible users included).
    Evaluation pool = all interactions of the evaluation user (support and query both drawn from
    it). Time is not used: test users are a random sample, not "the users who came last".

``"item-cold"`` -- existing users, new items (MeLU's "item cold-start").
    ``cutoff`` = the ``item_cutoff_quantile`` quantile of all timestamps (an observed timestamp,
    ``method="lower"``). An item is *new* if its first rating is strictly after the cutoff;
    ``split.new_items`` lists them. ``train`` = every interaction on an old item (all users, any
    time); no rating of a new item ever reaches it (note: every rating up to the cutoff is on an
    old item by construction). Evaluation users are *existing* users: they have at least one
    rating of an old item, hence appear in ``train``. With ``cold_support="new"`` (default,
    MeLU's definition) the pool is the user's ratings of new items, and support and query are
    both drawn from it: the model adapts on a few ratings of new items and predicts the others.
    With ``cold_support="old"`` the support comes from the user's ratings of old items (which
    are also in ``train``; support may be, query never is) and the query from new items: "we
    know the user, score the new releases" (the MetaEmb-style question). Because the held-out
    ratings of new items can never be used for training, *all* eligible users are evaluation
    users, divided between validation and test in the ratio ``val_frac : test_frac``.

``"user+item-cold"`` -- new users and new items.
    New items as in item-cold. Eligible users (who rated a new item) are sampled into test and
    validation as in user-cold. ``train`` = the non-evaluation users' ratings of old items only,
    so it contains neither an evaluation user nor a new item. The pool follows ``cold_support``
    as in item-cold: "new" (MeLU) draws support and query from the user's ratings of new items;
    "old" takes the support from the user's ratings of old items and the query from new items.

``"temporal"`` -- existing users, later interactions.
    For each user, in time order, the last ``temporal_query_size`` interactions are the query
    pool and the earlier ones the support pool (so every support time <= every query time).
    Evaluation users are sampled as in user-cold. ``train`` = everything except the evaluation
    users' query pools, i.e. meta-training *may* use an evaluation user's earlier interactions,
    because they precede that user's queries. This is the per-user "leave the last n out"
    protocol of sequential recommenders (e.g. SASRec): it does not stop the model from seeing
    *other* users' interactions that happen later than a test user's queries. For a global time
    cut, use item-cold, whose training data never contains a rating of an item first rated
    after the cutoff.

Episodes, padding, leakage
--------------------------
:func:`make_episodes` turns users into :class:`Episode` objects (support/query arrays), seeded per
user, so a user's episode does not depend on which other users are requested.
:func:`collate_episodes` pads a list of episodes into an :class:`EpisodeBatch` of tensors with masks
(shapes ``[T, S]`` and ``[T, Q]``), ready for ``torch.func.vmap`` over tasks.
:func:`check_no_leakage` re-checks a split and episodes from scratch and returns a
:class:`LeakageReport` (``.ok``, ``.problems``, ``.raise_if_bad()`` raising :class:`LeakageError`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = [
    "SCENARIOS",
    "Split",
    "make_split",
    "Episode",
    "EpisodePreset",
    "MELU_PRESET",
    "PRESETS",
    "make_episodes",
    "NotEnoughRatingsError",
    "ItemIndex",
    "EpisodeBatch",
    "collate_episodes",
    "iterate_meta_batches",
    "LeakageError",
    "LeakageReport",
    "check_no_leakage",
    "scenario_counts",
]

SCENARIOS: tuple[str, ...] = ("user-cold", "item-cold", "user+item-cold", "temporal")
_ITEM_SCENARIOS = ("item-cold", "user+item-cold")
_DISJOINT_USER_SCENARIOS = ("user-cold", "user+item-cold")
_REQUIRED = ("user_id", "item_id", "rating", "timestamp")
_UNSET: Any = object()


# --------------------------------------------------------------------------- input checks


def _check_scenario(scenario: Any) -> str:
    if not isinstance(scenario, str) or scenario not in SCENARIOS:
        raise ValueError(
            f"unknown scenario {scenario!r}; valid scenarios are: {', '.join(SCENARIOS)}"
        )
    return scenario


def _seconds(ts: pd.Series) -> np.ndarray:
    """Timestamps as float64 seconds since the Unix epoch (numbers are taken as given), shape (n,)."""
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(ts.dtype):
        arr = ts.to_numpy()
        return (arr - np.datetime64(0, "s")) / np.timedelta64(1, "s")
    if pd.api.types.is_numeric_dtype(ts.dtype) and not pd.api.types.is_bool_dtype(ts.dtype):
        return ts.to_numpy(dtype=np.float64)
    raise TypeError(
        f"column 'timestamp' has dtype {ts.dtype}; expected datetime64 or numbers "
        "(e.g. Unix seconds). Convert it with pd.to_datetime(..., unit='s', utc=True)."
    )


def _prepare(ratings: Any, what: str = "ratings") -> tuple[pd.DataFrame, np.ndarray]:
    """Validate a ratings frame; return it sorted by (user, time, item) with a fresh index, and
    the timestamps as float seconds aligned with it."""
    if not isinstance(ratings, pd.DataFrame):
        raise TypeError(f"{what} must be a pandas DataFrame, got {type(ratings).__name__}")
    missing = [c for c in _REQUIRED if c not in ratings.columns]
    if missing:
        raise ValueError(
            f"{what} is missing column(s) {missing}; expected {list(_REQUIRED)} "
            "(the schema of mrec_utils.data.load_movielens; rename e.g. userId -> user_id)"
        )
    if len(ratings) == 0:
        raise ValueError(f"{what} is empty; nothing to split")
    for col in ("user_id", "item_id"):
        if not pd.api.types.is_integer_dtype(ratings[col].dtype):
            raise TypeError(
                f"column {col!r} must hold integers, got dtype {ratings[col].dtype}; "
                f"convert with {what}[{col!r}].astype('int64') (or map ids to integers first)"
            )
    if not pd.api.types.is_numeric_dtype(ratings["rating"].dtype):
        raise TypeError(f"column 'rating' must be numeric, got dtype {ratings['rating'].dtype}")
    for col in ("user_id", "item_id", "rating", "timestamp"):
        n_na = int(ratings[col].isna().sum())
        if n_na:
            raise ValueError(f"column {col!r} has {n_na} missing values; drop or fill them first")
    t = _seconds(ratings["timestamp"])
    dup = ratings.duplicated(["user_id", "item_id"])
    if dup.any():
        row = ratings.loc[dup].iloc[0]
        raise ValueError(
            f"{what} has {int(dup.sum())} repeated (user_id, item_id) pairs, e.g. user "
            f"{int(row.user_id)} and item {int(row.item_id)}; keep one rating per pair first, e.g. "
            f"{what}.sort_values('timestamp').drop_duplicates(['user_id', 'item_id'], keep='last')"
        )
    order = np.lexsort(
        (ratings["item_id"].to_numpy(), t, ratings["user_id"].to_numpy())
    )
    df = ratings.iloc[order].reset_index(drop=True)
    return df, t[order]


def _check_frac(name: str, value: Any, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in [0, 1), got {value!r}")
    v = float(value)
    low_ok = v >= 0 if allow_zero else v > 0
    if not (low_ok and v < 1):
        bound = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")
    return v


def _check_int(name: str, value: Any, *, low: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _n_of(frac: float, n: int) -> int:
    return 0 if frac == 0 else max(1, int(round(frac * n)))


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True, repr=False)
class Split:
    """A leakage-free split of a ratings frame for one cold-start scenario (see module docstring).

    Attributes:
        scenario: one of :data:`SCENARIOS`.
        train: interactions meta-training may use, columns as the input, shape (n_train, >=4).
        val, test: the evaluation users' candidate interactions, the input columns plus boolean
            ``can_support`` and ``can_query``, shape (n_rows, >=6).
        val_users, test_users: sorted int64 arrays of evaluation user ids, disjoint.
        new_items: sorted int64 array of new item ids (empty outside item-cold / user+item-cold).
        cutoff: the item cutoff timestamp (same type as the input's timestamps) or None.
        params: the arguments that produced the split.
    """

    scenario: str
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    val_users: np.ndarray
    test_users: np.ndarray
    new_items: np.ndarray
    cutoff: Any
    params: dict = field(default_factory=dict)

    @property
    def train_users(self) -> np.ndarray:
        """Sorted unique user ids that appear in ``train``, shape (n_train_users,)."""
        return np.unique(self.train["user_id"].to_numpy())

    def __repr__(self) -> str:
        cut = "" if self.cutoff is None else f", cutoff={self.cutoff}"
        return (
            f"Split({self.scenario!r}, train={len(self.train)} rows/{len(self.train_users)} users, "
            f"val={len(self.val_users)} users, test={len(self.test_users)} users, "
            f"new_items={len(self.new_items)}{cut})"
        )


def make_split(
    ratings: pd.DataFrame,
    scenario: str,
    *,
    seed: int = 0,
    test_frac: float = 0.2,
    val_frac: float = 0.1,
    item_cutoff_quantile: float = 0.8,
    min_ratings: int = 13,
    max_ratings: int | None = 100,
    cold_support: str = "new",
    temporal_query_size: int = 10,
) -> Split:
    """Split ``ratings`` for a cold-start ``scenario``; seeded, leakage-free.

    Args:
        ratings: frame with user_id, item_id, rating, timestamp, one row per (user, item).
        scenario: "user-cold", "item-cold", "user+item-cold" or "temporal" (module docstring).
        seed: seeds the choice of evaluation users.
        test_frac, val_frac: fractions of the eligible users held out for test / validation
            (item-cold: the ratio in which all eligible users are divided).
        item_cutoff_quantile: quantile of all timestamps after which first-rated items are new
            (item-cold, user+item-cold).
        min_ratings, max_ratings: an evaluation user must have this many candidate interactions
            (max_ratings=None: no upper bound). Default 13..100 as in MeLU.
        cold_support: "new" (support from ratings of new items, MeLU) or "old" (support from
            ratings of old items); item scenarios only.
        temporal_query_size: temporal only: the number of latest interactions per user that form
            the query pool.

    Returns:
        A :class:`Split`.

    Raises:
        ValueError: unknown scenario, bad parameters, or a filter that leaves no evaluation user
            (the message names the filter).
    """
    scenario = _check_scenario(scenario)
    seed = _check_seed(seed)
    test_frac = _check_frac("test_frac", test_frac, allow_zero=False)
    val_frac = _check_frac("val_frac", val_frac, allow_zero=True)
    if test_frac + val_frac >= 1:
        raise ValueError(
            f"test_frac + val_frac must be < 1 so that some users remain for training, got "
            f"{test_frac} + {val_frac}"
        )
    q = _check_frac("item_cutoff_quantile", item_cutoff_quantile, allow_zero=False)
    min_ratings = _check_int("min_ratings", min_ratings, low=1)
    max_ratings = _check_int("max_ratings", max_ratings, low=1, allow_none=True)
    if max_ratings is not None and max_ratings < min_ratings:
        raise ValueError(f"max_ratings={max_ratings} is smaller than min_ratings={min_ratings}")
    if cold_support not in ("new", "old"):
        raise ValueError(f"cold_support must be 'new' or 'old', got {cold_support!r}")
    temporal_query_size = _check_int("temporal_query_size", temporal_query_size, low=1)

    df, t = _prepare(ratings)
    u = df["user_id"].to_numpy()
    it = df["item_id"].to_numpy()
    users, uinv = np.unique(u, return_inverse=True)
    n_users = len(users)
    hi = np.inf if max_ratings is None else max_ratings

    def per_user(mask: np.ndarray) -> np.ndarray:
        return np.bincount(uinv, weights=mask.astype(np.float64), minlength=n_users).astype(np.int64)

    new_items = np.empty(0, dtype=np.int64)
    cutoff: Any = None
    is_new = np.zeros(len(df), dtype=bool)
    stages: list[tuple[str, np.ndarray]] = []
    intro = f"{n_users} users, {len(df)} ratings"
    if scenario in _ITEM_SCENARIOS:
        tc = float(np.quantile(t, q, method="lower"))
        cutoff = df["timestamp"].iloc[int(np.flatnonzero(t == tc)[0])]
        items, iinv = np.unique(it, return_inverse=True)
        first = np.full(len(items), np.inf)
        np.minimum.at(first, iinv, t)
        new_items = items[first > tc].astype(np.int64)
        if new_items.size == 0:
            raise ValueError(
                f"{scenario}: no item is first rated after the cutoff {cutoff} (quantile "
                f"item_cutoff_quantile={q} of the timestamps); lower item_cutoff_quantile"
            )
        is_new = (first > tc)[iinv]
        intro += f"; {len(new_items)} new items (first rated after {cutoff}, quantile {q})"

    if scenario == "user-cold":
        can_s = np.ones(len(df), dtype=bool)
        can_q = can_s
    elif scenario in _ITEM_SCENARIOS:
        can_q = is_new
        can_s = is_new if cold_support == "new" else ~is_new
        stages.append(("rated at least one new item", per_user(is_new) >= 1))
        if scenario == "item-cold":
            stages.append(
                ("also rated an old item (an existing user, present in training)", per_user(~is_new) >= 1)
            )
        elif cold_support == "old":
            stages.append(("rated an old item to use as support (cold_support='old')", per_user(~is_new) >= 1))
    else:  # temporal
        counts = per_user(np.ones(len(df), dtype=bool))
        # rows are sorted by (user, time, item): position from the end within the user
        starts = np.searchsorted(u, users)
        pos = np.arange(len(df)) - starts[uinv]
        from_end = counts[uinv] - 1 - pos
        can_q = from_end < temporal_query_size
        can_s = ~can_q
        stages.append(
            (f"have more than temporal_query_size={temporal_query_size} ratings "
             "(so at least one earlier rating remains as support)", counts > temporal_query_size)
        )
    in_pool = can_s | can_q
    pool = per_user(in_pool)
    what = "ratings" if scenario in ("user-cold", "temporal") else (
        "ratings of new items" if cold_support == "new" else "ratings"
    )
    stages.append(
        (f"have between min_ratings={min_ratings} and max_ratings={max_ratings} {what}",
         (pool >= min_ratings) & (pool <= hi))
    )
    ok = np.ones(n_users, dtype=bool)
    trail = []
    for desc, mask in stages:
        ok &= mask
        trail.append(f"{int(ok.sum())} {desc}")
        if not ok.any():
            raise ValueError(
                f"{scenario} split has no evaluation users: {intro}; " + "; ".join(trail)
                + f". The filter '{desc}' removed every user: relax it (e.g. min_ratings, "
                "max_ratings, item_cutoff_quantile) or use more data."
            )
    eligible = users[ok]
    n_el = len(eligible)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(eligible)
    if scenario == "item-cold":
        n_val = int(round(n_el * val_frac / (val_frac + test_frac)))
        n_val = min(n_val, n_el - 1)
        n_test = n_el - n_val
    else:
        n_test, n_val = _n_of(test_frac, n_el), _n_of(val_frac, n_el)
        if n_test + n_val > n_el:
            raise ValueError(
                f"{scenario}: only {n_el} eligible users, too few for {n_test} test and {n_val} "
                "validation users; lower val_frac/test_frac or relax min_ratings/max_ratings"
            )
    test_users = np.sort(perm[:n_test]).astype(np.int64)
    val_users = np.sort(perm[n_test:n_test + n_val]).astype(np.int64)
    in_test = np.isin(u, test_users)
    in_val = np.isin(u, val_users)
    in_eval = in_test | in_val

    if scenario == "user-cold":
        train_mask = ~in_eval
    elif scenario == "item-cold":
        train_mask = ~is_new
    elif scenario == "user+item-cold":
        train_mask = ~in_eval & ~is_new
    else:
        train_mask = ~(in_eval & can_q)
    train = df.loc[train_mask].reset_index(drop=True)
    if len(train) == 0:
        raise ValueError(f"{scenario}: the training part is empty; lower test_frac/val_frac")

    def eval_frame(mask: np.ndarray) -> pd.DataFrame:
        m = mask & in_pool
        out = df.loc[m].reset_index(drop=True)
        out["can_support"] = can_s[m]
        out["can_query"] = can_q[m]
        return out

    params = dict(
        seed=seed, test_frac=test_frac, val_frac=val_frac, item_cutoff_quantile=q,
        min_ratings=min_ratings, max_ratings=max_ratings, cold_support=cold_support,
        temporal_query_size=temporal_query_size,
    )
    return Split(
        scenario=scenario,
        train=train,
        val=eval_frame(in_val),
        test=eval_frame(in_test),
        val_users=val_users,
        test_users=test_users,
        new_items=new_items,
        cutoff=cutoff,
        params=params,
    )


def scenario_counts(split: Split) -> pd.DataFrame:
    """Users, items and interactions per part of a split (a table for chapter 2).

    Returns:
        DataFrame indexed by part ("train", "val", "test") with integer columns ``users``,
        ``items``, ``interactions``, ``new_items`` (distinct new items in the part) and
        ``query_candidates`` (rows usable as query; 0 for train). ``.attrs`` holds the scenario
        and cutoff.
    """
    if not isinstance(split, Split):
        raise TypeError(f"split must be a Split (from make_split), got {type(split).__name__}")
    rows = {}
    for name in ("train", "val", "test"):
        f = getattr(split, name)
        items = f["item_id"].to_numpy()
        rows[name] = dict(
            users=int(f["user_id"].nunique()),
            items=int(len(np.unique(items))),
            interactions=int(len(f)),
            new_items=int(np.isin(np.unique(items), split.new_items).sum()),
            query_candidates=int(f["can_query"].sum()) if "can_query" in f.columns else 0,
        )
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "part"
    out.attrs["scenario"] = split.scenario
    out.attrs["cutoff"] = split.cutoff
    return out


# --------------------------------------------------------------------------- episodes


@dataclass(eq=False)
class Episode:
    """One task: a user's support set (to adapt on) and query set (to evaluate on).

    Items are raw item ids. Within each set the rows are in time order (ties by item id).
    Shapes: support_* (k,), query_* (n,); items int64, ratings float64, times float64 seconds
    since the Unix epoch (numeric input timestamps are passed through unchanged).
    """

    user_id: int
    support_items: np.ndarray
    support_ratings: np.ndarray
    support_times: np.ndarray
    query_items: np.ndarray
    query_ratings: np.ndarray
    query_times: np.ndarray

    @property
    def k(self) -> int:
        """Support size."""
        return len(self.support_items)

    @property
    def n(self) -> int:
        """Query size."""
        return len(self.query_items)

    def __repr__(self) -> str:
        return f"Episode(user_id={self.user_id}, k={self.k}, n={self.n})"


@dataclass(frozen=True)
class EpisodePreset:
    """Named episode settings. ``k_support=None`` means "all remaining support candidates".
    Users whose candidate count lies outside ``[min_ratings, max_ratings]`` are skipped."""

    name: str
    k_support: int | None
    n_query: int | None
    min_ratings: int | None
    max_ratings: int | None


#: MeLU (Lee et al. 2019): users with 13-100 ratings, 10 random query items, the rest support.
MELU_PRESET = EpisodePreset("melu", k_support=None, n_query=10, min_ratings=13, max_ratings=100)
PRESETS: dict[str, EpisodePreset] = {"melu": MELU_PRESET}


class NotEnoughRatingsError(ValueError):
    """A user cannot supply the requested support/query sizes (see ``on_short``)."""


def _user_rng(seed: int, user_id: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(user_id) % (1 << 63)]))


def _draw(
    uid: int, can_s: np.ndarray, can_q: np.ndarray, k: int | None, n: int | None,
    order: str, seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (into the user's time-sorted rows) of the support and query sets."""
    s_idx = np.flatnonzero(can_s)
    q_idx = np.flatnonzero(can_q)
    overlap = bool(np.any(can_s & can_q))
    hint = (
        "; keep only users with enough ratings (make_split(min_ratings=...), "
        "make_episodes(min_ratings=...)) or pass on_short='skip'"
    )
    if k is None and n is None and overlap:
        raise ValueError(
            "k_support and n_query cannot both be None when support and query come from the same "
            "interactions; set at least one of them"
        )

    def short(msg: str) -> NotEnoughRatingsError:
        return NotEnoughRatingsError(
            f"user {uid} has {len(np.flatnonzero(can_s | can_q))} candidate ratings "
            f"({len(s_idx)} usable as support, {len(q_idx)} as query): {msg}{hint}"
        )

    if order == "random":
        rng = _user_rng(seed, uid)
        if n is None:
            if len(s_idx) < k:
                raise short(f"k_support={k} is larger than the {len(s_idx)} support candidates")
            sup = rng.choice(s_idx, size=k, replace=False)
            qry = np.setdiff1d(q_idx, sup)
            if len(qry) == 0:
                raise short(f"no query candidate is left after drawing k_support={k}")
        else:
            if len(q_idx) < n:
                raise short(f"n_query={n} is larger than the {len(q_idx)} query candidates")
            qry = rng.choice(q_idx, size=n, replace=False)
            rest = np.setdiff1d(s_idx, qry)
            if k is None:
                sup = rest
                if len(sup) == 0:
                    raise short(f"no support candidate is left after drawing n_query={n}")
            else:
                if len(rest) < k:
                    raise short(
                        f"k_support={k} is larger than the {len(rest)} support candidates left "
                        f"after drawing n_query={n}"
                    )
                sup = rng.choice(rest, size=k, replace=False)
    else:  # time: rows are sorted by time, positions encode time order
        if k is None:
            if len(q_idx) < n:
                raise short(f"n_query={n} is larger than the {len(q_idx)} query candidates")
            qry = q_idx[len(q_idx) - n:]
            sup = s_idx[s_idx < qry[0]]
            if len(sup) == 0:
                raise short(f"no support candidate precedes the latest n_query={n} query candidates")
        else:
            # the earliest query position with at least k support candidates before it
            n_before = np.searchsorted(s_idx, q_idx)  # support candidates strictly before
            ok = np.flatnonzero(n_before >= max(k, 1))
            if len(ok) == 0:
                raise short(f"no query candidate has k_support={k} support candidates before it")
            start = ok[0]
            avail = q_idx[start:]
            if n is not None and len(avail) < n:
                raise short(
                    f"only {len(avail)} query candidates follow the first {k} support candidates, "
                    f"fewer than n_query={n}"
                )
            qry = avail if n is None else avail[:n]
            before = s_idx[s_idx < qry[0]]
            sup = before[len(before) - k:]
    return np.sort(sup), np.sort(qry)


def _resolve_source(source: Any, users: Any, query_pool: Any) -> tuple[pd.DataFrame, np.ndarray]:
    """Return (frame with can_support/can_query, requested users)."""
    if isinstance(source, Split):
        if query_pool is not None:
            raise TypeError(
                "query_pool cannot be combined with a Split: the split's can_query column defines "
                "the query pool; pass a DataFrame (e.g. split.train) to set query_pool yourself"
            )
        if isinstance(users, str):
            if users == "train":
                frame = source.train
                users = source.train_users
            elif users in ("val", "test"):
                frame = getattr(source, users)
                users = getattr(source, f"{users}_users")
            else:
                raise ValueError(f"users={users!r}: use 'train', 'val', 'test' or an array of user ids")
        else:
            if users is None:
                raise ValueError("with a Split, pass users='train', 'val', 'test' or an array of user ids")
            frame = pd.concat([source.val, source.test], ignore_index=True)
            arr = np.atleast_1d(np.asarray(users)).ravel()
            bad = arr[~np.isin(arr, frame["user_id"].to_numpy())]
            if len(bad):
                raise ValueError(
                    f"user(s) {bad[:5].tolist()} are not evaluation users of this split; pass "
                    "users='val'/'test', or users='train' / make_episodes(split.train, ...) for "
                    "training episodes"
                )
        return frame, users
    if isinstance(source, pd.DataFrame):
        frame = source
        if isinstance(users, str):
            raise ValueError(f"users={users!r} is only meaningful with a Split; pass an array of user ids")
        if users is None:
            users = np.unique(frame["user_id"].to_numpy()) if "user_id" in frame.columns else np.empty(0)
        if query_pool is not None:
            qp = np.unique(np.asarray(query_pool))
            if qp.ndim != 1 or not np.issubdtype(qp.dtype, np.integer):
                raise TypeError("query_pool must be a 1-d array-like of integer item ids (or None)")
            frame = frame.copy()
            isq = np.isin(frame["item_id"].to_numpy(), qp)
            base_s = frame["can_support"].to_numpy(bool) if "can_support" in frame.columns else True
            base_q = frame["can_query"].to_numpy(bool) if "can_query" in frame.columns else True
            frame["can_support"] = base_s & ~isq
            frame["can_query"] = base_q & isq
        return frame, users
    raise TypeError(f"source must be a Split or a ratings DataFrame, got {type(source).__name__}")


def make_episodes(
    source: Split | pd.DataFrame,
    users: Any = None,
    *,
    k_support: int | None = _UNSET,
    n_query: int | None = _UNSET,
    seed: int = 0,
    order: str = "random",
    query_pool: Any = None,
    preset: str | EpisodePreset | None = None,
    min_ratings: int | None = None,
    max_ratings: int | None = None,
    on_short: str = "raise",
) -> list[Episode]:
    """Build one support/query episode per user.

    Args:
        source: a :class:`Split` (episodes of its evaluation users, drawn from ``split.val`` /
            ``split.test`` respecting ``can_support`` / ``can_query``), or a ratings DataFrame
            (e.g. ``split.train`` for meta-training episodes; without those columns every row is
            both a support and a query candidate).
        users: array of user ids; or with a Split: "train", "val" or "test"; with a DataFrame,
            None means every user in it. Episodes come back in this order.
        k_support: support size ("k-shot"); None = all support candidates left after the query.
        n_query: query size; None = all query candidates left after the support.
        seed: episodes are drawn with a generator seeded by (seed, user_id), so a user's episode
            depends only on the seed and that user's data, not on the other users requested.
        order: "random" (uniform draws) or "time": support before query in time. With k given,
            the query starts at the earliest query candidate that has k support candidates
            before it, the support is the k latest candidates before the query and the query the
            next n_query candidates (user-cold: first k ratings are support, the next n query;
            temporal: the k most recent earlier ratings and the first n of the query pool).
            With k_support=None the query is the latest n_query candidates and the support all
            candidates before it.
        query_pool: DataFrame source only: item ids that may be queried; other items become
            support-only (e.g. ``query_pool=split.new_items`` on a ratings frame).
        preset: "melu" / :data:`MELU_PRESET` sets k_support, n_query and (unless given)
            min/max_ratings; ``order`` stays as passed (MeLU draws at random).
        min_ratings, max_ratings: skip users whose candidate count is outside this range.
        on_short: "raise" (default) or "skip" users that cannot supply k_support / n_query.

    Returns:
        list of :class:`Episode`, one per kept user, in the order of ``users``.

    Raises:
        NotEnoughRatingsError (a ValueError): a user has too few ratings (message: user id,
            counts, k, what to do). ValueError: unknown users, bad sizes. TypeError: wrong types.
    """
    if preset is not None:
        if isinstance(preset, str):
            if preset not in PRESETS:
                raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
            preset = PRESETS[preset]
        if not isinstance(preset, EpisodePreset):
            raise TypeError(f"preset must be a name or an EpisodePreset, got {type(preset).__name__}")
        if k_support is not _UNSET or n_query is not _UNSET:
            raise ValueError(
                f"preset={preset.name!r} sets k_support and n_query; do not pass them as well"
            )
        k_support, n_query = preset.k_support, preset.n_query
        min_ratings = preset.min_ratings if min_ratings is None else min_ratings
        max_ratings = preset.max_ratings if max_ratings is None else max_ratings
    if k_support is _UNSET or n_query is _UNSET:
        raise TypeError("make_episodes needs k_support= and n_query= (ints or None), or preset=")
    k = _check_int("k_support", k_support, low=1, allow_none=True)
    n = _check_int("n_query", n_query, low=1, allow_none=True)
    seed = _check_seed(seed)
    if order not in ("random", "time"):
        raise ValueError(f"order must be 'random' or 'time', got {order!r}")
    if on_short not in ("raise", "skip"):
        raise ValueError(f"on_short must be 'raise' or 'skip', got {on_short!r}")
    lo = _check_int("min_ratings", min_ratings, low=1, allow_none=True)
    hi = _check_int("max_ratings", max_ratings, low=1, allow_none=True)

    frame, users = _resolve_source(source, users, query_pool)
    df, t = _prepare(frame, "source")
    users = np.asarray(users)
    if users.ndim != 1:
        raise ValueError(f"users must be a 1-d array of user ids, got shape {users.shape}")
    if users.size and not np.issubdtype(users.dtype, np.integer):
        raise TypeError(f"user ids must be integers, got dtype {users.dtype}")
    uniq, cnt = np.unique(users, return_counts=True)
    if np.any(cnt > 1):
        raise ValueError(f"users contains duplicates, e.g. {uniq[cnt > 1][:5].tolist()}")

    u = df["user_id"].to_numpy()
    items = df["item_id"].to_numpy().astype(np.int64)
    rat = df["rating"].to_numpy().astype(np.float64)
    cs = df["can_support"].to_numpy(bool) if "can_support" in df.columns else np.ones(len(df), bool)
    cq = df["can_query"].to_numpy(bool) if "can_query" in df.columns else np.ones(len(df), bool)
    starts = np.searchsorted(u, users, side="left")
    ends = np.searchsorted(u, users, side="right")
    absent = users[starts == ends]
    if len(absent):
        raise ValueError(f"user(s) {absent[:5].tolist()} have no interactions in the source")

    episodes: list[Episode] = []
    for uid, a, b in zip(users.tolist(), starts.tolist(), ends.tolist()):
        s_mask, q_mask = cs[a:b], cq[a:b]
        n_cand = int(np.count_nonzero(s_mask | q_mask))
        if (lo is not None and n_cand < lo) or (hi is not None and n_cand > hi):
            continue
        try:
            sup, qry = _draw(uid, s_mask, q_mask, k, n, order, seed)
        except NotEnoughRatingsError:
            if on_short == "skip":
                continue
            raise
        sup = sup + a
        qry = qry + a
        episodes.append(
            Episode(
                user_id=int(uid),
                support_items=items[sup], support_ratings=rat[sup], support_times=t[sup],
                query_items=items[qry], query_ratings=rat[qry], query_times=t[qry],
            )
        )
    return episodes


# --------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class ItemIndex:
    """Raw item ids <-> contiguous indices 0..n-1, with a dedicated padding index ``n``.

    Use ``torch.nn.Embedding(index.num_embeddings, d, padding_idx=index.pad_index)``.
    """

    item_ids: np.ndarray  # sorted unique raw ids, shape (n,)

    @classmethod
    def from_ids(cls, ids: Any) -> "ItemIndex":
        """Build from any iterable / array / Series of integer item ids (duplicates allowed)."""
        arr = np.unique(np.asarray(ids))
        if arr.size == 0:
            raise ValueError("ItemIndex needs at least one item id")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"item ids must be integers, got dtype {arr.dtype}")
        return cls(item_ids=arr.astype(np.int64))

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def pad_index(self) -> int:
        """The padding index (= number of items); never a real item."""
        return len(self.item_ids)

    @property
    def num_embeddings(self) -> int:
        """Rows an embedding table needs: the items plus the padding row."""
        return len(self.item_ids) + 1

    def encode(self, ids: Any, unknown: str = "raise") -> np.ndarray:
        """Raw ids (any shape) -> int64 indices; unknown ids raise, or map to the pad index
        with ``unknown="pad"``."""
        arr = np.asarray(ids)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"item ids must be integers, got dtype {arr.dtype}")
        pos = np.searchsorted(self.item_ids, arr)
        pos_c = np.minimum(pos, len(self.item_ids) - 1)
        known = self.item_ids[pos_c] == arr
        if not np.all(known):
            if unknown == "raise":
                bad = np.unique(arr[~known])[:5].tolist()
                raise KeyError(
                    f"item id(s) {bad} are not in this ItemIndex; build it from every item you will "
                    "encode (e.g. ItemIndex.from_ids(ml.items.item_id)) or pass unknown='pad'"
                )
            if unknown != "pad":
                raise ValueError(f"unknown must be 'raise' or 'pad', got {unknown!r}")
        return np.where(known, pos_c, self.pad_index).astype(np.int64)

    def decode(self, idx: Any) -> np.ndarray:
        """Indices (any shape) -> raw ids; the pad index raises."""
        arr = np.asarray(idx, dtype=np.int64)
        if np.any((arr < 0) | (arr >= len(self.item_ids))):
            raise IndexError(f"indices must lie in [0, {len(self.item_ids)}) (the pad index has no item)")
        return self.item_ids[arr]


@dataclass
class EpisodeBatch:
    """A padded batch of T episodes; S, Q = padded support / query sizes.

    Fields (tensors on one device):
        user_ids [T] long
        support_items [T, S] long, support_ratings [T, S] (default float dtype), support_times [T, S] float64,
        support_mask [T, S] bool (True = real interaction)
        query_items [T, Q] long, query_ratings [T, Q] (default float dtype), query_times [T, Q] float64,
        query_mask [T, Q] bool
        support_features [T, S, ...], query_features [T, Q, ...]: ``featurize`` output or None
        pad_index: the item value at padded positions (ItemIndex.pad_index, or -1 for raw ids);
        padded ratings, times and features are 0.
    """

    user_ids: torch.Tensor
    support_items: torch.Tensor
    support_ratings: torch.Tensor
    support_times: torch.Tensor
    support_mask: torch.Tensor
    query_items: torch.Tensor
    query_ratings: torch.Tensor
    query_times: torch.Tensor
    query_mask: torch.Tensor
    support_features: torch.Tensor | None = None
    query_features: torch.Tensor | None = None
    pad_index: int = -1

    @property
    def num_tasks(self) -> int:
        return int(self.user_ids.shape[0])

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device: Any) -> "EpisodeBatch":
        """A copy with every tensor on ``device``."""
        kw = {}
        for name, v in self.__dict__.items():
            kw[name] = v.to(device) if isinstance(v, torch.Tensor) else v
        return EpisodeBatch(**kw)


def _pad_sizes(pad_to: Any, s_max: int, q_max: int) -> tuple[int, int]:
    if pad_to is None:
        return s_max, q_max
    if isinstance(pad_to, (int, np.integer)) and not isinstance(pad_to, bool):
        s, q = int(pad_to), int(pad_to)
    elif isinstance(pad_to, (tuple, list)) and len(pad_to) == 2:
        s, q = int(pad_to[0]), int(pad_to[1])
    else:
        raise TypeError(f"pad_to must be None, an int or a pair (S, Q), got {pad_to!r}")
    if s < s_max or q < q_max:
        raise ValueError(
            f"pad_to=({s}, {q}) is smaller than the largest support ({s_max}) / query ({q_max}) "
            "set in this batch; raise pad_to or leave it None"
        )
    return s, q


def collate_episodes(
    episodes: Sequence[Episode],
    featurize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pad_to: int | tuple[int, int] | None = None,
    device: Any = None,
    item_index: ItemIndex | None = None,
) -> EpisodeBatch:
    """Pad a list of episodes into one :class:`EpisodeBatch` (shapes in its docstring).

    Args:
        episodes: non-empty sequence of :class:`Episode`.
        featurize: optional callable mapping a long tensor of item indices, shape (m,), on
            ``device`` to features, shape (m, ...). It is called only on real (unpadded) items;
            padded positions get zero features.
        pad_to: None (pad to the largest set in the batch), an int for both, or (S, Q).
        device: where the tensors go (default CPU).
        item_index: if given, items are encoded to 0..n-1 and padded with ``item_index.pad_index``;
            otherwise raw ids are kept and padded with -1 (so an unmasked lookup fails loudly).
    """
    if isinstance(episodes, Episode) or not isinstance(episodes, Sequence):
        raise TypeError("episodes must be a list of Episode objects")
    if len(episodes) == 0:
        raise ValueError("episodes is empty; nothing to collate")
    for e in episodes:
        if not isinstance(e, Episode):
            raise TypeError(f"episodes must contain Episode objects, got {type(e).__name__}")
    if item_index is not None and not isinstance(item_index, ItemIndex):
        raise TypeError(f"item_index must be an ItemIndex, got {type(item_index).__name__}")
    if featurize is not None and not callable(featurize):
        raise TypeError("featurize must be callable (item index tensor -> feature tensor)")
    dev = torch.device("cpu") if device is None else torch.device(device)
    pad = -1 if item_index is None else item_index.pad_index
    T = len(episodes)
    S, Q = _pad_sizes(pad_to, max(e.k for e in episodes), max(e.n for e in episodes))

    def block(names: tuple[str, str, str], width: int):
        items = np.full((T, width), pad, dtype=np.int64)
        rats = np.zeros((T, width), dtype=np.float64)
        times = np.zeros((T, width), dtype=np.float64)
        mask = np.zeros((T, width), dtype=bool)
        for r, e in enumerate(episodes):
            its = getattr(e, names[0])
            m = len(its)
            items[r, :m] = its if item_index is None else item_index.encode(its)
            rats[r, :m] = getattr(e, names[1])
            times[r, :m] = getattr(e, names[2])
            mask[r, :m] = True
        return (
            torch.as_tensor(items, device=dev), torch.as_tensor(rats, dtype=torch.get_default_dtype(), device=dev),
            torch.as_tensor(times, device=dev), torch.as_tensor(mask, device=dev),
        )

    s_items, s_rat, s_t, s_mask = block(("support_items", "support_ratings", "support_times"), S)
    q_items, q_rat, q_t, q_mask = block(("query_items", "query_ratings", "query_times"), Q)

    def feats(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        real = items[mask]
        f = featurize(real)
        if not isinstance(f, torch.Tensor) or f.ndim < 1 or f.shape[0] != real.shape[0]:
            raise ValueError(
                f"featurize must return a tensor with one row per item ({real.shape[0]} rows), "
                f"got {type(f).__name__} {getattr(f, 'shape', '')}"
            )
        out = torch.zeros(tuple(items.shape) + tuple(f.shape[1:]), dtype=f.dtype, device=f.device)
        out[mask.to(f.device)] = f
        return out

    return EpisodeBatch(
        user_ids=torch.as_tensor(np.array([e.user_id for e in episodes], dtype=np.int64), device=dev),
        support_items=s_items, support_ratings=s_rat, support_times=s_t, support_mask=s_mask,
        query_items=q_items, query_ratings=q_rat, query_times=q_t, query_mask=q_mask,
        support_features=None if featurize is None else feats(s_items, s_mask),
        query_features=None if featurize is None else feats(q_items, q_mask),
        pad_index=pad,
    )


def iterate_meta_batches(
    episodes: Sequence[Episode],
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    **collate_kwargs: Any,
) -> Iterator[EpisodeBatch]:
    """Yield :class:`EpisodeBatch` objects of ``batch_size`` tasks (one pass over ``episodes``).

    The order is a permutation seeded by ``seed`` (``shuffle=False``: the given order); the last,
    smaller batch is kept unless ``drop_last``. ``collate_kwargs`` go to :func:`collate_episodes`
    (``item_index``, ``featurize``, ``pad_to``, ``device``).
    """
    batch_size = _check_int("batch_size", batch_size, low=1)
    seed = _check_seed(seed)
    if not isinstance(episodes, Sequence) or len(episodes) == 0:
        raise ValueError("episodes must be a non-empty list of Episode objects")
    order = np.random.default_rng(seed).permutation(len(episodes)) if shuffle else np.arange(len(episodes))
    for a in range(0, len(order), batch_size):
        idx = order[a:a + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield collate_episodes([episodes[i] for i in idx], **collate_kwargs)


# --------------------------------------------------------------------------- leakage checks


class LeakageError(AssertionError):
    """Raised by :meth:`LeakageReport.raise_if_bad` when a split or episodes leak."""


@dataclass
class LeakageReport:
    """Result of :func:`check_no_leakage`. Each problem is ``"<code>: <message>"`` with code one of
    user-overlap, query-in-train, new-item-in-train, query-not-new, new-item-before-cutoff,
    time-order, train-after-query, query-in-support, duplicate-in-episode, unknown-user."""

    scenario: str
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def codes(self) -> set[str]:
        return {p.split(":", 1)[0] for p in self.problems}

    def raise_if_bad(self) -> None:
        """Raise :class:`LeakageError` listing every problem; do nothing when ``ok``."""
        if self.problems:
            raise LeakageError(
                f"{len(self.problems)} leakage problem(s) in the {self.scenario} split:\n- "
                + "\n- ".join(self.problems)
            )

    def __str__(self) -> str:
        head = f"LeakageReport({self.scenario}): {len(self.checks)} checks, "
        return head + ("ok" if self.ok else f"{len(self.problems)} problem(s):\n- " + "\n- ".join(self.problems))


def _pair_in(u: np.ndarray, i: np.ndarray, ref_u: np.ndarray, ref_i: np.ndarray) -> np.ndarray:
    """Boolean mask: is (u[j], i[j]) one of the reference pairs? shape (len(u),)."""
    if len(u) == 0:
        return np.zeros(0, dtype=bool)
    ref = pd.MultiIndex.from_arrays([ref_u, ref_i])
    return pd.MultiIndex.from_arrays([u, i]).isin(ref)


def _fmt_pairs(u: np.ndarray, i: np.ndarray) -> str:
    return ", ".join(f"(user {a}, item {b})" for a, b in zip(u[:3].tolist(), i[:3].tolist()))


def check_no_leakage(split: Split, episodes: Sequence[Episode] | None = None) -> LeakageReport:
    """Re-check a split (and optionally its evaluation episodes) for leakage, from scratch.

    Split checks: val and test users disjoint; no query-pool interaction in ``train``;
    user-cold / user+item-cold: no evaluation user in ``train``; item scenarios: no new item in
    ``train``, query candidates only on new items, no new item rated at or before the cutoff;
    temporal: per evaluation user, every support-pool time <= every query-pool time and every
    training time <= every query-pool time.

    Episode checks (``episodes`` = evaluation episodes, e.g. from ``make_episodes(split, "test")``):
    no item both in support and query (or twice in a set); no query interaction in ``train``;
    user-cold / user+item-cold: the user is not in ``train``; item scenarios: query items are new;
    temporal: support times <= query times and the user's training times <= query times.

    Returns:
        :class:`LeakageReport`; call ``.raise_if_bad()`` to turn problems into a LeakageError.
    """
    if not isinstance(split, Split):
        raise TypeError(f"split must be a Split (from make_split), got {type(split).__name__}")
    sc = _check_scenario(split.scenario)
    rep = LeakageReport(scenario=sc)
    P = rep.problems
    tr = split.train
    tr_u = tr["user_id"].to_numpy()
    tr_i = tr["item_id"].to_numpy()
    tr_t = _seconds(tr["timestamp"]) if len(tr) else np.zeros(0)
    train_users = np.unique(tr_u)
    new_items = np.asarray(split.new_items)
    ev = pd.concat([split.val, split.test], ignore_index=True)
    for col in ("can_support", "can_query"):
        if col not in ev.columns:
            raise ValueError(f"split.val/split.test lack the column {col!r}; build the split with make_split")
    ev_u = ev["user_id"].to_numpy()
    ev_i = ev["item_id"].to_numpy()
    ev_t = _seconds(ev["timestamp"]) if len(ev) else np.zeros(0)
    ev_q = ev["can_query"].to_numpy(bool)
    ev_s = ev["can_support"].to_numpy(bool)

    rep.checks.append("val/test users disjoint")
    both = np.intersect1d(split.val_users, split.test_users)
    if len(both):
        P.append(f"user-overlap: {len(both)} users are both validation and test users, e.g. {both[:5].tolist()}")
    frame_users = {"val": split.val["user_id"].to_numpy(), "test": split.test["user_id"].to_numpy()}
    for part in ("val", "test"):
        extra = np.setdiff1d(frame_users[part], getattr(split, f"{part}_users"))
        if len(extra):
            P.append(f"unknown-user: split.{part} holds users not in {part}_users, e.g. {extra[:5].tolist()}")

    rep.checks.append("no query candidate in train")
    leak = _pair_in(ev_u[ev_q], ev_i[ev_q], tr_u, tr_i)
    if leak.any():
        P.append(
            f"query-in-train: {int(leak.sum())} query candidates of evaluation users are in "
            f"split.train, e.g. {_fmt_pairs(ev_u[ev_q][leak], ev_i[ev_q][leak])}"
        )
    if sc in _DISJOINT_USER_SCENARIOS:
        rep.checks.append("evaluation users not in train")
        for part in ("val", "test"):
            bad = np.intersect1d(getattr(split, f"{part}_users"), train_users)
            if len(bad):
                P.append(
                    f"user-overlap: {len(bad)} {part} users also appear in split.train ({sc} needs "
                    f"disjoint users), e.g. {bad[:5].tolist()}"
                )
    if sc in _ITEM_SCENARIOS:
        rep.checks.append("new items never in train; queries on new items")
        bad = np.isin(tr_i, new_items)
        if bad.any():
            P.append(
                f"new-item-in-train: {int(bad.sum())} training interactions are on new items, e.g. "
                f"items {np.unique(tr_i[bad])[:5].tolist()}"
            )
        notnew = ev_q & ~np.isin(ev_i, new_items)
        if notnew.any():
            P.append(
                f"query-not-new: {int(notnew.sum())} query candidates are on old items, e.g. "
                f"{_fmt_pairs(ev_u[notnew], ev_i[notnew])}"
            )
        if split.cutoff is not None and len(ev):
            tc = float(_seconds(pd.Series([split.cutoff]))[0])
            early = np.isin(ev_i, new_items) & (ev_t <= tc)
            if early.any():
                P.append(
                    f"new-item-before-cutoff: {int(early.sum())} ratings of 'new' items are at or "
                    f"before the cutoff {split.cutoff}, e.g. items {np.unique(ev_i[early])[:5].tolist()}"
                )
    if sc == "temporal" and len(ev):
        rep.checks.append("support pool and training data precede each user's query pool")
        g = pd.DataFrame({"u": ev_u, "t": ev_t, "s": ev_s, "q": ev_q})
        qmin = g[g.q].groupby("u").t.min()
        smax = g[g.s].groupby("u").t.max()
        both_idx = qmin.index.intersection(smax.index)
        bad = both_idx[(smax.reindex(both_idx) > qmin.reindex(both_idx)).to_numpy()]
        if len(bad):
            P.append(
                f"time-order: {len(bad)} users have a support candidate later than a query "
                f"candidate, e.g. users {bad[:5].tolist()}"
            )
        tmax = pd.Series(tr_t).groupby(tr_u).max()
        common = qmin.index.intersection(tmax.index)
        bad = common[(tmax.reindex(common) > qmin.reindex(common)).to_numpy()]
        if len(bad):
            P.append(
                f"train-after-query: {len(bad)} evaluation users have training interactions later "
                f"than their first query candidate, e.g. users {bad[:5].tolist()}"
            )

    if episodes is not None:
        if isinstance(episodes, Episode) or not isinstance(episodes, Sequence):
            raise TypeError("episodes must be a list of Episode objects (or None)")
        rep.checks.append("episodes: query not in support, not in train, scenario rules")
        train_set = set(train_users.tolist())
        tmax = pd.Series(tr_t).groupby(tr_u).max().to_dict() if len(tr) else {}
        q_u, q_i = [], []
        for e in episodes:
            if not isinstance(e, Episode):
                raise TypeError(f"episodes must contain Episode objects, got {type(e).__name__}")
            inter = np.intersect1d(e.support_items, e.query_items)
            if len(inter):
                P.append(
                    f"query-in-support: user {e.user_id}'s episode has items {inter[:5].tolist()} "
                    "in both support and query"
                )
            for name, arr in (("support", e.support_items), ("query", e.query_items)):
                if len(np.unique(arr)) != len(arr):
                    P.append(f"duplicate-in-episode: user {e.user_id}'s {name} set repeats an item")
            q_u.append(np.full(len(e.query_items), e.user_id, dtype=np.int64))
            q_i.append(np.asarray(e.query_items, dtype=np.int64))
            if sc in _DISJOINT_USER_SCENARIOS and e.user_id in train_set:
                P.append(f"user-overlap: episode user {e.user_id} appears in split.train ({sc})")
            if sc in _ITEM_SCENARIOS:
                nn = e.query_items[~np.isin(e.query_items, new_items)]
                if len(nn):
                    P.append(
                        f"query-not-new: user {e.user_id}'s query has old items {nn[:5].tolist()}"
                    )
            if sc == "temporal" and e.n and e.k:
                if np.max(e.support_times) > np.min(e.query_times):
                    P.append(
                        f"time-order: user {e.user_id}'s latest support time is after their "
                        "earliest query time"
                    )
                if e.user_id in tmax and tmax[e.user_id] > np.min(e.query_times):
                    P.append(
                        f"train-after-query: user {e.user_id} has training interactions after "
                        "their earliest query"
                    )
        if q_u:
            qu, qi = np.concatenate(q_u), np.concatenate(q_i)
            leak = _pair_in(qu, qi, tr_u, tr_i)
            if leak.any():
                P.append(
                    f"query-in-train: {int(leak.sum())} episode query interactions are in "
                    f"split.train, e.g. {_fmt_pairs(qu[leak], qi[leak])}"
                )
    return rep
