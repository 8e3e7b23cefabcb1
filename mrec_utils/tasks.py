"""Users as tasks: cold-start splits, support/query episodes, one padded batch type, leakage checks.

>>> split = make_split(ratings, "user-cold", seed=0)                 # chapter 2
>>> test_eps = make_episodes(split, "test", preset="melu", seed=0)
>>> check_no_leakage(split, test_eps).raise_if_bad()
>>> batch = collate_episodes(test_eps[:32], item_index=ItemIndex.from_ids(ratings.item_id))

Input: a ratings frame with ``user_id``, ``item_id`` (ints), ``rating`` and ``timestamp`` (datetime64 or numbers), one
row per (user, item), as :func:`mrec_utils.data.load_movielens` returns. Rows are ordered by (user_id, timestamp,
item_id) everywhere, so no result depends on the input's row order.

A scenario (:data:`SCENARIOS`) says what meta-training may use (``split.train``) and, for each evaluation user, which
candidate interactions may be *support* and which *query* (the flags ``can_support`` / ``can_query`` of ``split.val`` /
``split.test``). Evaluation users need ``min_ratings`` to ``max_ratings`` candidates (MeLU's 13 and 100).

* ``"user-cold"``: test and validation users drawn at random; ``train`` = every other user's interactions; support and
  query from all of an evaluation user's interactions.
* ``"item-cold"`` (MeLU): an item is *new* if first rated strictly after the cutoff, the ``item_cutoff_quantile``
  quantile of all timestamps; ``train`` = every interaction on an old item. Evaluation users have rated an old item;
  ``cold_support="new"`` draws support and query from their ratings of new items, ``"old"`` the support from old items.
  All eligible users are evaluation users, divided ``val_frac : test_frac``.
* ``"user+item-cold"``: new items as in item-cold, users drawn as in user-cold; ``train`` = the other users' ratings of
  old items.
* ``"temporal"``: per user, the last ``temporal_query_size`` interactions are the query pool, the earlier ones the
  support pool; ``train`` = all but the evaluation users' query pools (SASRec's "leave the last n out"; item-cold is the
  global time cut).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mrec_utils.metrics import _need

SCENARIOS: tuple[str, ...] = ("user-cold", "item-cold", "user+item-cold", "temporal")
_ITEM_SCENARIOS = ("item-cold", "user+item-cold")
_DISJOINT_USER_SCENARIOS = ("user-cold", "user+item-cold")

Inputs = Union[Tensor, tuple[Tensor, ...]]
"""Model input: one tensor, or a tuple of tensors passed as positional arguments to ``forward``."""


# ============================================================================ the padded batch
@dataclass
class TaskBatch:
    """``T`` padded tasks with ``S`` support and ``Q`` query slots each (the one batch type of the book):
    inputs ``x_support [T, S, ...]`` (or a tuple of such tensors, passed as ``model(*x)``), targets
    ``y_support [T, S]``, the same ``[T, Q, ...]`` / ``[T, Q]`` for the query, and bool masks ``[T, S]`` /
    ``[T, Q]``, True for a real example (``None``: all real)."""

    x_support: Inputs
    y_support: Tensor
    x_query: Inputs
    y_query: Tensor
    mask_support: Tensor | None = None
    mask_query: Tensor | None = None

    def __post_init__(self) -> None:
        for side in ("support", "query"):
            y, mask = getattr(self, f"y_{side}"), getattr(self, f"mask_{side}")
            mask = torch.ones(y.shape[:2], dtype=torch.bool, device=y.device) if mask is None else mask.bool()
            setattr(self, f"mask_{side}", mask)

    def __len__(self) -> int:
        return int(self.y_support.shape[0])

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "TaskBatch":
        def on(x):
            return tuple(fn(t) for t in x) if isinstance(x, tuple) else fn(x)

        return TaskBatch(*(on(getattr(self, f.name)) for f in dataclasses.fields(self)))

    def subset(self, idx: Tensor | Sequence[int]) -> "TaskBatch":
        """The tasks at positions ``idx`` (a tensor or list of indices)."""
        i = torch.as_tensor(idx, device=self.y_support.device)
        return self._map(lambda t: t[i])

    def to(self, device: torch.device | str) -> "TaskBatch":
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device))


# ============================================================================ splits
@dataclass(frozen=True)
class SplitSettings:
    """The settings of :func:`make_split` (module docstring); every field is a keyword of it."""

    seed: int = 0
    test_frac: float = 0.2
    val_frac: float = 0.1
    item_cutoff_quantile: float = 0.8
    min_ratings: int = 13
    max_ratings: int | None = 100
    cold_support: str = "new"
    temporal_query_size: int = 10

    def __post_init__(self) -> None:
        for name in ("test_frac", "val_frac", "item_cutoff_quantile"):
            object.__setattr__(self, name, float(getattr(self, name)))
        _need(0 < self.test_frac and 0 <= self.val_frac and self.test_frac + self.val_frac < 1
              and 0 < self.item_cutoff_quantile < 1, "need 0 < test_frac, 0 <= val_frac, test_frac + val_frac < 1 "
              f"and 0 < item_cutoff_quantile < 1; got {self.test_frac}, {self.val_frac}, {self.item_cutoff_quantile}")
        _need(self.cold_support in ("new", "old"), f"cold_support must be 'new' or 'old', got {self.cold_support!r}")


@dataclass(frozen=True, repr=False)
class Split:
    """A leakage-free split for one scenario (module docstring): ``train`` (what meta-training may use),
    ``val`` / ``test`` (evaluation users' candidates with bool ``can_support``, ``can_query``), sorted
    int64 ``val_users``, ``test_users`` (disjoint) and ``new_items`` (item scenarios), the item
    ``cutoff`` (a timestamp value, or None) and the settings as ``params``."""

    scenario: str
    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    val_users: np.ndarray
    test_users: np.ndarray
    new_items: np.ndarray
    cutoff: pd.Timestamp | float | None
    params: dict = field(default_factory=dict)

    @property
    def train_users(self) -> np.ndarray:
        """Sorted unique user ids that appear in ``train``."""
        return np.unique(self.train["user_id"].to_numpy())

    def __repr__(self) -> str:
        cut = "" if self.cutoff is None else f", cutoff={self.cutoff}"
        return (f"Split({self.scenario!r}, train={len(self.train)} rows/{len(self.train_users)} users, "
                f"val={len(self.val_users)} users, test={len(self.test_users)} users, "
                f"new_items={len(self.new_items)}{cut})")


def _seconds(ts: pd.Series) -> np.ndarray:
    """Timestamps as float64 seconds since the Unix epoch (numbers are taken as given)."""
    if isinstance(ts.dtype, pd.DatetimeTZDtype):
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(ts.dtype):
        return (ts.to_numpy() - np.datetime64(0, "s")) / np.timedelta64(1, "s")
    _need(pd.api.types.is_numeric_dtype(ts.dtype) and not pd.api.types.is_bool_dtype(ts.dtype),
          f"column 'timestamp' has dtype {ts.dtype}; expected datetime64 or numbers (e.g. Unix seconds). "
          "Convert it with pd.to_datetime(..., unit='s', utc=True).", TypeError)
    return ts.to_numpy(dtype=np.float64)


def _prepare(ratings: pd.DataFrame, what: str = "ratings") -> tuple[pd.DataFrame, np.ndarray]:
    """Check a ratings frame (the boundary people touch); return it sorted by (user, time, item), freshly indexed,
    and its timestamps as float seconds."""
    _need(isinstance(ratings, pd.DataFrame), f"{what} must be a pandas DataFrame, got {type(ratings).__name__}", TypeError)
    missing = [c for c in ("user_id", "item_id", "rating", "timestamp") if c not in ratings.columns]
    _need(not missing, f"{what} is missing column(s) {missing}; expected user_id, item_id, rating, timestamp "
          "(the schema of mrec_utils.data.load_movielens; rename e.g. userId -> user_id)")
    _need(len(ratings) > 0, f"{what} is empty; nothing to split")
    for col in ("user_id", "item_id"):
        _need(pd.api.types.is_integer_dtype(ratings[col].dtype), f"column {col!r} must hold integers, got dtype "
              f"{ratings[col].dtype}; convert with {what}[{col!r}].astype('int64')", TypeError)
    _need(pd.api.types.is_numeric_dtype(ratings["rating"].dtype), f"column 'rating' must be numeric, got dtype "
          f"{ratings['rating'].dtype}", TypeError)
    n_na = ratings[["user_id", "item_id", "rating", "timestamp"]].isna().sum()
    if n_na.any():
        raise ValueError(f"column {n_na.index[n_na > 0][0]!r} has {n_na[n_na > 0].iloc[0]} missing values; drop or fill them first")
    t = _seconds(ratings["timestamp"])
    dup = ratings.duplicated(["user_id", "item_id"])
    _need(not dup.any(), f"{what} has {int(dup.sum())} repeated (user_id, item_id) pairs; keep one rating per pair, "
          f"e.g. {what}.sort_values('timestamp').drop_duplicates(['user_id', 'item_id'], keep='last')")
    order = np.lexsort((ratings["item_id"].to_numpy(), t, ratings["user_id"].to_numpy()))
    return ratings.iloc[order].reset_index(drop=True), t[order]


def _new_items(df: pd.DataFrame, t: np.ndarray, scenario: str, q: float):
    """(is_new per row, sorted new item ids, cutoff) for the item scenarios."""
    if scenario not in _ITEM_SCENARIOS:
        return np.zeros(len(df), dtype=bool), np.empty(0, dtype=np.int64), None
    tc = float(np.quantile(t, q, method="lower"))
    cutoff = df["timestamp"].iloc[int(np.flatnonzero(t == tc)[0])]
    items, iinv = np.unique(df["item_id"].to_numpy(), return_inverse=True)
    first = np.full(len(items), np.inf)
    np.minimum.at(first, iinv, t)
    new_items = items[first > tc].astype(np.int64)
    _need(new_items.size > 0, f"{scenario}: no item is first rated after the cutoff {cutoff} (quantile "
          f"item_cutoff_quantile={q} of the timestamps); lower item_cutoff_quantile")
    return (first > tc)[iinv], new_items, cutoff


def _pools(scenario: str, s: SplitSettings, df: pd.DataFrame, is_new: np.ndarray, per_user):
    """(can_support, can_query) per row and the eligibility filters [(description, mask over users)]."""
    if scenario == "user-cold":
        return np.ones(len(df), bool), np.ones(len(df), bool), []
    if scenario in _ITEM_SCENARIOS:
        stages = [("rated at least one new item", per_user(is_new) >= 1)]
        if scenario == "item-cold":
            stages.append(("also rated an old item (an existing user, present in training)", per_user(~is_new) >= 1))
        elif s.cold_support == "old":
            stages.append(("rated an old item to use as support (cold_support='old')", per_user(~is_new) >= 1))
        return (is_new if s.cold_support == "new" else ~is_new), is_new, stages
    u = df["user_id"].to_numpy()  # temporal: rows are sorted by (user, time, item)
    users, uinv, counts = np.unique(u, return_inverse=True, return_counts=True)
    from_end = counts[uinv] - 1 - (np.arange(len(df)) - np.searchsorted(u, users)[uinv])
    can_q = from_end < s.temporal_query_size
    stage = (f"have more than temporal_query_size={s.temporal_query_size} ratings (so at least one earlier "
             "rating remains as support)", counts > s.temporal_query_size)
    return ~can_q, can_q, [stage]


def _eligible_users(users: np.ndarray, stages: list, scenario: str, intro: str) -> np.ndarray:
    """Apply the filters in order; name the one that removed every user."""
    ok, trail = np.ones(len(users), dtype=bool), []
    for desc, mask in stages:
        ok &= mask
        trail.append(f"{int(ok.sum())} {desc}")
        _need(ok.any(), f"{scenario} split has no evaluation users: {intro}; " + "; ".join(trail)
              + f". The filter '{desc}' removed every user: relax it (e.g. min_ratings, max_ratings, "
              "item_cutoff_quantile) or use more data.")
    return users[ok]


def _draw_users(eligible: np.ndarray, scenario: str, s: SplitSettings) -> tuple[np.ndarray, np.ndarray]:
    """(test_users, val_users), sorted int64, drawn with ``default_rng(seed)``."""
    n_el = len(eligible)
    perm = np.random.default_rng(s.seed).permutation(eligible)
    if scenario == "item-cold":
        n_val = min(int(round(n_el * s.val_frac / (s.val_frac + s.test_frac))), n_el - 1)
        n_test = n_el - n_val
    else:
        n_test, n_val = (0 if f == 0 else max(1, int(round(f * n_el))) for f in (s.test_frac, s.val_frac))
        _need(n_test + n_val <= n_el, f"{scenario}: only {n_el} eligible users, too few for {n_test} test and "
              f"{n_val} validation users; lower val_frac/test_frac or relax min_ratings/max_ratings")
    return np.sort(perm[:n_test]).astype(np.int64), np.sort(perm[n_test:n_test + n_val]).astype(np.int64)


def make_split(ratings: pd.DataFrame, scenario: str, *, seed: int = 0, **settings) -> Split:
    """Split ``ratings`` (one row per user and item) for a cold-start ``scenario`` (module docstring);
    ``seed`` draws the evaluation users, ``settings`` are the other fields of :class:`SplitSettings`.
    ValueError: unknown scenario, bad fractions, or a filter that leaves no evaluation user (named)."""
    _need(scenario in SCENARIOS, f"unknown scenario {scenario!r}; valid scenarios are: {', '.join(SCENARIOS)}")
    s = SplitSettings(seed=seed, **settings)
    df, t = _prepare(ratings)
    u = df["user_id"].to_numpy()
    users, uinv = np.unique(u, return_inverse=True)

    def per_user(mask: np.ndarray) -> np.ndarray:
        return np.bincount(uinv, weights=mask.astype(np.float64), minlength=len(users)).astype(np.int64)

    is_new, new_items, cutoff = _new_items(df, t, scenario, s.item_cutoff_quantile)
    can_s, can_q, stages = _pools(scenario, s, df, is_new, per_user)
    pool = per_user(can_s | can_q)
    what = "ratings of new items" if scenario in _ITEM_SCENARIOS and s.cold_support == "new" else "ratings"
    hi = np.inf if s.max_ratings is None else s.max_ratings
    stages.append((f"have between min_ratings={s.min_ratings} and max_ratings={s.max_ratings} {what}",
                   (pool >= s.min_ratings) & (pool <= hi)))
    intro = f"{len(users)} users, {len(df)} ratings"
    if cutoff is not None:
        intro += f"; {len(new_items)} new items (first rated after {cutoff}, quantile {s.item_cutoff_quantile})"
    test_users, val_users = _draw_users(_eligible_users(users, stages, scenario, intro), scenario, s)
    in_test, in_val = np.isin(u, test_users), np.isin(u, val_users)
    in_eval = in_test | in_val
    keep = {"user-cold": ~in_eval, "item-cold": ~is_new, "user+item-cold": ~in_eval & ~is_new,
            "temporal": ~(in_eval & can_q)}[scenario]

    def eval_frame(rows: np.ndarray) -> pd.DataFrame:
        m = rows & (can_s | can_q)
        return df.loc[m].reset_index(drop=True).assign(can_support=can_s[m], can_query=can_q[m])

    return Split(scenario, df.loc[keep].reset_index(drop=True), eval_frame(in_val), eval_frame(in_test),
                 val_users, test_users, new_items, cutoff, dataclasses.asdict(s))


def scenario_counts(split: Split) -> pd.DataFrame:
    """Users, items, interactions, new items and query candidates per part ("train", "val", "test")
    of a split (chapter 2); ``.attrs`` holds scenario and cutoff."""
    rows = {}
    for name in ("train", "val", "test"):
        f = getattr(split, name)
        items = np.unique(f["item_id"].to_numpy())
        rows[name] = dict(users=int(f["user_id"].nunique()), items=len(items), interactions=len(f),
                          new_items=int(np.isin(items, split.new_items).sum()),
                          query_candidates=int(f["can_query"].sum()) if "can_query" in f.columns else 0)
    out = pd.DataFrame.from_dict(rows, orient="index").rename_axis("part")
    out.attrs.update(scenario=split.scenario, cutoff=split.cutoff)
    return out


# ============================================================================ episodes
@dataclass(eq=False)
class Episode:
    """One task: a user's support set (to adapt on) and query set (to be scored on). Raw item ids; each set in time
    order (ties by item id). Shapes: support_* (k,), query_* (n,); items int64, ratings float64, times float64 seconds
    (numeric input timestamps as given)."""

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
    """Episode sizes. ``k_support=None``: every support candidate left after the query (and ``n_query=None`` the
    converse). Users with a candidate count outside ``[min_ratings, max_ratings]`` (None: no bound) are skipped."""

    name: str
    k_support: int | None
    n_query: int | None
    min_ratings: int | None = None
    max_ratings: int | None = None


#: MeLU (Lee et al. 2019): users with 13-100 ratings, 10 random query items, the rest support.
MELU_PRESET = EpisodePreset("melu", k_support=None, n_query=10, min_ratings=13, max_ratings=100)
_PRESETS = {"melu": MELU_PRESET}


class NotEnoughRatingsError(ValueError):
    """A user cannot supply the requested support/query sizes (see ``on_short``)."""


def _sizes(preset: str | EpisodePreset | None, sizes: dict) -> EpisodePreset:
    """The episode sizes from ``preset`` (its limits overridable) or from k_support/n_query."""
    if preset is not None:
        _need(not isinstance(preset, str) or preset in _PRESETS,
              f"unknown preset {preset!r}; valid presets: {', '.join(_PRESETS)}")
        p = _PRESETS[preset] if isinstance(preset, str) else preset
        _need(not {"k_support", "n_query"} & set(sizes), f"preset={p.name!r} sets k_support and n_query; "
              "do not pass them as well")
        return dataclasses.replace(p, **{k: v for k, v in sizes.items() if v is not None})
    _need({"k_support", "n_query"} <= set(sizes), "make_episodes needs k_support= and n_query= (ints or None), "
          "or preset=", TypeError)
    return EpisodePreset("custom", **sizes)


def _draw_random(rng: np.random.Generator, s_idx: np.ndarray, q_idx: np.ndarray, k, n, short):
    """Support and query positions drawn at random (the query first when its size is given)."""
    if n is None:
        _need(len(s_idx) >= k, f"k_support={k} is larger than the {len(s_idx)} support candidates", short)
        sup = rng.choice(s_idx, size=k, replace=False)
        qry = np.setdiff1d(q_idx, sup)
        _need(len(qry) > 0, f"no query candidate is left after drawing k_support={k}", short)
        return sup, qry
    _need(len(q_idx) >= n, f"n_query={n} is larger than the {len(q_idx)} query candidates", short)
    qry = rng.choice(q_idx, size=n, replace=False)
    rest = np.setdiff1d(s_idx, qry)
    if k is None:
        _need(len(rest) > 0, f"no support candidate is left after drawing n_query={n}", short)
        return rest, qry
    _need(len(rest) >= k, f"k_support={k} is larger than the {len(rest)} support candidates left after drawing "
          f"n_query={n}", short)
    return rng.choice(rest, size=k, replace=False), qry


def _draw_in_time(s_idx: np.ndarray, q_idx: np.ndarray, k, n, short):
    """Support before query; positions index the user's time-sorted rows."""
    if k is None:
        _need(len(q_idx) >= n, f"n_query={n} is larger than the {len(q_idx)} query candidates", short)
        qry = q_idx[len(q_idx) - n:]
        sup = s_idx[s_idx < qry[0]]
        _need(len(sup) > 0, f"no support candidate precedes the latest n_query={n} query candidates", short)
        return sup, qry
    # the earliest query position with at least k support candidates before it
    ok = np.flatnonzero(np.searchsorted(s_idx, q_idx) >= max(k, 1))
    _need(len(ok) > 0, f"no query candidate has k_support={k} support candidates before it", short)
    avail = q_idx[ok[0]:]
    _need(n is None or len(avail) >= n, f"only {len(avail)} query candidates follow the first {k} support candidates, "
          f"fewer than n_query={n}", short)
    qry = avail if n is None else avail[:n]
    before = s_idx[s_idx < qry[0]]
    return before[len(before) - k:], qry


def _draw(uid: int, can_s: np.ndarray, can_q: np.ndarray, p: EpisodePreset, order: str, seed: int):
    """Positions (into the user's time-sorted rows) of the support and query sets, sorted."""
    s_idx, q_idx = np.flatnonzero(can_s), np.flatnonzero(can_q)
    _need(p.k_support is not None or p.n_query is not None or not np.any(can_s & can_q), "k_support and n_query "
          "cannot both be None when support and query come from the same interactions; set at least one of them")

    def short(msg: str) -> NotEnoughRatingsError:
        return NotEnoughRatingsError(
            f"user {uid} has {np.count_nonzero(can_s | can_q)} candidate ratings ({len(s_idx)} usable as "
            f"support, {len(q_idx)} as query): {msg}; keep only users with enough ratings "
            "(make_split(min_ratings=...), make_episodes(min_ratings=...)) or pass on_short='skip'")

    if order == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, int(uid) % (1 << 63)]))  # one stream per user
        sup, qry = _draw_random(rng, s_idx, q_idx, p.k_support, p.n_query, short)
    else:
        sup, qry = _draw_in_time(s_idx, q_idx, p.k_support, p.n_query, short)
    return np.sort(sup), np.sort(qry)


def _episode_frame(source: Split | pd.DataFrame, users, query_pool) -> tuple[pd.DataFrame, np.ndarray]:
    """(frame with can_support/can_query, requested users) for make_episodes."""
    if isinstance(source, Split):
        _need(query_pool is None, "query_pool cannot be combined with a Split: the split's can_query column "
              "defines the query pool; pass a DataFrame (e.g. split.train) to set query_pool yourself", TypeError)
        if isinstance(users, str):  # "train", "val" or "test"
            return getattr(source, users), getattr(source, f"{users}_users")
        frame = pd.concat([source.val, source.test], ignore_index=True)
        bad = np.setdiff1d(np.atleast_1d(users), frame["user_id"].to_numpy())
        _need(len(bad) == 0, f"user(s) {bad[:5].tolist()} are not evaluation users of this split; pass users='val'/"
              "'test', or users='train' / make_episodes(split.train, ...) for training episodes")
        return frame, users
    if users is None:
        users = np.unique(source["user_id"].to_numpy())
    if query_pool is not None:
        isq = np.isin(source["item_id"].to_numpy(), np.asarray(query_pool))
        base_s = source["can_support"].to_numpy(bool) if "can_support" in source.columns else True
        base_q = source["can_query"].to_numpy(bool) if "can_query" in source.columns else True
        source = source.assign(can_support=base_s & ~isq, can_query=base_q & isq)
    return source, users


def make_episodes(source: Split | pd.DataFrame, users: str | Sequence[int] | np.ndarray | None = None, *, seed: int = 0,
                  order: str = "random", on_short: str = "raise", query_pool: Sequence[int] | np.ndarray | None = None,
                  preset: str | EpisodePreset | None = None, **sizes: int | None) -> list[Episode]:
    """One support/query episode per user, drawn with a generator seeded by (seed, user_id). ``source``: a
    :class:`Split` (its evaluation users, with ``can_support`` / ``can_query``; ``users`` may be "train", "val" or
    "test") or a ratings DataFrame (``users=None``: all; ``query_pool``: the item ids that may be queried). Sizes:
    ``preset`` ("melu") or ``k_support`` and ``n_query`` (None: all that remain), optionally ``min_ratings`` /
    ``max_ratings``. ``order="time"``: support before query (with k given, the query starts at the first candidate with
    k support candidates before it, the support the k latest of those; with ``k_support=None`` the query is the latest
    n). Users short of ratings raise :class:`NotEnoughRatingsError`, or are skipped with ``on_short="skip"``."""
    p = _sizes(preset, sizes)
    _need(order in ("random", "time"), f"order must be 'random' or 'time', got {order!r}")
    frame, users = _episode_frame(source, users, query_pool)
    df, t = _prepare(frame, "source")
    users = np.asarray(users)
    u = df["user_id"].to_numpy()
    starts, ends = np.searchsorted(u, users, side="left"), np.searchsorted(u, users, side="right")
    absent = users[starts == ends]
    _need(len(absent) == 0, f"user(s) {absent[:5].tolist()} have no interactions in the source")
    items, rat = df["item_id"].to_numpy().astype(np.int64), df["rating"].to_numpy().astype(np.float64)
    cs = df["can_support"].to_numpy(bool) if "can_support" in df.columns else np.ones(len(df), bool)
    cq = df["can_query"].to_numpy(bool) if "can_query" in df.columns else np.ones(len(df), bool)
    lo, hi = p.min_ratings or 0, p.max_ratings or np.inf
    episodes = []
    for uid, a, b in zip(users.tolist(), starts.tolist(), ends.tolist()):
        if not lo <= np.count_nonzero(cs[a:b] | cq[a:b]) <= hi:
            continue
        try:
            sup, qry = _draw(uid, cs[a:b], cq[a:b], p, order, seed)
        except NotEnoughRatingsError:
            if on_short == "skip":
                continue
            raise
        sup, qry = sup + a, qry + a
        episodes.append(Episode(int(uid), items[sup], rat[sup], t[sup], items[qry], rat[qry], t[qry]))
    return episodes


# ============================================================================ batching
@dataclass(frozen=True)
class ItemIndex:
    """Raw item ids <-> contiguous indices 0..n-1, with a padding index ``n`` that is never an item
    (``nn.Embedding(len(index) + 1, d, padding_idx=index.pad_index)``)."""

    item_ids: np.ndarray  # sorted unique raw ids, shape (n,)

    @classmethod
    def from_ids(cls, ids: Sequence[int] | np.ndarray | pd.Series) -> "ItemIndex":
        """Build from any array-like of integer item ids (duplicates allowed)."""
        return cls(item_ids=np.unique(np.asarray(ids)).astype(np.int64))

    def __len__(self) -> int:
        return len(self.item_ids)

    @property
    def pad_index(self) -> int:
        """The padding index (= number of items)."""
        return len(self.item_ids)

    def encode(self, ids: Sequence[int] | np.ndarray, unknown: str = "raise") -> np.ndarray:
        """Raw ids (any shape) -> int64 indices; unknown ids raise a KeyError (``unknown="pad"``: the pad index)."""
        arr = np.asarray(ids)
        pos = np.minimum(np.searchsorted(self.item_ids, arr), len(self.item_ids) - 1)
        known = self.item_ids[pos] == arr
        if unknown == "raise" and not np.all(known):
            raise KeyError(f"item id(s) {np.unique(arr[~known])[:5].tolist()} are not in this ItemIndex; build it "
                           "from every item you will encode (ItemIndex.from_ids(ml.items.item_id)) or pass unknown='pad'")
        return np.where(known, pos, self.pad_index).astype(np.int64)

    def decode(self, idx: Sequence[int] | np.ndarray) -> np.ndarray:
        """Indices (any shape) -> raw ids; the pad index raises an IndexError."""
        arr = np.asarray(idx, dtype=np.int64)
        if np.any((arr < 0) | (arr >= len(self.item_ids))):
            raise IndexError(f"indices must lie in [0, {len(self.item_ids)}) (the pad index has no item)")
        return self.item_ids[arr]


def collate_episodes(episodes: Sequence[Episode], *, item_index: ItemIndex | None = None,
                     featurize: Callable[[Tensor], Tensor] | None = None, device: torch.device | str | None = None) -> TaskBatch:
    """Pad episodes into one :class:`TaskBatch`; S and Q are the largest support and query sizes. ``x [T, S]``: item
    indices (``item_index.encode``, padded with its ``pad_index``) or raw ids padded with -1; with ``featurize``
    (indices ``[m]`` -> ``[m, ...]``, real items only) the features, zero at padding. ``y``: ratings in torch's default
    dtype, 0 at padding."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    pad = -1 if item_index is None else item_index.pad_index

    def side(name: str) -> tuple[Tensor, Tensor, Tensor]:
        rows = [getattr(e, f"{name}_items") for e in episodes]
        width = max(len(r) for r in rows)
        items, mask = np.full((len(rows), width), pad, np.int64), np.zeros((len(rows), width), bool)
        ratings = np.zeros((len(rows), width))
        for i, (r, e) in enumerate(zip(rows, episodes)):
            items[i, :len(r)] = r if item_index is None else item_index.encode(r)
            ratings[i, :len(r)], mask[i, :len(r)] = getattr(e, f"{name}_ratings"), True
        x, m = torch.as_tensor(items, device=dev), torch.as_tensor(mask, device=dev)
        if featurize is not None:
            f = featurize(x[m])
            x = torch.zeros(tuple(m.shape) + tuple(f.shape[1:]), dtype=f.dtype, device=f.device)
            x[m.to(f.device)] = f
        return x, torch.as_tensor(ratings, dtype=torch.get_default_dtype(), device=dev), m

    (xs, ys, ms), (xq, yq, mq) = side("support"), side("query")
    return TaskBatch(xs, ys, xq, yq, ms, mq)


def iterate_meta_batches(episodes: Sequence[Episode], batch_size: int, seed: int = 0, **collate_kwargs) -> Iterator[TaskBatch]:
    """One pass over ``episodes`` in a seeded random order, as :class:`TaskBatch` es of ``batch_size``
    tasks (the last one smaller); ``collate_kwargs`` go to :func:`collate_episodes`."""
    order = np.random.default_rng(seed).permutation(len(episodes))
    for a in range(0, len(order), batch_size):
        yield collate_episodes([episodes[i] for i in order[a:a + batch_size]], **collate_kwargs)


# ============================================================================ leakage checks
class LeakageError(AssertionError):
    """Raised by :meth:`LeakageReport.raise_if_bad` when a split or its episodes leak."""


@dataclass
class LeakageReport:
    """What :func:`check_no_leakage` checked and found. Each problem is ``"<code>: <message>"`` with
    code one of user-overlap, unknown-user, query-in-train, new-item-in-train, query-not-new,
    new-item-before-cutoff, time-order, train-after-query, query-in-support, duplicate-in-episode, tag-leak."""

    scenario: str
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_bad(self) -> None:
        """Raise :class:`LeakageError` listing every problem; do nothing when ``ok``."""
        if self.problems:
            raise LeakageError(f"{len(self.problems)} leakage problem(s) in the {self.scenario} split:\n- "
                               + "\n- ".join(self.problems))

    def __str__(self) -> str:
        head = f"LeakageReport({self.scenario}): {len(self.checks)} checks, "
        return head + ("ok" if self.ok else f"{len(self.problems)} problem(s):\n- " + "\n- ".join(self.problems))


def _pairs_in(u: np.ndarray, i: np.ndarray, frame: pd.DataFrame) -> np.ndarray:
    """Is (u[j], i[j]) a (user_id, item_id) pair of ``frame``? Bool array like ``u``."""
    ref = pd.MultiIndex.from_arrays([frame["user_id"].to_numpy(), frame["item_id"].to_numpy()])
    return pd.MultiIndex.from_arrays([u, i]).isin(ref) if len(u) else np.zeros(0, bool)


def _pairs(u: np.ndarray, i: np.ndarray) -> str:
    return ", ".join(f"(user {a}, item {b})" for a, b in zip(u[:3].tolist(), i[:3].tolist()))


def _flag(problems: list[str], count: int, message: str) -> None:
    """Record ``message`` as a problem when ``count`` (of leaking rows, users or items) is not zero."""
    if count:
        problems.append(message)


def _later(earlier: pd.Series, later: pd.Series) -> pd.Index:
    """Users (the common index) whose value in ``earlier`` exceeds their value in ``later``."""
    common = earlier.index.intersection(later.index)
    return common[(earlier.reindex(common) > later.reindex(common)).to_numpy()]


def _check_split(split: Split, rep: LeakageReport) -> None:
    """The split checks of :func:`check_no_leakage`, each appended to ``rep``."""
    sc, P, tr = split.scenario, rep.problems, split.train
    ev = pd.concat([split.val, split.test], ignore_index=True)
    q = ev["can_query"].to_numpy(bool)
    rep.checks.append("val/test users disjoint")
    both = np.intersect1d(split.val_users, split.test_users)
    _flag(P, len(both), f"user-overlap: {len(both)} users are both validation and test users, e.g. {both[:5].tolist()}")
    for part in ("val", "test"):
        extra = np.setdiff1d(getattr(split, part)["user_id"].to_numpy(), getattr(split, f"{part}_users"))
        _flag(P, len(extra), f"unknown-user: split.{part} holds users not in {part}_users, e.g. {extra[:5].tolist()}")
    rep.checks.append("no query candidate in train")
    eu, ei = ev["user_id"].to_numpy(), ev["item_id"].to_numpy()
    leak = _pairs_in(eu[q], ei[q], tr)
    _flag(P, leak.sum(), f"query-in-train: {int(leak.sum())} query candidates of evaluation users are in split.train, "
          f"e.g. {_pairs(eu[q][leak], ei[q][leak])}")
    if sc in _DISJOINT_USER_SCENARIOS:
        rep.checks.append("evaluation users not in train")
        for part in ("val", "test"):
            bad = np.intersect1d(getattr(split, f"{part}_users"), split.train_users)
            _flag(P, len(bad), f"user-overlap: {len(bad)} {part} users also appear in split.train ({sc} needs disjoint "
                  f"users), e.g. {bad[:5].tolist()}")
    if sc in _ITEM_SCENARIOS:
        rep.checks.append("new items never in train; queries on new items")
        ti, new = tr["item_id"].to_numpy(), split.new_items
        on_new = np.isin(ti, new)
        _flag(P, on_new.sum(), f"new-item-in-train: {int(on_new.sum())} training interactions are on new items, "
              f"e.g. items {np.unique(ti[on_new])[:5].tolist()}")
        notnew = q & ~np.isin(ei, new)
        _flag(P, notnew.sum(), f"query-not-new: {int(notnew.sum())} query candidates are on old items, e.g. "
              f"{_pairs(eu[notnew], ei[notnew])}")
        cut = -np.inf if split.cutoff is None or not len(ev) else _seconds(pd.Series([split.cutoff]))[0]
        early = np.isin(ei, new) & (_seconds(ev["timestamp"]) <= cut)
        _flag(P, early.sum(), f"new-item-before-cutoff: {int(early.sum())} ratings of 'new' items are at or before the "
              f"cutoff {split.cutoff}, e.g. items {np.unique(ei[early])[:5].tolist()}")
    if sc == "temporal" and len(ev):
        rep.checks.append("support pool and training data precede each user's query pool")
        g = pd.DataFrame({"u": eu, "t": _seconds(ev["timestamp"]), "s": ev["can_support"].to_numpy(bool), "q": q})
        qmin, smax = g[g.q].groupby("u").t.min(), g[g.s].groupby("u").t.max()
        tmax = pd.Series(_seconds(tr["timestamp"])).groupby(tr["user_id"].to_numpy()).max()
        bad = _later(smax, qmin)
        _flag(P, len(bad), f"time-order: {len(bad)} users have a support candidate later than a query candidate, "
              f"e.g. users {bad[:5].tolist()}")
        bad = _later(tmax, qmin)
        _flag(P, len(bad), f"train-after-query: {len(bad)} evaluation users have training interactions later than "
              f"their first query candidate, e.g. users {bad[:5].tolist()}")


def _check_episodes(split: Split, episodes: Sequence[Episode], rep: LeakageReport) -> None:
    """The episode checks of :func:`check_no_leakage`."""
    sc, P, tr = split.scenario, rep.problems, split.train
    rep.checks.append("episodes: query not in support, not in train, scenario rules")
    train_users = set(split.train_users.tolist())
    tmax = pd.Series(_seconds(tr["timestamp"])).groupby(tr["user_id"].to_numpy()).max().to_dict() if len(tr) else {}
    for e in episodes:
        both = np.intersect1d(e.support_items, e.query_items)
        _flag(P, len(both), f"query-in-support: user {e.user_id}'s episode has items {both[:5].tolist()} in both "
              "support and query")
        for name, arr in (("support", e.support_items), ("query", e.query_items)):
            _flag(P, len(arr) - len(np.unique(arr)),
                  f"duplicate-in-episode: user {e.user_id}'s {name} set repeats an item")
        _flag(P, sc in _DISJOINT_USER_SCENARIOS and e.user_id in train_users,
              f"user-overlap: episode user {e.user_id} appears in split.train ({sc})")
        old = e.query_items[~np.isin(e.query_items, split.new_items)]
        _flag(P, sc in _ITEM_SCENARIOS and len(old),
              f"query-not-new: user {e.user_id}'s query has old items {old[:5].tolist()}")
        if sc == "temporal" and e.n and e.k:
            _flag(P, np.max(e.support_times) > np.min(e.query_times),
                  f"time-order: user {e.user_id}'s latest support time is after their earliest query time")
            _flag(P, tmax.get(e.user_id, -np.inf) > np.min(e.query_times),
                  f"train-after-query: user {e.user_id} has training interactions after their earliest query")
    if episodes:
        qu = np.concatenate([np.full(e.n, e.user_id, np.int64) for e in episodes])
        qi = np.concatenate([np.asarray(e.query_items, np.int64) for e in episodes])
        leak = _pairs_in(qu, qi, tr)
        _flag(P, leak.sum(), f"query-in-train: {int(leak.sum())} episode query interactions are in split.train, "
              f"e.g. {_pairs(qu[leak], qi[leak])}")


def _tag_leaks(split: Split, tags: pd.DataFrame) -> dict[str, np.ndarray]:
    """Boolean masks over ``tags`` rows a model of this split may not see, by reason."""
    u, t = tags["user_id"].to_numpy(), _seconds(tags["timestamp"])
    leaks = {}
    if split.scenario in _DISJOINT_USER_SCENARIOS:  # the evaluation users are strangers to the model
        leaks["by held-out users"] = np.isin(u, np.concatenate([split.val_users, split.test_users]))
    if split.cutoff is not None:  # nothing written after the moment the new items arrive
        leaks["after the cutoff"] = t > _seconds(pd.Series([split.cutoff]))[0]
    if split.scenario == "temporal":  # an evaluation user's tags from their query period on
        ev = pd.concat([split.val, split.test], ignore_index=True)
        ev = ev[ev["can_query"].to_numpy(bool)]
        first_query = pd.Series(_seconds(ev["timestamp"])).groupby(ev["user_id"].to_numpy()).min()
        limit = pd.Series(u).map(first_query).to_numpy(np.float64)
        leaks["in the user's query period"] = ~np.isnan(limit) & (t >= limit)
    return leaks


def visible_tags(split: Split, tags: pd.DataFrame) -> pd.DataFrame:
    """The tags a model of this split may read (for :func:`mrec_utils.data.item_text`). Tags come from users, and a tag
    can say what its author thought of a film: a held-out user's tag leaks that user's test ratings into the film's
    text. Kept: tags by users the model may know (not the evaluation users of user-cold and user+item-cold), written at
    or before the split's cutoff (item scenarios), and, in the temporal scenario, before each evaluation user's first
    query interaction."""
    _need(isinstance(tags, pd.DataFrame) and {"user_id", "item_id", "tag", "timestamp"} <= set(tags.columns),
          "tags must be MovieLens.tags (user_id, item_id, tag, timestamp) from load_movielens()", TypeError)
    leaks = _tag_leaks(split, tags)
    bad = np.logical_or.reduce(list(leaks.values())) if leaks else np.zeros(len(tags), bool)
    return tags[~bad]


def check_no_leakage(split: Split, episodes: Sequence[Episode] | None = None,
                     tags: pd.DataFrame | None = None) -> LeakageReport:
    """Re-check a split (and its evaluation episodes, tags) for leakage from scratch; a :class:`LeakageReport`. Split:
    val and test users disjoint; no query candidate in ``train``; user-cold and user+item-cold: no evaluation user in
    ``train``; item scenarios: no new item in ``train``, queries only on new items, no new item rated at or before the
    cutoff; temporal: per evaluation user, every support-pool and training time <= every query-pool time. Episodes: no
    item in both sets (or twice in one), no query in ``train``, the scenario's rules. Tags: none that
    :func:`visible_tags` would drop."""
    rep = LeakageReport(scenario=split.scenario)
    _check_split(split, rep)
    if episodes is not None:
        _check_episodes(split, episodes, rep)
    if tags is not None:
        rep.checks.append("item-text tags: none by held-out users, none after the cutoff or the query period")
        for reason, mask in _tag_leaks(split, tags).items():
            _flag(rep.problems, mask.sum(), f"tag-leak: {int(mask.sum())} tags were written {reason}, e.g. "
                  f"{_pairs(tags['user_id'].to_numpy()[mask], tags['item_id'].to_numpy()[mask])}; "
                  "build item texts from tasks.visible_tags(split, tags)")
    return rep
