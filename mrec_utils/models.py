"""The rating models of chapters 5 and 6: the MeLU-style network (:class:`MeLURatingModel`, what per-user
adaptation changes: :func:`melu_adapt_spec`, its integer input: :func:`build_features`) and biased matrix
factorisation by ALS (:func:`fit_biased_mf`) with the closed-form ridge fold-in of new users (:func:`fold_in`) or
of new items rated by known users (:func:`fold_in_items`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from mrec_utils.meta import AdaptSpec
from mrec_utils.tasks import ItemIndex

# ============================================================================ the MeLU-style rating model
#
# Lee et al. (2019), "MeLU: Meta-Learned User Preference Estimator for Cold-Start Recommendation": item
# (and user) attributes are embedded, the embeddings concatenated, and a small MLP (the "decision-making
# layers") predicts the rating. Per-user adaptation ("local update") changes the decision layers; MAML
# changes every parameter. The attributes here are those every MovieLens release has (genres, release
# year), an optional item-id embedding for warm items and optional user attributes (ml-100k / ml-1m).
#
# Input: one int64 tensor ``x [..., 2 + n_user_fields]`` per example: x[..., 0] the catalogue index of
# the item (looks up its genres and year bucket), x[..., 1] the row of the item-id table (the last row =
# "unknown / new item"), x[..., 2:] user attribute codes (0 = unknown). Every column accepts 0, so padded
# rows zeroed by ``mrec_utils.meta`` are valid input.


class MeLURatingModel(torch.nn.Module):
    """Embeddings of item (and user) attributes -> concatenation -> MLP -> rating.
    ``genre_matrix [n_catalogue, n_genres]`` (an item's genre embedding is the mean of its genres' vectors),
    ``year_bucket [n_catalogue]``; ``n_item_rows``: warm items + 1 unknown row (0: no id embedding);
    ``user_cardinalities``: codes per user attribute (0 = unknown); ``offset``: the training mean rating.
    Parameter groups: ``genre_emb``, ``year_emb``, ``item_emb``, ``user_emb``, ``decision`` (hidden layers),
    ``out``. ``features(x)`` is the last hidden layer (a prototypical head's embedding)."""

    def __init__(self, genre_matrix: np.ndarray, year_bucket: np.ndarray, n_year_buckets: int, n_item_rows: int = 0,
                 user_cardinalities: Sequence[int] = (), emb_dim: int = 16, hidden: Sequence[int] = (64, 32),
                 offset: float = 0.0):
        super().__init__()
        g = torch.as_tensor(np.asarray(genre_matrix), dtype=torch.get_default_dtype())
        # genres normalised by their count: the linear map then averages the genre vectors
        self.register_buffer("genres", g / g.sum(1, keepdim=True).clamp_min(1.0))
        self.register_buffer("year_bucket", torch.as_tensor(np.asarray(year_bucket), dtype=torch.long))
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.genre_emb = torch.nn.Linear(g.shape[1], emb_dim, bias=False)
        self.year_emb = torch.nn.Embedding(n_year_buckets, emb_dim)
        self.item_emb = torch.nn.Embedding(n_item_rows, emb_dim) if n_item_rows else None
        self.user_emb = torch.nn.ModuleList(torch.nn.Embedding(int(c), emb_dim) for c in user_cardinalities)
        layers: list[torch.nn.Module] = []
        width = (2 + (1 if n_item_rows else 0) + len(self.user_emb)) * emb_dim
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.decision = torch.nn.Sequential(*layers)
        self.out = torch.nn.Linear(width, 1)
        for emb in [self.year_emb, *([self.item_emb] if self.item_emb is not None else []), *self.user_emb]:
            torch.nn.init.normal_(emb.weight, std=0.1)

    def embed(self, x: Tensor) -> Tensor:
        """Concatenated embeddings ``[..., n_fields * emb_dim]`` of ``x [..., C]``."""
        item = x[..., 0]
        parts = [self.genre_emb(self.genres[item]), self.year_emb(self.year_bucket[item])]
        if self.item_emb is not None:
            parts.append(self.item_emb(x[..., 1]))
        parts += [emb(x[..., 2 + j]) for j, emb in enumerate(self.user_emb)]
        return torch.cat(parts, dim=-1)

    def features(self, x: Tensor) -> Tensor:
        return self.decision(self.embed(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.features(x)).squeeze(-1) + self.offset


MELU_ADAPT: dict[str, str] = {
    "every": "every parameter, the item-id table included (Reptile, whose outer update moves only these)",
    "all": "every parameter except the item-id table (MAML)",
    "head": "the decision layers and the output layer (MeLU's local update; ANIL with the embeddings as body)",
    "out": "the output layer only",
}
"""Adaptation flags of :func:`melu_adapt_spec` and what each adapts per user."""


def melu_adapt_spec(adapt: str) -> AdaptSpec:
    """The :func:`mrec_utils.meta.split_params` spec of an adapt flag (:data:`MELU_ADAPT`). ``"all"`` leaves out
    the item-id table: one inner step changes only the support films' rows, which no query holds (unless they
    share the unknown row, as every film does in item-cold)."""
    specs: dict[str, Callable[[str], bool] | list[str]] = {
        "every": lambda name: True, "all": lambda name: not name.startswith("item_emb"),
        "head": ["decision", "out"], "out": ["out"]}
    if adapt not in specs:
        raise ValueError(f"unknown adapt flag {adapt!r}; choose one of {list(MELU_ADAPT)}.")
    return specs[adapt]


# ============================================================================ the model's input
YEAR_EDGES = (1960, 1970, 1980, 1990, 2000, 2010)
"""Release-year buckets: 0 = unknown, 1 = before 1960, 2 = the 1960s, ..., 7 = 2010 and later."""
AGE_EDGES = (18, 25, 35, 45, 50, 56)
"""ml-1m's age groups; ml-100k's exact ages fall into them."""
USER_FIELDS = ("gender", "age", "occupation")


@dataclass(frozen=True)
class Features:
    """How (user, item) pairs become the input ``[item index, id row, user codes...]`` of the network: the
    catalogue (``item_index``), its genres and year buckets, the id row of each item (warm items 0..n_warm-1,
    the rest the unknown row n_warm) and the user attribute codes (``user_table``, 0 = unknown)."""

    item_index: ItemIndex
    genres: tuple[str, ...]
    genre_matrix: np.ndarray
    year_bucket: np.ndarray
    id_row: np.ndarray
    n_item_rows: int
    user_fields: tuple[str, ...]
    user_cardinalities: tuple[int, ...]
    user_table: pd.DataFrame

    @property
    def n_items(self) -> int:
        return len(self.item_index)

    def user_codes(self, user_ids: np.ndarray) -> np.ndarray:
        u = np.asarray(user_ids, dtype=np.int64).ravel()
        if not self.user_fields:
            return np.zeros((len(u), 0), dtype=np.int64)
        return self.user_table.reindex(u).fillna(0).to_numpy(np.int64, copy=True)

    def encode(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """Input ``[n, C]`` of aligned ``user_ids [n]`` and raw ``item_ids [n]``."""
        it = self.item_index.encode(np.asarray(item_ids, dtype=np.int64).ravel())
        return np.concatenate([it[:, None], self.id_row[it][:, None], self.user_codes(user_ids)], axis=1)

    def catalogue(self, user_id: int) -> np.ndarray:
        """Input ``[n_catalogue, C]`` of every catalogue item for one user."""
        codes = np.repeat(self.user_codes([user_id]), self.n_items, axis=0)
        return np.concatenate([np.arange(self.n_items)[:, None], self.id_row[:, None], codes], axis=1)


def _year_bucket(years: pd.Series) -> np.ndarray:
    y = pd.array(years, dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    b = np.searchsorted(np.asarray(YEAR_EDGES, dtype=np.float64), y, side="right") + 1
    return np.where(np.isnan(y), 0, b).astype(np.int64)


def _user_table(users: pd.DataFrame) -> tuple[pd.DataFrame, tuple[int, ...]]:
    out = pd.DataFrame(index=pd.Index(users["user_id"].astype(np.int64), name="user_id"))
    cards = []
    for f in USER_FIELDS:
        if f == "age":
            a = pd.to_numeric(users[f], errors="coerce").to_numpy(np.float64)
            codes = np.where(np.isnan(a), 0, np.searchsorted(np.asarray(AGE_EDGES, float), a, side="right") + 1)
            cards.append(len(AGE_EDGES) + 2)
        else:
            vals = users[f].astype(str).to_numpy()
            cats = np.unique(vals)
            codes = np.searchsorted(cats, vals) + 1
            cards.append(len(cats) + 1)
        out[f] = codes.astype(np.int64)
    return out, tuple(cards)


def build_features(items: pd.DataFrame, train_ratings: pd.DataFrame, users: pd.DataFrame | None = None, *,
                   use_item_id: bool = True, use_user_features: bool | str = "auto",
                   extra_item_ids: np.ndarray | None = None, known_users: np.ndarray | None = None) -> Features:
    """The :class:`Features` of a release: an item is *warm* (its own id row) iff ``train_ratings`` rate it, so
    no evaluation rating shapes an id embedding; ``use_user_features``: True, False or "auto" (if ``users``);
    ``extra_item_ids``: rated ids missing from ``items`` (no genre, unknown year); ``known_users``: ids that get
    a user-id attribute ``"user"`` (rows 1.., 0 = any other user), for users that training knows (item-cold)."""
    if use_user_features is True and users is None:
        raise ValueError("use_user_features=True but this dataset has no user attributes (ml-latest-small and the "
                         "ml-latest/ml-25m/ml-32m releases have none); use ml-100k or ml-1m, or "
                         "use_user_features='auto'/False.")
    ids = items["item_id"].to_numpy(np.int64)
    if extra_item_ids is not None:
        ids = np.concatenate([ids, np.asarray(extra_item_ids, dtype=np.int64).ravel()])
    index = ItemIndex.from_ids(ids)
    genres = tuple(sorted({g for gs in items["genres"] for g in gs}))
    gpos = {g: j for j, g in enumerate(genres)}
    gm = np.zeros((len(index), max(len(genres), 1)), dtype=np.float32)
    rows = index.encode(items["item_id"].to_numpy(np.int64))
    for r, gs in zip(rows, items["genres"]):
        gm[r, [gpos[g] for g in gs]] = 1.0
    yb = np.zeros(len(index), dtype=np.int64)
    yb[rows] = _year_bucket(items["year"])
    warm = np.isin(index.item_ids, train_ratings["item_id"].to_numpy())
    n_warm = int(warm.sum())
    id_row = np.where(warm, np.cumsum(warm) - 1, n_warm).astype(np.int64) if use_item_id else np.zeros(len(index), np.int64)
    n_rows = n_warm + 1 if use_item_id else 0
    if users is not None and use_user_features in (True, "auto"):
        table, cards, fields = *_user_table(users), USER_FIELDS
    else:
        table, cards, fields = pd.DataFrame(index=pd.Index([], dtype=np.int64, name="user_id")), (), ()
    if known_users is not None:
        known = np.unique(np.asarray(known_users, dtype=np.int64))
        ids = pd.DataFrame({"user": np.arange(1, len(known) + 1)}, index=pd.Index(known, name="user_id"))
        table = table.join(ids, how="outer").fillna(0).astype(np.int64)
        cards, fields = (*cards, len(known) + 1), (*fields, "user")
    return Features(index, genres, gm, yb, id_row, n_rows, fields, cards, table)


# ============================================================================ matrix factorisation with fold-in
#
# Biased MF (Koren, Bell & Volinsky 2009): r_ui ~ mu + b_u + b_i + p_u . q_i, fitted by alternating least
# squares (each half-step is a ridge regression per row, in closed form). A new user is *folded in* by the
# same ridge regression on their support ratings with the items fixed: x_i = [q_i, 1], target
# r - mu - b_i, w = (X'X + reg I)^-1 X' t, (p_u, b_u) = (w[:-1], w[-1]); a new item likewise, the users fixed.


@dataclass
class BiasedMF:
    """A fitted biased MF (float64): an item without training ratings has zero factors and bias."""

    mu: float
    item_factors: Tensor
    item_bias: Tensor
    user_factors: Tensor
    user_bias: Tensor
    reg: float

    def predict(self, users: Tensor | np.ndarray, items: Tensor | np.ndarray) -> Tensor:
        u, i = (_tensor(a, torch.long, self.item_bias.device) for a in (users, items))
        return self.mu + self.user_bias[u] + self.item_bias[i] + (self.user_factors[u] * self.item_factors[i]).sum(-1)


def _tensor(a: Tensor | np.ndarray | pd.Series, dtype: torch.dtype, device: torch.device) -> Tensor:
    return a.to(device=device, dtype=dtype) if isinstance(a, Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype, device=device)


def ridge_rows(rows: Tensor, cols: Tensor, table: Tensor, target: Tensor, n_rows: int, reg: float) -> Tensor:
    """``[n_rows, p]``: one ridge regression per row, ``w_r = (X_r'X_r + reg I)^-1 X_r' t_r``, observation j in
    row ``rows[j]`` with features ``table[cols[j]]`` and target ``target[j]`` (no observation: 0). The normal
    equations come from one sparse product over the *table* rows (cost: observations times p, not p^2)."""
    m, p = table.shape
    idx = torch.stack([rows, cols])
    ones = torch.ones(len(rows), dtype=table.dtype, device=table.device)
    count = torch.sparse_coo_tensor(idx, ones, (n_rows, m), check_invariants=False).coalesce()
    weighted = torch.sparse_coo_tensor(idx, target.to(table.dtype), (n_rows, m), check_invariants=False).coalesce()
    outer = (table[:, :, None] * table[:, None, :]).reshape(m, p * p)
    a = torch.sparse.mm(count, outer).reshape(n_rows, p, p) + reg * torch.eye(p, dtype=table.dtype, device=table.device)
    chol = torch.linalg.cholesky(a)  # symmetric positive definite because reg > 0
    return torch.cholesky_solve(torch.sparse.mm(weighted, table)[:, :, None], chol)[:, :, 0]


def _with_one(f: Tensor) -> Tensor:
    return torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype, device=f.device)], 1)


def fit_biased_mf(users: np.ndarray, items: np.ndarray, ratings: np.ndarray, shape: tuple[int, int], *,
                  dim: int = 16, reg: float = 5.0, iters: int = 10, seed: int = 0,
                  device: torch.device | str | None = None) -> BiasedMF:
    """Biased MF by alternating least squares (ridge ``reg`` per user, then per item, ``iters`` times) of the ratings of
    ``users``, ``items`` (indices into ``shape = (n_users, n_items)``); item factors start normal (std 0.1, seeded)."""
    if not reg > 0:
        raise ValueError(f"reg must be a positive number (the ridge penalty), got {reg!r}.")
    n_users, n_items = shape
    dev = torch.device(device or "cpu")
    u, i = _tensor(users, torch.long, dev), _tensor(items, torch.long, dev)
    r = torch.tensor(np.asarray(ratings, dtype=np.float64), device=dev)
    mu = float(r.mean())
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    q = (0.1 * torch.randn(n_items, dim, generator=gen, dtype=torch.float64)).to(dev)
    bi = torch.zeros(n_items, dtype=torch.float64, device=dev)
    for _ in range(iters):
        w = ridge_rows(u, i, _with_one(q), r - mu - bi[i], n_users, reg)  # users, items fixed
        p, bu = w[:, :-1], w[:, -1]
        w = ridge_rows(i, u, _with_one(p), r - mu - bu[u], n_items, reg)  # items, users fixed
        q, bi = w[:, :-1], w[:, -1]
    return BiasedMF(mu, q, bi, p, bu, reg)


def fold_in(mf: BiasedMF, items: Tensor | np.ndarray, ratings: Tensor | np.ndarray, mask: Tensor | np.ndarray | None = None,
            reg: float | None = None) -> tuple[Tensor, Tensor]:
    """Fold new users in by ridge regression on their support ratings, the items fixed:
    ``(p_u, b_u) = argmin sum_j (r_j - mu - b_ij - b_u - p_u . q_ij)^2 + reg (|p_u|^2 + b_u^2)``. ``items``,
    ``ratings``, ``mask``: [S] or [T, S]; ``reg`` default: the MF's. Returns ``(p [T, dim] or [dim], b [T] or [])``."""
    reg = mf.reg if reg is None else float(reg)
    dev = mf.item_bias.device
    it, rt = _tensor(items, torch.long, dev), _tensor(ratings, torch.float64, dev)
    single = it.ndim == 1
    m = torch.ones_like(it, dtype=torch.bool) if mask is None else _tensor(mask, torch.bool, dev)
    if single:
        it, rt, m = it[None], rt[None], m.reshape(1, -1)
    rows = torch.arange(it.shape[0], device=dev)[:, None].expand_as(it)[m]
    sel = it[m]
    w = ridge_rows(rows, sel, _with_one(mf.item_factors), rt[m] - mf.mu - mf.item_bias[sel], it.shape[0], reg)
    p, b = w[:, :-1], w[:, -1]
    return (p[0], b[0]) if single else (p, b)


def fold_in_items(mf: BiasedMF, items: Tensor, user_factors: Tensor, user_bias: Tensor, ratings: Tensor, reg: float) -> BiasedMF:
    """``mf`` with every item of ``items`` refitted by ridge regression on its ``ratings``, each by a user with the
    given factors and bias (one row per rating, aligned, the users fixed): new items folded in as :func:`fold_in`
    folds in new users. The other items keep their factors and biases."""
    n, obs = len(mf.item_bias), torch.arange(len(items), device=items.device)
    w = ridge_rows(items, obs, _with_one(user_factors), ratings - mf.mu - user_bias, n, reg)
    seen = torch.zeros(n, dtype=torch.bool, device=w.device).index_fill_(0, items, True)
    return dataclasses.replace(mf, item_factors=torch.where(seen[:, None], w[:, :-1], mf.item_factors),
                               item_bias=torch.where(seen, w[:, -1], mf.item_bias))
