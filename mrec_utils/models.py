"""The rating models of chapter 5.

- **MeLU-style rating model**: item (and user) attribute embeddings, concatenated, then an MLP
  decision head; :func:`melu_adapt_spec` says what per-user adaptation changes.
- **Matrix factorisation with fold-in**: biased MF by alternating least squares and the
  closed-form ridge fold-in of a new user from a few ratings.

The item-GPT of chapter 7 lives in :mod:`mrec_utils.gpt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# ==============================================================================================
# MeLU-style rating model (chapter 5)
# ==============================================================================================
#
# Lee et al. (2019), "MeLU: Meta-Learned User Preference Estimator for Cold-Start
# Recommendation": item (and user) attributes are embedded, the embeddings concatenated, and a
# small MLP (the "decision-making layers") predicts the rating. Per-user adaptation ("local
# update") changes the decision layers; MAML changes every parameter. Here the attributes are
# the ones every MovieLens release has (genres, release year) plus an optional item-id
# embedding for warm items and optional user attributes (ml-100k / ml-1m).
#
# Input layout: one int64 tensor ``x [..., 2 + n_user_fields]`` per example:
#   x[..., 0]  catalogue index of the item (looks up its genres and release-year bucket),
#   x[..., 1]  row of the item-id table (the last row = "unknown / new item"; ignored when the
#              model has no id table),
#   x[..., 2:] user attribute codes, one column per field (0 = unknown).
# Every column accepts 0, so padded rows zeroed by ``mrec_utils.meta`` are valid input.


class MeLURatingModel(torch.nn.Module):
    """Embeddings of item (and user) attributes -> concatenation -> MLP -> rating.

    Args:
        genre_matrix: [n_catalogue, n_genres] 0/1 genre indicators per catalogue item (a buffer).
            The genre embedding of an item is the mean of its genres' vectors (zero if none).
        year_bucket: [n_catalogue] int64 release-year bucket of each item (a buffer).
        n_year_buckets: number of year buckets (rows of the year table).
        n_item_rows: rows of the item-id table (warm items + 1 unknown row); 0 = no id embedding.
        user_cardinalities: number of codes of each user attribute (code 0 = unknown); () = none.
        emb_dim: size of every embedding.
        hidden: widths of the decision layers (ReLU after each).
        offset: added to the output (e.g. the training mean rating) so that a fresh model starts
            near the right scale.

    Parameter groups (names start with): ``genre_emb``, ``year_emb``, ``item_emb``,
    ``user_emb``: the embeddings; ``decision``: the hidden layers; ``out``: the last linear layer.
    ``forward(x [..., C]) -> [...]`` predicted ratings; ``features(x) -> [..., hidden[-1]]`` the
    last hidden layer (used as the embedding of a prototypical head).
    """

    def __init__(
        self,
        genre_matrix: Any,
        year_bucket: Any,
        n_year_buckets: int,
        n_item_rows: int = 0,
        user_cardinalities: Sequence[int] = (),
        emb_dim: int = 16,
        hidden: Sequence[int] = (64, 32),
        offset: float = 0.0,
    ):
        super().__init__()
        g = torch.as_tensor(np.asarray(genre_matrix), dtype=torch.get_default_dtype())
        yb = torch.as_tensor(np.asarray(year_bucket), dtype=torch.long)
        if n_item_rows == 1:
            raise ValueError("n_item_rows must be 0 (no id embedding) or >= 2 (warm items + the unknown row).")
        cards = tuple(int(c) for c in user_cardinalities)
        # genres normalised by their count: the linear map then averages the genre vectors
        self.register_buffer("genres", g / g.sum(1, keepdim=True).clamp_min(1.0))
        self.register_buffer("year_bucket", yb)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.n_item_rows = n_item_rows
        self.user_cardinalities = cards
        self.genre_emb = torch.nn.Linear(g.shape[1], emb_dim, bias=False)
        self.year_emb = torch.nn.Embedding(n_year_buckets, emb_dim)
        self.item_emb = torch.nn.Embedding(n_item_rows, emb_dim) if n_item_rows else None
        self.user_emb = torch.nn.ModuleList(torch.nn.Embedding(c, emb_dim) for c in cards)
        n_fields = 2 + (1 if n_item_rows else 0) + len(cards)
        layers: list[torch.nn.Module] = []
        width = n_fields * emb_dim
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.decision = torch.nn.Sequential(*layers)
        self.out = torch.nn.Linear(width, 1)
        for emb in [self.year_emb, *([self.item_emb] if self.item_emb is not None else []), *self.user_emb]:
            torch.nn.init.normal_(emb.weight, std=0.1)

    @property
    def n_columns(self) -> int:
        """Columns C of the input ``x [..., C]``: item, id row, one per user attribute."""
        return 2 + len(self.user_cardinalities)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated embeddings ``[..., n_fields * emb_dim]`` of ``x [..., C]`` (int64)."""
        if x.shape[-1] != self.n_columns:
            raise ValueError(f"x must have {self.n_columns} columns (item, id row, user fields), got {x.shape[-1]}.")
        item = x[..., 0]
        parts = [self.genre_emb(self.genres[item]), self.year_emb(self.year_bucket[item])]
        if self.item_emb is not None:
            parts.append(self.item_emb(x[..., 1]))
        parts += [emb(x[..., 2 + j]) for j, emb in enumerate(self.user_emb)]
        return torch.cat(parts, dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``[..., hidden[-1]]``."""
        return self.decision(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ratings ``[...]`` for ``x [..., C]``."""
        return self.out(self.features(x)).squeeze(-1) + self.offset


MELU_ADAPT: dict[str, str] = {
    "every": "every parameter, the item-id table included (Reptile, whose outer update moves only these)",
    "all": "every parameter except the item-id table (MAML)",
    "head": "the decision layers and the output layer (MeLU's local update; ANIL with the embeddings as body)",
    "out": "the output layer only",
}
"""Adaptation flags of :func:`melu_adapt_spec` and what each adapts per user."""


def melu_adapt_spec(adapt: str) -> Any:
    """The ``adapt=`` argument of :func:`mrec_utils.meta.split_params` for a :class:`MeLURatingModel`.

    ``"all"`` adapts every parameter *except the item-id table*. An inner SGD step changes only
    the id rows of the support items, and a user's query (and the ranked catalogue, which excludes
    the support) never contains a support item; so with one inner step adapting the table changes
    no evaluated prediction, and with more steps it only changes the support loss. Leaving it out
    saves a per-user copy of the whole table. ``"every"``: all parameters, the table included
    (Reptile needs it: its outer update only moves the adapted parameters, so a table left out
    would never be trained). ``"head"``: decision + output layers (MeLU). ``"out"``: the output layer.
    """
    if adapt == "every":
        return lambda name: True
    if adapt == "all":
        return lambda name: not name.startswith("item_emb")
    if adapt == "head":
        return ["decision", "out"]
    if adapt == "out":
        return ["out"]
    raise ValueError(f"unknown adapt flag {adapt!r}; choose one of {list(MELU_ADAPT)}.")


# ==============================================================================================
# Matrix factorisation with fold-in (chapter 5)
# ==============================================================================================
#
# Biased MF (Koren, Bell & Volinsky 2009): r_ui ~ mu + b_u + b_i + p_u . q_i, fitted by
# alternating least squares (each half-step is a ridge regression per row, solved in closed
# form). A new user is *folded in* by the same ridge regression on their support ratings with
# the items fixed: x_i = [q_i, 1], target r - mu - b_i, solution w = (X'X + reg I)^-1 X' t,
# i.e. (p_u, b_u) = (w[:-1], w[-1]).


@dataclass
class BiasedMF:
    """A fitted biased matrix factorisation (tensors on one device, float64).

    Attributes:
        mu: global mean rating.
        item_factors: [n_items, dim]; item_bias: [n_items]; user_factors: [n_users, dim];
        user_bias: [n_users]. An item without training ratings has zero factors and bias.
        reg: the ridge penalty used for every row (factors and bias alike).
    """

    mu: float
    item_factors: torch.Tensor
    item_bias: torch.Tensor
    user_factors: torch.Tensor
    user_bias: torch.Tensor
    reg: float

    def predict(self, users: Any, items: Any) -> torch.Tensor:
        """Ratings for aligned index arrays ``users [n]``, ``items [n]`` -> [n]."""
        dev = self.item_bias.device
        u = users.to(dev).long() if isinstance(users, torch.Tensor) else torch.as_tensor(np.asarray(users), dtype=torch.long, device=dev)
        i = items.to(dev).long() if isinstance(items, torch.Tensor) else torch.as_tensor(np.asarray(items), dtype=torch.long, device=dev)
        return self.mu + self.user_bias[u] + self.item_bias[i] + (self.user_factors[u] * self.item_factors[i]).sum(-1)


def ridge_rows(rows: torch.Tensor, cols: torch.Tensor, table: torch.Tensor, target: torch.Tensor,
               n_rows: int, reg: float) -> torch.Tensor:
    """One ridge regression per row: ``w_r = (X_r'X_r + reg I)^-1 X_r' t_r``.

    Observation ``j`` belongs to row ``rows[j]`` (e.g. a user) and its features are the table row
    ``table[cols[j]]`` (e.g. ``[q_i, 1]`` of the rated item). The normal equations are built
    with one sparse product, ``A = S (x x')`` and ``b = S_t x`` over the *table* rows, so the
    cost grows with the number of observations times ``p``, not ``p^2``.

    Args:
        rows: [n] int64 row of each observation, in ``[0, n_rows)``.
        cols: [n] int64 table row of each observation.
        table: [m, p] features.
        target: [n] targets.
        n_rows: number of regressions R.
        reg: ridge penalty > 0 (every system is solvable; a row without observations gets 0).

    Returns:
        [R, p] solutions (``table``'s dtype and device).
    """
    m, p = table.shape
    idx = torch.stack([rows, cols])
    ones = torch.ones(len(rows), dtype=table.dtype, device=table.device)
    count = torch.sparse_coo_tensor(idx, ones, (n_rows, m), check_invariants=False).coalesce()
    weighted = torch.sparse_coo_tensor(idx, target.to(table.dtype), (n_rows, m), check_invariants=False).coalesce()
    outer = (table[:, :, None] * table[:, None, :]).reshape(m, p * p)
    a = torch.sparse.mm(count, outer).reshape(n_rows, p, p)
    a = a + reg * torch.eye(p, dtype=table.dtype, device=table.device)
    b = torch.sparse.mm(weighted, table)
    chol = torch.linalg.cholesky(a)  # a is symmetric positive definite because reg > 0
    return torch.cholesky_solve(b[:, :, None], chol)[:, :, 0]


def fit_biased_mf(
    users: Any, items: Any, ratings: Any, n_users: int, n_items: int, *,
    dim: int = 16, reg: float = 5.0, iters: int = 10, seed: int = 0, device: Any = None,
) -> BiasedMF:
    """Biased MF by alternating least squares (closed-form ridge per user, then per item).

    Args:
        users, items: [n] int64 indices in ``[0, n_users)``, ``[0, n_items)``.
        ratings: [n] ratings.
        dim: number of latent factors; reg: ridge penalty of every row; iters: ALS sweeps.
        seed: seeds the initial item factors (normal, std 0.1); device: where to compute (CPU default).

    Returns:
        :class:`BiasedMF` (float64).
    """
    if not reg > 0:
        raise ValueError(f"reg must be a positive number (the ridge penalty), got {reg!r}.")
    dev = torch.device("cpu") if device is None else torch.device(device)
    u = torch.as_tensor(np.asarray(users), dtype=torch.long, device=dev)
    i = torch.as_tensor(np.asarray(items), dtype=torch.long, device=dev)
    r = torch.tensor(np.asarray(ratings, dtype=np.float64), device=dev)
    mu = float(r.mean())
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    q = (0.1 * torch.randn(n_items, dim, generator=gen, dtype=torch.float64)).to(dev)
    bi = torch.zeros(n_items, dtype=torch.float64, device=dev)
    with_one = lambda f: torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype, device=f.device)], 1)  # noqa: E731
    for _ in range(iters):
        w = ridge_rows(u, i, with_one(q), r - mu - bi[i], n_users, reg)  # users, items fixed
        p, bu = w[:, :-1], w[:, -1]
        w = ridge_rows(i, u, with_one(p), r - mu - bu[u], n_items, reg)  # items, users fixed
        q, bi = w[:, :-1], w[:, -1]
    return BiasedMF(mu, q, bi, p, bu, reg)


def fold_in(mf: BiasedMF, items: Any, ratings: Any, mask: Any = None, reg: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold new users into a fitted :class:`BiasedMF`: ridge regression on their support ratings.

    ``(p_u, b_u) = argmin sum_j (r_j - mu - b_ij - b_u - p_u . q_ij)^2 + reg (|p_u|^2 + b_u^2)``,
    solved in closed form; the item factors stay fixed.

    Args:
        items: [S] or [T, S] item indices of the support ratings (padding anywhere, see mask).
        ratings: same shape, the support ratings.
        mask: same shape, True for real ratings (None = all real).
        reg: ridge penalty (default: the one the MF was fitted with).

    Returns:
        ``(user_factors [T, dim] or [dim], user_bias [T] or [])``.
    """
    reg = mf.reg if reg is None else float(reg)
    dev = mf.item_bias.device

    def as_tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:  # tensors stay on their device until moved
        return a.to(device=dev, dtype=dtype) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype, device=dev)

    it = as_tensor(items, torch.long)
    rt = as_tensor(ratings, torch.float64)
    single = it.ndim == 1
    if single:
        it, rt = it[None], rt[None]
    m = torch.ones_like(it, dtype=torch.bool) if mask is None else as_tensor(mask, torch.bool)
    if single and m.ndim == 1:
        m = m[None]
    rows = torch.arange(it.shape[0], device=dev)[:, None].expand_as(it)[m]
    sel = it[m]
    table = torch.cat([mf.item_factors, torch.ones(len(mf.item_bias), 1, dtype=mf.item_factors.dtype, device=dev)], 1)
    w = ridge_rows(rows, sel, table, rt[m] - mf.mu - mf.item_bias[sel], it.shape[0], reg)
    p, b = w[:, :-1], w[:, -1]
    return (p[0], b[0]) if single else (p, b)
