"""GPT + meta-learning (chapter 8): the book's main recommender, in thin functions.

Three parts, each usable on its own:

1. **Meta-learned user heads on language-model features.** Items are represented by frozen
   pretrained-LM embeddings of their text (:func:`mrec_utils.lm.embed_texts`), reduced by PCA
   (:func:`lm_item_features`). A user is a task of (item features, like/dislike) pairs
   (:func:`like_tasks`, :func:`sample_like_batch`). A small :class:`UserHead` (a learned
   projection with a ReLU, then a linear "user preference" layer) is trained globally
   (:func:`train_global_head`), fine-tuned per user, meta-learned with MAML / FOMAML / ANIL /
   Reptile through :mod:`mrec_utils.meta` (:func:`meta_train_head`, vmap over tasks), or used as
   the embedding of a prototypical network (:func:`train_protonet`); per-user logistic regression
   from scratch (:func:`logreg_scratch`, batched Newton) is the no-transfer baseline.
2. **MAML on the item-GPT itself.** The per-user adaptable part is one vector ``u`` of size
   ``n_embd`` *added to every input embedding* of the user's sequence (an additive soft prompt).
   ``u = 0`` is exactly the pre-trained GPT, so "in context only" and "fine-tune from the
   ordinary pre-trained model" are well defined; MAML / FOMAML / Reptile meta-learn the initial
   value ``u0`` while every GPT weight stays frozen (:func:`adapt_user_vectors`,
   :func:`meta_train_user_vector`). Users in a batch are independent rows of the GPT's batch, so
   per-user inner loops need no ``vmap``: the gradient of the *sum* of per-user losses w.r.t. the
   ``[B, n_embd]`` matrix of user vectors has the per-user gradients as rows.
3. **New items from text (MetaEmb, Pan et al. 2019).** :class:`EmbeddingGenerator` maps an item's
   LM text features to an initial item-id embedding of the item-GPT; :func:`train_metaemb` trains
   it on warm items treated as new with MetaEmb's objective ``a * L_cold + (1 - a) * L_warm``,
   where ``L_warm`` is the loss on a second batch after one gradient step on the first.
   :func:`warm_up_embeddings` applies the small warm-up updates at test time.

Shapes are given in each docstring. Everything runs on CPU or CUDA: devices are taken from the
tensors/parameters passed in.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import meta as _meta
from . import tasks as _tasks
from . import metrics as _metrics
from .train import TIE_TOL, pick_best

__all__ = [
    "lm_item_features",
    "LikeTasks",
    "like_tasks",
    "rating_pools",
    "sample_like_batch",
    "UserHead",
    "train_global_head",
    "adapt_and_score",
    "meta_train_head",
    "ResidualUserHead",
    "meta_train_residual",
    "pairwise_query_loss",
    "user_folds",
    "kfold_like_auc",
    "paired_summary",
    "train_protonet",
    "protonet_scores",
    "logreg_scratch",
    "evaluate_like",
    "GPTUserTasks",
    "gpt_user_tasks",
    "use_eager_attention",
    "gpt_hidden",
    "gpt_item_logits",
    "support_loss",
    "target_loss",
    "adapt_user_vectors",
    "meta_train_user_vector",
    "score_with_user_vectors",
    "EmbeddingGenerator",
    "ItemEvents",
    "item_events",
    "metaemb_loss",
    "train_metaemb",
    "warm_up_embeddings",
    "new_item_metrics",
    "HEAD_METHODS",
    "HeadSettings",
    "FittedHeads",
    "fit_heads",
    "head_benchmark",
]


# ==============================================================================================
# validation helpers
# ==============================================================================================


def _pos_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


def _pos_float(name: str, value: Any, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}.")
    v = float(value)
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return v


def _as_matrix(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [n, d], got shape {a.shape}.")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must hold floats, got dtype {a.dtype}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or inf.")
    return a


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ==============================================================================================
# Part 1: meta-learned user heads on LM features
# ==============================================================================================


def lm_item_features(embeddings: Any, n_components: int = 64, fit_rows: Any = None) -> np.ndarray:
    """Centre, PCA-reduce and scale LM item embeddings into features for small heads.

    Mean-pooled hidden states of a causal LM share a large common direction (they are
    *anisotropic*); centring removes it and PCA keeps the directions in which items differ.
    The features are scaled so that their mean squared norm is ``n_components`` (unit variance
    per dimension on average), which keeps one learning rate sensible for every head.

    Args:
        embeddings: [n_items, d] LM embeddings (e.g. :func:`mrec_utils.lm.embed_texts`).
        n_components: output dimension (<= min(n_fit, d)).
        fit_rows: rows used to fit the mean and the principal axes (default: all). Fitting on
            texts only uses no rating, so fitting on the whole catalogue leaks nothing.

    Returns:
        float64 [n_items, n_components].
    """
    e = _as_matrix(embeddings, "embeddings").astype(np.float64)
    n_components = _pos_int("n_components", n_components)
    fit = e if fit_rows is None else e[np.asarray(fit_rows)]
    if n_components > min(fit.shape):
        raise ValueError(f"n_components={n_components} exceeds min(n_fit_rows, d) = {min(fit.shape)}.")
    mu = fit.mean(0)
    _, _, vt = np.linalg.svd(fit - mu, full_matrices=False)
    axes = vt[:n_components]
    # sign convention: the largest-magnitude loading of each axis is positive (deterministic output)
    signs = np.sign(axes[np.arange(n_components), np.abs(axes).argmax(1)])
    axes = axes * signs[:, None]
    z = (e - mu) @ axes.T
    scale = np.sqrt(((fit - mu) @ axes.T).var(0).mean())
    return z / max(scale, 1e-12)


@dataclass
class LikeTasks:
    """Padded like/dislike tasks, one per user (the shapes of :class:`mrec_utils.tasks.TaskBatch`).

    Attributes:
        x_support: [T, S, D] item features; y_support: [T, S] 1.0 = like, 0.0 = dislike;
        r_support: [T, S] ratings; mask_support: [T, S] bool (True = real).
        x_query, y_query, r_query, mask_query: the same for the query set, [T, Q, ...].
        users: [T] user ids; query_items: [T, Q] item ids (-1 on padding).
    """

    x_support: Tensor
    y_support: Tensor
    r_support: Tensor
    mask_support: Tensor
    x_query: Tensor
    y_query: Tensor
    r_query: Tensor
    mask_query: Tensor
    users: np.ndarray
    query_items: np.ndarray

    def __len__(self) -> int:
        return int(self.y_support.shape[0])

    def batch(self, target: str = "like") -> _tasks.TaskBatch:
        """A :class:`mrec_utils.tasks.TaskBatch` with like labels (``"like"``) or ratings (``"rating"``)."""
        if target not in ("like", "rating"):
            raise ValueError(f"target must be 'like' or 'rating', got {target!r}.")
        ys, yq = (self.y_support, self.y_query) if target == "like" else (self.r_support, self.r_query)
        return _tasks.TaskBatch(self.x_support, ys, self.x_query, yq, self.mask_support, self.mask_query)


def _item_rows(item_ids: np.ndarray, catalogue: pd.Index, what: str) -> np.ndarray:
    rows = catalogue.get_indexer(item_ids)
    if (rows < 0).any():
        bad = item_ids[rows < 0][:5].tolist()
        raise ValueError(f"{what} has item ids without features, e.g. {bad}; embed every item first.")
    return rows


def _pad(rows: Sequence[np.ndarray], fill: float, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), fill, dtype=dtype)
    mask = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = True
    return out, mask


def like_tasks(
    episodes: Sequence[Any],
    features: Any,
    item_ids: Any,
    like_threshold: float = 4.0,
    device: Any = None,
) -> LikeTasks:
    """Turn episodes (:func:`mrec_utils.tasks.make_episodes`) into padded like/dislike tasks.

    Args:
        episodes: n episodes with ``support_items/ratings`` and ``query_items/ratings``.
        features: [n_items, D] item features (e.g. :func:`lm_item_features`).
        item_ids: [n_items] the item id of each feature row.
        like_threshold: a rating >= this is a like (TALLRec and most papers: 4 of 5 stars).
        device: where the tensors go (default CPU).

    Returns:
        :class:`LikeTasks` with T = n episodes.
    """
    eps = list(episodes)
    if not eps:
        raise ValueError("episodes is empty; make_episodes returned no user (check k_support / min_ratings).")
    feats = torch.as_tensor(_as_matrix(features, "features"), dtype=torch.get_default_dtype())
    cat = pd.Index(np.asarray(item_ids, dtype=np.int64))
    if len(cat) != feats.shape[0]:
        raise ValueError(f"item_ids has {len(cat)} entries but features has {feats.shape[0]} rows.")
    if not cat.is_unique:
        raise ValueError("item_ids must be unique.")
    like_threshold = float(like_threshold)
    dev = torch.device("cpu") if device is None else torch.device(device)
    parts = {}
    for side in ("support", "query"):
        items = [np.asarray(getattr(e, f"{side}_items"), dtype=np.int64) for e in eps]
        ratings = [np.asarray(getattr(e, f"{side}_ratings"), dtype=np.float64) for e in eps]
        rows = [_item_rows(i, cat, f"episode {side}") for i in items]
        rows_p, mask = _pad(rows, 0, np.int64)
        r_p, _ = _pad(ratings, 0.0, np.float64)
        x = feats[torch.from_numpy(rows_p)]
        fl = torch.get_default_dtype()
        parts[side] = (x.to(dev), torch.from_numpy((r_p >= like_threshold).astype(np.float64) * mask).to(dev, fl),
                       torch.from_numpy(r_p).to(dev, fl), torch.from_numpy(mask).to(dev))
        if side == "query":
            parts["query_items"] = _pad(items, -1, np.int64)[0]
    xs, ys, rs, ms = parts["support"]
    xq, yq, rq, mq = parts["query"]
    return LikeTasks(xs, ys, rs, ms, xq, yq, rq, mq, np.array([e.user_id for e in eps], dtype=np.int64), parts["query_items"])


def rating_pools(ratings: pd.DataFrame, item_ids: Any, min_ratings: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each training user's ratings as (feature rows [n_u] int64, ratings [n_u] float64).

    Items without a feature row are dropped; users with fewer than ``min_ratings`` kept ratings
    are skipped. The result feeds :func:`sample_like_batch`.
    """
    if not isinstance(ratings, pd.DataFrame) or not {"user_id", "item_id", "rating"} <= set(ratings.columns):
        raise TypeError("ratings must be a DataFrame with user_id, item_id, rating (e.g. split.train).")
    min_ratings = _pos_int("min_ratings", min_ratings, low=2)
    cat = pd.Index(np.asarray(item_ids, dtype=np.int64))
    df = ratings.assign(_row=cat.get_indexer(ratings["item_id"].to_numpy()))
    df = df[df["_row"] >= 0].sort_values(["user_id", "item_id"], kind="stable")
    pools = []
    for _, g in df.groupby("user_id", sort=True):
        if len(g) >= min_ratings:
            pools.append((g["_row"].to_numpy(np.int64), g["rating"].to_numpy(np.float64)))
    if not pools:
        raise ValueError(f"no user has {min_ratings} ratings of items with features.")
    return pools


def sample_like_batch(
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    features: Tensor,
    n_tasks: int,
    k_choices: Sequence[int],
    n_query: int,
    rng: np.random.Generator,
    like_threshold: float = 4.0,
    target: str = "like",
) -> _tasks.TaskBatch:
    """A random padded meta-batch of training tasks (for meta-training and the global head).

    Each task: a random training user, a support size k drawn from ``k_choices`` (capped so that at
    least one query rating remains), k random ratings as support and up to ``n_query`` others as
    query. Padding is masked, so one meta-batch mixes different k.

    Args:
        pools: from :func:`rating_pools`.
        features: [n_items, D] tensor of item features (its device is used).
        n_tasks: T; k_choices: support sizes; n_query: query size Q.
        rng: numpy generator (the caller owns the randomness).
        target: ``"like"`` (0/1 labels) or ``"rating"``.

    Returns:
        :class:`mrec_utils.tasks.TaskBatch` with x [T, S, D], y [T, S], masks [T, S] (same for query).
    """
    n_tasks = _pos_int("n_tasks", n_tasks)
    n_query = _pos_int("n_query", n_query)
    ks = [_pos_int("k_choices entry", k) for k in k_choices]
    if not ks:
        raise ValueError("k_choices is empty.")
    if target not in ("like", "rating"):
        raise ValueError(f"target must be 'like' or 'rating', got {target!r}.")
    if not isinstance(features, Tensor) or features.ndim != 2:
        raise TypeError("features must be a 2-D tensor [n_items, D].")
    users = rng.integers(0, len(pools), size=n_tasks)
    s_max, q_max = max(ks), n_query
    rows = np.zeros((2, n_tasks, max(s_max, q_max)), dtype=np.int64)
    vals = np.zeros((2, n_tasks, max(s_max, q_max)), dtype=np.float64)
    mask = np.zeros((2, n_tasks, max(s_max, q_max)), dtype=bool)
    for t, u in enumerate(users):
        it, r = pools[u]
        perm = rng.permutation(len(it))
        k = min(int(rng.choice(ks)), len(it) - 1)
        q = min(n_query, len(it) - k)
        for side, sel in ((0, perm[:k]), (1, perm[k : k + q])):
            rows[side, t, : len(sel)] = it[sel]
            vals[side, t, : len(sel)] = r[sel]
            mask[side, t, : len(sel)] = True
    if target == "like":
        vals = (vals >= like_threshold).astype(np.float64) * mask
    dev = features.device
    x = features[torch.from_numpy(rows).to(dev)]
    y = torch.from_numpy(vals).to(dev, features.dtype)
    m = torch.from_numpy(mask).to(dev)
    return _tasks.TaskBatch(x[0, :, :s_max], y[0, :, :s_max], x[1, :, :q_max], y[1, :, :q_max], m[0, :, :s_max], m[1, :, :q_max])


class UserHead(nn.Module):
    """A small user-preference model over frozen item features.

    ``body``: a learned projection ``D -> d_proj`` with a ReLU (shared by all users; the
    "embedding" of a prototypical network); ``head``: a linear layer ``d_proj -> 1``, the user's
    preference vector and bias. ``forward(x [..., D]) -> [...]`` logits (or ratings with
    ``offset``). ``d_proj=None`` drops the body: a plain linear model on the features.

    Parameter groups: names starting with ``body`` and ``head`` (ANIL adapts ``["head"]``).
    """

    def __init__(self, d_in: int, d_proj: int | None = 32, offset: float = 0.0, seed: int = 0):
        super().__init__()
        d_in = _pos_int("d_in", d_in)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            if d_proj is None:
                self.body = nn.Identity()
                width = d_in
            else:
                d_proj = _pos_int("d_proj", d_proj)
                self.body = nn.Sequential(nn.Linear(d_in, d_proj), nn.ReLU())
                width = d_proj
            self.head = nn.Linear(width, 1)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.d_in = d_in

    def features(self, x: Tensor) -> Tensor:
        """[..., D] -> [..., d_proj] (the body's output)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must end with the feature size {self.d_in}, got shape {tuple(x.shape)}.")
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x)).squeeze(-1) + self.offset


def _loss_for(target: str) -> Callable[[Tensor, Tensor], Tensor]:
    if target == "like":
        return _meta.bce_loss_per_example
    if target == "rating":
        return _meta.mse_loss_per_example
    raise ValueError(f"target must be 'like' or 'rating', got {target!r}.")


@dataclass
class HeadLog:
    """What a head training loop did: ``losses`` (one per logged step), ``seconds``, and (with a
    validation set) ``checkpoints``: ``(step, validation AUC)`` pairs and ``best_step``, the step kept."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    checkpoints: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None


def train_global_head(
    model: UserHead,
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    features: Tensor,
    *,
    steps: int = 300,
    n_tasks: int = 32,
    k_choices: Sequence[int] = (16,),
    n_query: int = 16,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    target: str = "like",
    seed: int = 0,
) -> HeadLog:
    """One head for everybody: Adam on the pooled loss of random training ratings (no per-user part).

    Each step samples a meta-batch with :func:`sample_like_batch` and minimises the masked mean loss
    over *all* its ratings (support and query alike). Trains ``model`` in place.
    """
    steps = _pos_int("steps", steps)
    loss_fn = _loss_for(target)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=_pos_float("lr", lr), weight_decay=weight_decay)
    log = HeadLog()
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        b = sample_like_batch(pools, features, n_tasks, k_choices, n_query, rng, target=target)
        x = torch.cat([b.x_support, b.x_query], 1)
        y = torch.cat([b.y_support, b.y_query], 1)
        m = torch.cat([b.mask_support, b.mask_query], 1)
        per = loss_fn(model(x).reshape(-1), y.reshape(-1)).reshape(y.shape)
        loss = per[m].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.losses.append(float(loss.detach()))
    model.eval()
    log.seconds = time.perf_counter() - t0
    return log


def adapt_and_score(
    model: nn.Module,
    tasks: LikeTasks,
    *,
    adapt: Any = "all",
    steps: int = 0,
    inner_lr: float = 0.1,
    target: str = "like",
    lrs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Adapt ``model`` to every task's support set (``steps`` SGD steps, vmap over tasks) and
    return the query predictions.

    Args:
        adapt: which parameters the per-user steps change (``split_params`` spec: "all", ["head"]).
        steps: 0 = no adaptation (the model as it is).
        lrs: Meta-SGD step sizes ``{name: tensor}`` for the adapted parameters (e.g. from
            :func:`meta_train_residual`); the step is then ``theta - lrs * grad`` and ``inner_lr`` is ignored.

    Returns:
        [T, Q] query logits (``target="like"``) or predicted ratings, detached.
    """
    steps = _pos_int("steps", steps, low=0)
    loss_fn = _loss_for(target)
    tb = tasks.batch(target)
    params, frozen = _meta.split_params(model, adapt)
    params = {k: v.detach() for k, v in params.items()}
    frozen = {k: v.detach() for k, v in frozen.items()}
    model.eval()
    if steps == 0:
        with torch.no_grad():
            return model(tb.x_query)

    lrs = None if lrs is None else {k: v.detach() for k, v in lrs.items()}

    def one(xs, ys, ms, xq):
        p = _meta.inner_adapt(model, params, frozen, xs, ys, ms, loss_fn=loss_fn, steps=steps,
                              inner_lr=lrs if lrs is not None else inner_lr)
        return _meta.functional_forward(model, p, frozen, xq)

    with torch.no_grad():
        return torch.func.vmap(one)(tb.x_support, tb.y_support, tb.mask_support, tb.x_query)


def meta_train_head(
    model: UserHead,
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    features: Tensor,
    method: str,
    *,
    meta_steps: int = 300,
    n_tasks: int = 32,
    k_choices: Sequence[int] = (4, 8, 16, 32),
    n_query: int = 16,
    inner_steps: int = 3,
    inner_lr: float = 0.3,
    outer_lr: float = 3e-3,
    epsilon: float = 0.5,
    target: str = "like",
    seed: int = 0,
) -> HeadLog:
    """Meta-train a :class:`UserHead` in place with MAML, FOMAML, ANIL or Reptile.

    * ``"maml"``: second-order MAML, every parameter adapted in the inner loop;
    * ``"fomaml"``: the same with the inner gradients treated as constants;
    * ``"anil"``: only ``head`` adapted (second order), the body learned by the outer loop;
    * ``"reptile"``: ``phi <- phi + epsilon * mean(phi_i - phi)`` with ``phi_i`` after
      ``inner_steps`` SGD steps on all of task i's ratings (:func:`mrec_utils.meta.reptile_step`),
      ``epsilon`` annealed linearly to 0.

    MAML-family outer updates use Adam (``outer_lr``) on :func:`mrec_utils.meta.meta_step`. Each
    meta-batch mixes the support sizes in ``k_choices``, so one model serves every k.
    """
    if method not in ("maml", "fomaml", "anil", "reptile"):
        raise ValueError(f"method must be 'maml', 'fomaml', 'anil' or 'reptile', got {method!r}.")
    meta_steps = _pos_int("meta_steps", meta_steps)
    inner_steps = _pos_int("inner_steps", inner_steps)
    loss_fn = _loss_for(target)
    rng = np.random.default_rng(seed)
    params, frozen = _meta.split_params(model, ["head"] if method == "anil" else "all")
    log = HeadLog()
    t0 = time.perf_counter()
    model.train()
    opt = None if method == "reptile" else torch.optim.Adam(model.parameters(), lr=_pos_float("outer_lr", outer_lr))
    for step in range(meta_steps):
        b = sample_like_batch(pools, features, n_tasks, k_choices, n_query, rng, target=target)
        if method == "reptile":
            eps = epsilon * (1 - step / meta_steps)
            new = _meta.reptile_step(model, params, frozen, b, loss_fn=loss_fn, steps=inner_steps, inner_lr=inner_lr, epsilon=eps)
            _meta.load_params_(model, new)
        else:
            loss = _meta.meta_step(model, params, frozen, b, opt, loss_fn=loss_fn, steps=inner_steps, inner_lr=inner_lr,
                                   first_order=(method == "fomaml"))
            log.losses.append(float(loss))
    model.eval()
    log.seconds = time.perf_counter() - t0
    return log


class ResidualUserHead(nn.Module):
    """A frozen global head plus a per-user linear term on the item features.

    ``score(x) = base(x) + x . user_w + user_b`` for item features ``x`` [..., D]. ``base`` (a copy
    of a trained :class:`UserHead`) never changes: its parameters are frozen
    (``requires_grad=False``) and are not adapted. The per-user part is :attr:`ADAPT`: the vector
    ``user_w`` [D] and the offset ``user_b`` []. The offset cannot change a user's ranking (AUC is
    invariant to it), but it absorbs how often the user likes anything, so that ``user_w`` is free
    to learn *which* films they like. Their initial values and one inner step size per number are
    meta-learned (Meta-SGD, :func:`meta_train_residual`), and a new user's support ratings move
    them by a few SGD steps. At zero the scores are exactly the global head's.
    """

    ADAPT: tuple[str, ...] = ("user_w", "user_b")
    """Names of the per-user parameters (the ``adapt=`` spec of :func:`adapt_and_score`)."""

    def __init__(self, base: UserHead):
        super().__init__()
        if not isinstance(base, UserHead):
            raise TypeError(f"base must be a trained UserHead, got {type(base).__name__}.")
        self.base = copy.deepcopy(base)
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.d_in = base.d_in
        dev = _device_of(base)
        self.user_w = nn.Parameter(torch.zeros(base.d_in, device=dev))
        self.user_b = nn.Parameter(torch.zeros((), device=dev))

    def forward(self, x: Tensor) -> Tensor:
        """[..., D] item features -> [...] scores (like-logits)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"x must end with the feature size {self.d_in}, got shape {tuple(x.shape)}.")
        return self.base(x) + x @ self.user_w + self.user_b


def pairwise_query_loss(scores: Tensor, y: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean logistic pairwise loss of one task's query: ``mean softplus(s_dislike - s_like)`` over
    all (liked, disliked) pairs of real items (a smooth surrogate of ``1 - AUC``).

    Like the AUC it is invariant to adding a constant to all of the user's scores, so a meta-learner
    trained on it is rewarded only for changing the user's *ranking*.

    Args:
        scores, y, mask: [Q] scores, 0/1 labels, bool mask (or [T, Q] batches: the result is then [T]).

    Returns:
        ``(loss, has_pairs)``: the loss (0 where there is no pair) and whether the task had a pair.
    """
    if not (scores.shape == y.shape == mask.shape):
        raise ValueError(f"scores, y and mask must have the same shape, got {tuple(scores.shape)}, {tuple(y.shape)}, {tuple(mask.shape)}.")
    m = mask.to(scores.dtype)
    pos, neg = y * m, (1 - y) * m
    diff = scores.unsqueeze(-2) - scores.unsqueeze(-1)  # [..., i, j] = s_j - s_i
    w = pos.unsqueeze(-1) * neg.unsqueeze(-2)  # i liked, j disliked
    n = w.sum((-1, -2))
    loss = (F.softplus(diff) * w).sum((-1, -2)) / n.clamp_min(1)
    return loss, n > 0


def _residual_outer_loss(model: nn.Module, params: dict[str, Tensor], frozen: dict[str, Tensor], lrs: dict[str, Tensor],
                         b: _tasks.TaskBatch, steps: int, first_order: bool) -> Tensor:
    """Pairwise query loss after Meta-SGD inner steps on the support BCE, averaged over tasks (vmap)."""

    def one(xs, ys, ms, xq, yq, mq):
        inner = _meta.MAML(steps, lrs, first_order, loss_fn=_meta.bce_loss_per_example)
        p = inner.inner_loop(model, params, frozen, xs, ys, ms)
        return pairwise_query_loss(_meta.functional_forward(model, p, frozen, xq), yq, mq)

    loss, ok = torch.func.vmap(one)(b.x_support, b.y_support, b.mask_support, b.x_query, b.y_query, b.mask_query)
    return (loss * ok).sum() / ok.sum().clamp_min(1)


def _mean_val_auc(model: nn.Module, val: Sequence[LikeTasks], adapt: Any, steps: int, lrs: dict[str, Tensor]) -> float:
    return float(np.mean([np.nanmean(evaluate_like(adapt_and_score(model, t, adapt=adapt, steps=steps, lrs=lrs), t).auc) for t in val]))


def meta_train_residual(
    model: ResidualUserHead,
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    features: Tensor,
    *,
    meta_steps: int = 300,
    n_tasks: int = 32,
    k_choices: Sequence[int] = (4, 8, 16, 32),
    n_query: int = 16,
    inner_steps: int = 3,
    init_lr: float = 0.01,
    outer_lr: float = 3e-3,
    first_order: bool = False,
    learn_init: bool = True,
    per_coordinate: bool = True,
    outer_loss: str = "bce",
    val_tasks: LikeTasks | Sequence[LikeTasks] | None = None,
    eval_every: int = 100,
    seed: int = 0,
) -> tuple[HeadLog, dict[str, Tensor]]:
    """Meta-SGD (Li et al. 2017) for the per-user term of a :class:`ResidualUserHead`, in place.

    The meta-parameters are the initial per-user part ``u0 = (user_w, user_b)`` [D + 1] and the
    inner step sizes ``alpha`` (one per number, started at ``init_lr``); the inner loop is
    ``u <- u - alpha * grad_u L_support(u)`` for ``inner_steps`` steps, the outer loss the query
    BCE after adaptation (second order unless ``first_order``), minimised with Adam (``outer_lr``)
    over meta-batches of training tasks that mix the support sizes ``k_choices``. The global head
    inside ``model`` is not trained. With ``learn_init=False`` the initial vector stays at its
    current value (zero for a fresh head: the unadapted scores are then exactly the global head's)
    and only the step sizes are meta-learned. With ``per_coordinate=False`` there is one step size
    per parameter tensor (two numbers: one for ``user_w``, one for ``user_b``) instead of one per
    number, far fewer meta-parameters to estimate from noisy tasks. ``outer_loss="pairwise"``
    replaces the query BCE by :func:`pairwise_query_loss` (the inner loop stays BCE): the BCE
    also rewards getting each user's like *rate* right, the pairwise loss only their ranking,
    which is what the query AUC measures.

    With ``val_tasks`` (validation users only), the mean query AUC after adaptation is measured
    every ``eval_every`` steps and the best checkpoint (``u0`` and ``alpha``) is restored at the
    end (early stopping); ``log.checkpoints`` and ``log.best_step`` record it. Without, the last
    state is kept.

    Returns:
        ``(log, lrs)`` with ``lrs = {"user_w": [D] (or [] ), "user_b": []}`` (detached) for
        :func:`adapt_and_score` (``adapt=list(ResidualUserHead.ADAPT)``, ``steps=inner_steps``, ``lrs=lrs``).
    """
    if not isinstance(model, ResidualUserHead):
        raise TypeError(f"model must be a ResidualUserHead, got {type(model).__name__}.")
    meta_steps = _pos_int("meta_steps", meta_steps)
    inner_steps = _pos_int("inner_steps", inner_steps)
    eval_every = _pos_int("eval_every", eval_every)
    if outer_loss not in ("bce", "pairwise"):
        raise ValueError(f"outer_loss must be 'bce' or 'pairwise', got {outer_loss!r}.")
    outer_lr = _pos_float("outer_lr", outer_lr)
    init_lr = _pos_float("init_lr", init_lr)
    val = [val_tasks] if isinstance(val_tasks, LikeTasks) else (None if val_tasks is None else list(val_tasks))
    if val is not None and (not val or not all(isinstance(t, LikeTasks) for t in val)):
        raise TypeError("val_tasks must be a LikeTasks, a non-empty list of LikeTasks, or None.")
    rng = np.random.default_rng(seed)
    adapt = list(ResidualUserHead.ADAPT)
    params, frozen = _meta.split_params(model, adapt)
    lrs = _meta.init_meta_sgd_lrs(params, init_lr)
    if not per_coordinate:
        lrs = {k: v[(0,) * v.ndim].detach().clone().requires_grad_(True) for k, v in lrs.items()}  # 0-dim
    opt = torch.optim.Adam([*(params.values() if learn_init else []), *lrs.values()], lr=outer_lr)
    log = HeadLog()
    best: tuple[float, int, dict[str, Tensor]] | None = None
    t0 = time.perf_counter()
    for step in range(1, meta_steps + 1):
        b = sample_like_batch(pools, features, n_tasks, k_choices, n_query, rng)
        if outer_loss == "bce":
            loss = _meta.meta_step(model, params, frozen, b, opt, loss_fn=_meta.bce_loss_per_example, steps=inner_steps,
                                   inner_lr=lrs, first_order=bool(first_order))
        else:
            opt.zero_grad(set_to_none=True)
            loss = _residual_outer_loss(model, params, frozen, lrs, b, inner_steps, bool(first_order))
            loss.backward()
            opt.step()
        log.losses.append(float(loss.detach()))
        if val is not None and (step % eval_every == 0 or step == meta_steps):
            auc = _mean_val_auc(model, val, adapt, inner_steps, lrs)
            log.checkpoints.append((step, auc))
            if best is None or auc > best[0] + TIE_TOL:
                best = (auc, step, {**{k: v.detach().clone() for k, v in params.items()},
                                    **{"lr:" + k: v.detach().clone() for k, v in lrs.items()}})
    if best is not None:
        with torch.no_grad():
            for k in params:
                params[k].copy_(best[2][k])
                lrs[k].copy_(best[2]["lr:" + k])
        log.best_step = best[1]
    log.seconds = time.perf_counter() - t0
    return log, {k: v.detach() for k, v in lrs.items()}


def user_folds(users: Any, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Partition user ids at random (seeded) into ``n_folds`` folds of (almost) equal size.

    For K-fold evaluation over users: each fold is a set of test users once, the methods being
    trained on the users of the other folds. Returns sorted id arrays; sizes differ by at most one.
    """
    u = np.unique(np.asarray(users))
    if u.ndim != 1 or u.size == 0 or not np.issubdtype(u.dtype, np.integer):
        raise ValueError("users must be a non-empty 1-D array of integer user ids.")
    n_folds = _pos_int("n_folds", n_folds, low=2)
    if n_folds > u.size:
        raise ValueError(f"n_folds={n_folds} exceeds the number of users ({u.size}).")
    perm = np.random.default_rng(seed).permutation(u)
    return [np.sort(f) for f in np.array_split(perm, n_folds)]


def _proto_scores(model: UserHead, xs: Tensor, ys: Tensor, ms: Tensor, xq: Tensor) -> Tensor:
    logits = _meta.prototypical_logits(model.features(xs), ys.long(), model.features(xq), ms, n_classes=2)
    return logits[..., 1] - logits[..., 0]


def train_protonet(
    model: UserHead,
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    features: Tensor,
    *,
    steps: int = 300,
    n_tasks: int = 32,
    k_choices: Sequence[int] = (4, 8, 16, 32),
    n_query: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
) -> HeadLog:
    """Train ``model.body`` as the embedding of a prototypical network (Snell et al. 2017).

    Per task, the like and dislike prototypes are the means of the embedded support items of each
    class; a query item's like-logit is ``-|f(x) - c_like|^2 + |f(x) - c_dislike|^2``. A class
    without support example falls back to the origin. Loss: binary cross-entropy of the query.
    """
    steps = _pos_int("steps", steps)
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.body.parameters(), lr=_pos_float("lr", lr))
    log = HeadLog()
    t0 = time.perf_counter()
    for _ in range(steps):
        b = sample_like_batch(pools, features, n_tasks, k_choices, n_query, rng)
        s = _proto_scores(model, b.x_support, b.y_support, b.mask_support, b.x_query)
        loss = _meta.masked_mean(F.binary_cross_entropy_with_logits(s, b.y_query, reduction="none"), b.mask_query)
        loss = loss[b.mask_query.any(-1)].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.losses.append(float(loss.detach()))
    log.seconds = time.perf_counter() - t0
    return log


@torch.no_grad()
def protonet_scores(model: UserHead, tasks: LikeTasks) -> Tensor:
    """[T, Q] like-scores of a prototypical network for every task's query items."""
    return _proto_scores(model, tasks.x_support, tasks.y_support, tasks.mask_support, tasks.x_query)


def logreg_scratch(tasks: LikeTasks, l2: float = 1.0, iters: int = 15) -> Tensor:
    """Per-user L2-regularised logistic regression from scratch on the item features (no transfer).

    Minimises ``sum_i BCE(w.x_i + b, y_i) + l2/2 |w|^2`` (the bias is not penalised, but a tiny
    ``1e-6`` keeps the Newton system solvable when a user's support has one class only) for every
    task at once with Newton's method (batched ``[T, D+1, D+1]`` solves). This is scikit-learn's
    ``LogisticRegression(C=1/l2)`` objective.

    Returns:
        [T, Q] query logits.
    """
    l2 = _pos_float("l2", l2)
    iters = _pos_int("iters", iters)
    x, y, m = tasks.x_support, tasks.y_support, tasks.mask_support.to(tasks.x_support.dtype)
    t, s, d = x.shape
    xb = torch.cat([x, torch.ones(t, s, 1, dtype=x.dtype, device=x.device)], -1) * m[..., None]
    reg = torch.full((d + 1,), l2, dtype=x.dtype, device=x.device)
    reg[-1] = 1e-6
    w = torch.zeros(t, d + 1, dtype=x.dtype, device=x.device)
    for _ in range(iters):
        p = torch.sigmoid((xb @ w[..., None]).squeeze(-1))
        g = (xb * ((p - y) * m)[..., None]).sum(1) + reg * w
        h = xb.transpose(1, 2) @ (xb * (p * (1 - p) * m)[..., None]) + torch.diag(reg)
        w = w - torch.linalg.solve(h, g[..., None]).squeeze(-1)
    return (tasks.x_query @ w[:, :d, None]).squeeze(-1) + w[:, d:]


def evaluate_like(scores: Any, tasks: LikeTasks, k: int = 10) -> pd.DataFrame:
    """Per-user query metrics of like-scores (or predicted ratings).

    Returns:
        DataFrame, one row per task: ``user_id``, ``auc`` (NaN when the query has one class only),
        ``ndcg@10`` (the query items ranked by score, graded by their ratings, exponential gain),
        ``n_query``.
    """
    s = scores.detach().cpu().numpy() if isinstance(scores, Tensor) else np.asarray(scores, dtype=np.float64)
    m = tasks.mask_query.cpu().numpy()
    if s.shape != m.shape:
        raise ValueError(f"scores must have the query shape {m.shape}, got {s.shape}.")
    if not np.isfinite(s[m]).all():
        raise ValueError("scores contain NaN or inf on real query items.")
    y = tasks.y_query.cpu().numpy()
    r = tasks.r_query.cpu().numpy()
    aucs = []
    for i in range(len(s)):
        yi, si = y[i][m[i]], s[i][m[i]]
        aucs.append(_metrics.auc(yi, si) if 0 < yi.sum() < len(yi) else np.nan)
    nd = _metrics.ndcg_at_k_batch(np.where(m, r, 0.0), np.where(m, s, 0.0), k, ties="average", mask=m)
    return pd.DataFrame({"user_id": tasks.users, "auc": aucs, f"ndcg@{k}": nd, "n_query": m.sum(1)})


# ==============================================================================================
# Part 2: MAML on the item-GPT (a per-user additive soft prompt)
# ==============================================================================================


@dataclass
class GPTUserTasks:
    """New users for the item-GPT: the first k items are the context/support, the next n the targets.

    Attributes:
        tokens: [B, k] int64 GPT tokens (item index + 1) of the support items, oldest first.
        targets: [B, n] int64 item *indices* of the next items (-1 = padding).
        target_mask: [B, n] bool.
        owner: [B] position of each user in the source sequences.
    """

    tokens: Tensor
    targets: Tensor
    target_mask: Tensor
    owner: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def histories(self) -> list[np.ndarray]:
        """The support items as item-index arrays (for exclusion from rankings)."""
        return [r.cpu().numpy() - 1 for r in self.tokens]


def gpt_user_tasks(sequences: Any, k: int, n_targets: int = 10, start: int = 0, device: Any = None) -> GPTUserTasks:
    """Users whose sequence has at least ``start + k + 1`` items; support = items ``start..start+k-1``,
    targets = up to ``n_targets`` next items that are not already in the support (re-watches are
    dropped: they are excluded from every ranking anyway).

    Args:
        sequences: list of item-index arrays (or :class:`mrec_utils.gpt.ItemSequences`).
        k: support size; n_targets: how many next items count as relevant.
        start: offset of the support window (0 = the user's first items: a new user).
    """
    seqs = getattr(sequences, "sequences", sequences)
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise TypeError("sequences must be a list of 1-D item-index arrays or an ItemSequences.")
    k = _pos_int("k", k)
    n_targets = _pos_int("n_targets", n_targets)
    start = _pos_int("start", start, low=0)
    tok, tgt, own = [], [], []
    for i, s in enumerate(seqs):
        s = np.asarray(s, dtype=np.int64)
        if len(s) < start + k + 1:
            continue
        sup = s[start : start + k]
        nxt = [int(v) for v in s[start + k :] if v not in set(sup.tolist())][:n_targets]
        if not nxt:
            continue
        tok.append(sup + 1)
        tgt.append(np.array(nxt, dtype=np.int64))
        own.append(i)
    if not tok:
        raise ValueError(f"no sequence has {start + k + 1} items; lower k.")
    dev = torch.device("cpu") if device is None else torch.device(device)
    t_p, t_m = _pad(tgt, -1, np.int64)
    return GPTUserTasks(torch.from_numpy(np.stack(tok)).to(dev), torch.from_numpy(t_p).to(dev), torch.from_numpy(t_m).to(dev),
                        np.array(own, dtype=np.int64))


def use_eager_attention(model: nn.Module) -> nn.Module:
    """Switch a ``transformers`` model to its plain PyTorch attention (returns the model).

    Second-order MAML differentiates *through* a gradient, i.e. needs double backward; the fused
    attention kernels (SDPA/flash) do not all support it, the eager implementation does.
    """
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):
        try:
            setter("eager")
            return model
        except Exception:  # pragma: no cover - older transformers
            pass
    model.config._attn_implementation = "eager"
    return model


def _check_gpt(model: Any) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "transformer") or not hasattr(model, "config"):
        raise TypeError("model must be an item GPT (transformers GPT2LMHeadModel), e.g. gpt.make_item_gpt(n_items).")


def gpt_hidden(model: Any, tokens: Tensor, user_vec: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Final hidden states of the item-GPT with a per-user vector added to every input embedding.

    ``h = GPT(wte[tokens] + u)`` (GPT-2 then adds its position embeddings). ``u = 0`` gives exactly
    the pre-trained model's hidden states.

    Args:
        tokens: [B, L] int64 tokens (item index + 1; 0 = padding).
        user_vec: [B, n_embd] or [n_embd] (one vector for all) or None (= zeros).
        mask: [B, L] bool attention mask (default: tokens != 0).

    Returns:
        [B, L, n_embd].
    """
    _check_gpt(model)
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a [B, L] int64 tensor.")
    emb = model.transformer.wte(tokens)
    if user_vec is not None:
        if user_vec.shape[-1] != emb.shape[-1] or user_vec.ndim not in (1, 2):
            raise ValueError(f"user_vec must be [B, {emb.shape[-1]}] or [{emb.shape[-1]}], got {tuple(user_vec.shape)}.")
        emb = emb + (user_vec[:, None, :] if user_vec.ndim == 2 else user_vec)
    if mask is None:
        mask = tokens != 0
    return model.transformer(inputs_embeds=emb, attention_mask=mask.long()).last_hidden_state


def gpt_item_logits(model: Any, hidden: Tensor) -> Tensor:
    """Scores of every item from hidden states: ``hidden @ wte[1:].T`` -> [..., n_items] (tied output layer)."""
    return hidden @ model.transformer.wte.weight[1:].T


def support_loss(model: Any, tokens: Tensor, user_vec: Tensor) -> Tensor:
    """Per-user next-item loss on the support: mean CE of item t+1 from items 0..t -> [B].

    Tokens must be unpadded [B, k] with k >= 2 (every user the same k).
    """
    if tokens.shape[1] < 2:
        raise ValueError("support_loss needs at least 2 support items per user (it predicts item t+1 from 0..t).")
    logits = gpt_item_logits(model, gpt_hidden(model, tokens, user_vec))[:, :-1]  # [B, k-1, n]
    per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), (tokens[:, 1:] - 1).reshape(-1), reduction="none")
    return per.reshape(tokens.shape[0], -1).mean(1)


def target_loss(model: Any, tokens: Tensor, user_vec: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
    """Per-user loss on the targets: mean CE of each next item from the scores after the whole support -> [B]."""
    logits = gpt_item_logits(model, gpt_hidden(model, tokens, user_vec)[:, -1])  # [B, n]
    logp = torch.log_softmax(logits, -1)
    safe = targets.clamp_min(0)
    picked = logp.gather(1, safe) * target_mask
    return -(picked.sum(1) / target_mask.sum(1).clamp_min(1))


def adapt_user_vectors(
    model: Any,
    init: Tensor,
    tokens: Tensor,
    *,
    steps: int,
    lr: float,
    first_order: bool = True,
) -> Tensor:
    """Per-user SGD on the additive soft prompt only: ``u <- u - lr * d support_loss / d u``.

    All users of the batch adapt at once: their losses are independent rows of the GPT's batch, so
    the gradient of their *sum* w.r.t. the ``[B, n_embd]`` matrix has each user's own gradient as
    its row. No GPT weight changes (they are not even given to the optimiser).

    Args:
        init: [n_embd] initial vector (0 = the pre-trained model; or the meta-learned ``u0``).
        tokens: [B, k] support tokens.
        first_order: True: the inner gradients are constants (FOMAML / evaluation). False: the
            result is differentiable w.r.t. ``init`` through the inner gradients (second-order MAML).

    Returns:
        [B, n_embd] adapted vectors.
    """
    _check_gpt(model)
    steps = _pos_int("steps", steps, low=0)
    lr = _pos_float("lr", lr)
    if init.ndim != 1 or init.shape[0] != model.config.n_embd:
        raise ValueError(f"init must be a [{model.config.n_embd}] vector, got {tuple(init.shape)}.")
    u = init.expand(tokens.shape[0], -1)
    if not init.requires_grad:
        u = u.clone()
    for _ in range(steps):
        with torch.enable_grad():
            u_in = u.detach().requires_grad_(True) if (first_order or not u.requires_grad) else u
            loss = support_loss(model, tokens, u_in).sum()
            (g,) = torch.autograd.grad(loss, u_in, create_graph=not first_order)
        u = u - lr * (g.detach() if first_order else g)
    return u


@dataclass
class GPTMetaLog:
    """What :func:`meta_train_user_vector` did: per-step ``losses`` (query loss after adaptation), ``seconds``."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _sample_gpt_batch(seqs: Sequence[np.ndarray], n_users: int, k: int, n_targets: int, rng: np.random.Generator, dev: torch.device):
    ok = [s for s in seqs if len(s) >= k + 2]
    if not ok:
        raise ValueError(f"no training sequence has {k + 2} items.")
    pick = rng.integers(0, len(ok), size=n_users)
    tok, tgt = [], []
    for p in pick:
        s = ok[p]
        start = int(rng.integers(0, len(s) - k))  # at least one item after the support
        sup = s[start : start + k]
        nxt = [int(v) for v in s[start + k : start + k + n_targets] if v not in set(sup.tolist())] or [int(s[start + k])]
        tok.append(sup + 1)
        tgt.append(np.array(nxt, dtype=np.int64))
    t_p, t_m = _pad(tgt, 0, np.int64)
    return torch.from_numpy(np.stack(tok)).to(dev), torch.from_numpy(t_p).to(dev), torch.from_numpy(t_m).to(dev)


def meta_train_user_vector(
    model: Any,
    sequences: Any,
    method: str,
    *,
    meta_steps: int = 150,
    n_users: int = 32,
    k_choices: Sequence[int] = (5, 10, 20),
    n_targets: int = 10,
    inner_steps: int = 2,
    inner_lr: float = 1.0,
    outer_lr: float = 0.01,
    epsilon: float = 0.5,
    seed: int = 0,
) -> tuple[Tensor, GPTMetaLog]:
    """Meta-learn the initial user vector ``u0`` of the additive soft prompt; the GPT stays frozen.

    A task is a random window of a training user's sequence: k items of support (the inner loop
    minimises :func:`support_loss`) followed by the next ``n_targets`` items (the query:
    :func:`target_loss` after the whole support). Each meta-batch uses one k from ``k_choices``.

    * ``"maml"``: Adam on ``d mean_i L_query_i(u_i(u0)) / d u0`` through the inner steps (second order);
    * ``"fomaml"``: the same gradient with the inner gradients held constant;
    * ``"reptile"``: ``u0 <- u0 + epsilon * mean_i(u_i - u0)`` (inner steps on support + targets,
      i.e. the user's whole window), ``epsilon`` annealed linearly to 0.

    Returns:
        ``(u0 [n_embd] detached, log)``. The GPT's parameters are not modified (checked by the tests).
    """
    _check_gpt(model)
    if method not in ("maml", "fomaml", "reptile"):
        raise ValueError(f"method must be 'maml', 'fomaml' or 'reptile', got {method!r}.")
    seqs = [np.asarray(s, dtype=np.int64) for s in getattr(sequences, "sequences", sequences)]
    meta_steps = _pos_int("meta_steps", meta_steps)
    ks = [_pos_int("k_choices entry", k, low=2) for k in k_choices]
    rng = np.random.default_rng(seed)
    dev = _device_of(model)
    was_training = model.training
    model.eval()  # no dropout: the adaptation sees a deterministic GPT
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    u0 = torch.zeros(model.config.n_embd, device=dev, requires_grad=True)
    opt = torch.optim.Adam([u0], lr=_pos_float("outer_lr", outer_lr)) if method != "reptile" else None
    log = GPTMetaLog()
    t0 = time.perf_counter()
    try:
        for step in range(meta_steps):
            k = int(rng.choice(ks))
            tok, tgt, tm = _sample_gpt_batch(seqs, n_users, k, n_targets, rng, dev)
            if method == "reptile":
                full = torch.cat([tok, tgt + 1], 1) if bool(tm.all()) else tok
                u = adapt_user_vectors(model, u0.detach(), full, steps=inner_steps, lr=inner_lr)
                with torch.no_grad():
                    u0 += epsilon * (1 - step / meta_steps) * (u.mean(0) - u0)
                log.losses.append(float(target_loss(model, tok, u, tgt, tm).mean()))
            else:
                u = adapt_user_vectors(model, u0, tok, steps=inner_steps, lr=inner_lr, first_order=(method == "fomaml"))
                if method == "fomaml":  # the adapted vector is u0 + constant: reconnect it to u0
                    u = u0 + (u - u0).detach()
                loss = target_loss(model, tok, u, tgt, tm).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                log.losses.append(float(loss.detach()))
    finally:
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    log.seconds = time.perf_counter() - t0
    return u0.detach(), log


@torch.no_grad()
def score_with_user_vectors(model: Any, tokens: Tensor, user_vec: Tensor | None) -> Tensor:
    """[B, n_items] next-item scores after each user's support, with their (adapted) vectors."""
    _check_gpt(model)
    was = model.training
    model.eval()
    try:
        return gpt_item_logits(model, gpt_hidden(model, tokens, user_vec)[:, -1])
    finally:
        model.train(was)


# ==============================================================================================
# Part 3: MetaEmb-style embeddings for new items from their text
# ==============================================================================================


class EmbeddingGenerator(nn.Module):
    """MetaEmb generator: item text features [..., D] -> initial item-id embedding [..., n_embd].

    A two-layer MLP ``Linear(D, hidden) -> ReLU -> Linear(hidden, n_embd)``; the output layer starts
    at zero, so before training every new item starts at the origin (a neutral item).
    """

    def __init__(self, d_in: int, n_embd: int, hidden: int = 64, seed: int = 0):
        super().__init__()
        d_in, n_embd, hidden = _pos_int("d_in", d_in), _pos_int("n_embd", n_embd), _pos_int("hidden", hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, n_embd))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)
        self.d_in = d_in

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.shape[-1] != self.d_in:
            raise ValueError(f"x must be a tensor [..., {self.d_in}], got {getattr(x, 'shape', type(x).__name__)}.")
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or inf.")
        return self.net(x)


@dataclass
class ItemEvents:
    """"History -> next item" events grouped by the next item, with the frozen GPT's view of them.

    Attributes:
        hidden: [E, n_embd] GPT hidden state after each history (the query vector of the event).
        item: [E] int64 index of the next item *in the caller's item list*.
        log_z_rest: [E] log-sum-exp of the scores of the reference catalogue (the warm items)
            except the event's own item, so that ``CE = -(h.e) + log(exp(h.e) + exp(log_z_rest))``
            for any candidate embedding ``e`` of the next item.
        user: [E] owner (position in the sequences).
        log_z_all: [E] log-sum-exp over the *whole* reference catalogue (what another item's
            embedding competes with when this event serves as a negative); None = ``log_z_rest``.
    """

    hidden: Tensor
    item: Tensor
    log_z_rest: Tensor
    user: np.ndarray
    log_z_all: Tensor | None = None

    def z_all(self) -> Tensor:
        return self.log_z_rest if self.log_z_all is None else self.log_z_all

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def of_items(self, n_items: int, per_item: int, rng: np.random.Generator | None = None, first: bool = False) -> Tensor:
        """[n_items, per_item] event indices per item (first events in order, or random with replacement);
        -1 where an item has no event."""
        out = torch.full((n_items, per_item), -1, dtype=torch.long)
        it = self.item.cpu().numpy()
        for j in range(n_items):
            ev = np.flatnonzero(it == j)
            if len(ev) == 0:
                continue
            sel = ev[:per_item] if first else rng.choice(ev, size=per_item, replace=True)
            out[j, : len(sel)] = torch.from_numpy(sel)
        return out


@torch.no_grad()
def item_events(
    model: Any,
    sequences: Any,
    is_target: Any,
    index_map: Any,
    *,
    min_history: int = 3,
    drop: Any = None,
    max_events_per_user: int | None = None,
    warm_table: Tensor | None = None,
    exclude_own: bool = False,
    batch_size: int = 256,
) -> ItemEvents:
    """Collect the events "history -> item j" of ``sequences`` where ``j`` is a target item.

    The sequences use a vocabulary ``V`` that contains the GPT's items *and* the target items.
    Items in ``drop`` (default: the targets) are removed from every history, so the GPT only
    reads items it knows; an event needs ``min_history`` remaining history items (the last
    ``n_positions`` are read).

    Args:
        model: the frozen item-GPT.
        sequences: list of int arrays over ``V`` (or an ``ItemSequences``).
        is_target: [V] bool, which items are targets (the new items, or warm items treated as new).
        index_map: [V] int64: for a target item its index in the caller's target list; for any
            other item its GPT item index (token - 1).
        drop: [V] bool, items left out of histories (default ``is_target``). For warm items
            treated as new pass the new items here: histories then keep the other warm items.
        max_events_per_user: keep at most this many events per user (None: all).
        warm_table: [n_ref, n_embd] embeddings of the reference catalogue for ``log_z_rest``
            (default: the GPT's own item rows).
        exclude_own: the targets *are* rows of ``warm_table`` (target index = row; warm items treated
            as new): leave each event's own row out of ``log_z_rest``.

    Returns:
        :class:`ItemEvents`.
    """
    _check_gpt(model)
    seqs = [np.asarray(s, dtype=np.int64) for s in getattr(sequences, "sequences", sequences)]
    is_target = np.asarray(is_target, dtype=bool)
    index_map = np.asarray(index_map, dtype=np.int64)
    drop = is_target if drop is None else np.asarray(drop, dtype=bool)
    if is_target.shape != index_map.shape or is_target.ndim != 1 or drop.shape != is_target.shape:
        raise ValueError(f"is_target, index_map and drop must be 1-D of the same length, got {is_target.shape}, {index_map.shape}, {drop.shape}.")
    min_history = _pos_int("min_history", min_history)
    hist, item, user = [], [], []
    n_pos = int(model.config.n_positions)
    for u, s in enumerate(seqs):
        if len(s) and (s.min() < 0 or s.max() >= len(is_target)):
            raise ValueError(f"sequence {u} has item indices outside [0, {len(is_target)}).")
        known: list[int] = []
        n_u = 0
        for v in s.tolist():
            if is_target[v]:
                if len(known) >= min_history and (max_events_per_user is None or n_u < max_events_per_user):
                    hist.append(np.array(known[-n_pos:], dtype=np.int64))
                    item.append(int(index_map[v]))
                    user.append(u)
                    n_u += 1
            if not drop[v]:
                known.append(int(index_map[v]))
    if not hist:
        raise ValueError("no event found: no target item follows a long enough history.")
    dev = _device_of(model)
    table = model.transformer.wte.weight[1:] if warm_table is None else warm_table
    hs = []
    was = model.training
    model.eval()
    try:
        for b in range(0, len(hist), batch_size):
            chunk = hist[b : b + batch_size]
            width = max(len(h) for h in chunk)
            tok = torch.zeros(len(chunk), width, dtype=torch.long)
            for r, h in enumerate(chunk):
                tok[r, : len(h)] = torch.from_numpy(h + 1)
            tok = tok.to(dev)
            mask = tok != 0
            h = gpt_hidden(model, tok, None, mask)
            last = mask.sum(1) - 1
            hs.append(h[torch.arange(len(chunk), device=dev), last])
    finally:
        model.train(was)
    hidden = torch.cat(hs)
    items = torch.tensor(item, dtype=torch.long, device=dev)
    scores = hidden @ table.T
    log_z_all = torch.logsumexp(scores, dim=1)
    log_z = log_z_all
    if exclude_own:
        own = scores.gather(1, items[:, None]).squeeze(1)
        log_z = log_z_all + torch.log1p(-torch.exp(own - log_z_all).clamp_max(1 - 1e-7))
    return ItemEvents(hidden, items, log_z, np.array(user, dtype=np.int64), log_z_all)


def _event_ce(e: Tensor, h: Tensor, log_z_rest: Tensor, mask: Tensor, neg: tuple[Tensor, Tensor] | None = None,
              neg_weight: float = 1.0) -> Tensor:
    """Loss per item of its embedding row: e [B, d]; positives h [B, K, d], log_z_rest [B, K], mask [B, K]
    -> [B]. Mean CE over the item's own events, plus (with ``neg = (h_neg [B, N, d], log_z_all [B, N])``)
    ``neg_weight`` times the mean increase ``log(1 + exp(h_neg.e - log_z_all))`` of the loss of
    *other* events, in whose softmax the item is a competitor."""
    s = (h * e[:, None, :]).sum(-1)
    loss = _meta.masked_mean(torch.logaddexp(s, log_z_rest) - s, mask)
    if neg is not None:
        hn, zn = neg
        loss = loss + neg_weight * F.softplus((hn * e[:, None, :]).sum(-1) - zn).mean(-1)
    return loss


def metaemb_loss(
    generator: EmbeddingGenerator,
    x_text: Tensor,
    h_a: Tensor,
    z_a: Tensor,
    m_a: Tensor,
    h_b: Tensor,
    z_b: Tensor,
    m_b: Tensor,
    *,
    warm_lr: float,
    alpha: float = 0.1,
    first_order: bool = False,
    neg_a: tuple[Tensor, Tensor] | None = None,
    neg_b: tuple[Tensor, Tensor] | None = None,
    neg_weight: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """MetaEmb's objective for a batch of B warm items treated as new (Pan et al. 2019).

    ``e0 = g(x)`` (cold-start embedding); ``L_a = loss(e0; batch a)`` (cold-start loss);
    ``e1 = e0 - warm_lr * dL_a/de0`` (one warm-up step on batch a); ``L_b = loss(e1; batch b)``
    (warm-up loss on a *different* batch); objective ``alpha * L_a + (1 - alpha) * L_b``.
    With ``first_order=False`` the gradient reaches ``g`` through the warm-up step as well.

    The per-item loss is the GPT's next-item cross-entropy of the item's own events (positives).
    Positives alone are degenerate for a single free row: a huge embedding along the average
    hidden state predicts the item after *every* history and drives the loss to 0. MetaEmb's
    click data has negatives; here ``neg_*`` add the item's role as a competitor in other
    events' softmax (:func:`_event_ce`), weighted by ``neg_weight`` (about the number of items,
    so that the sampled negatives stand for all the other events).

    Args:
        x_text: [B, D] text features; h_*: [B, K, n_embd] positive events' hidden states; z_*:
            [B, K] their ``log_z_rest``; m_*: [B, K] bool masks; neg_*: ``(h [B, N, n_embd],
            log_z_all [B, N])`` negative events or None.

    Returns:
        ``(objective, L_a, L_b)`` scalars (the last two detached).
    """
    alpha = float(alpha)
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    warm_lr = _pos_float("warm_lr", warm_lr)
    neg_weight = _pos_float("neg_weight", neg_weight, allow_zero=True)
    e0 = generator(x_text)
    ce_a = _event_ce(e0, h_a, z_a, m_a, neg_a, neg_weight)
    (g,) = torch.autograd.grad(ce_a.sum(), e0, create_graph=not first_order, retain_graph=True)
    e1 = e0 - warm_lr * (g.detach() if first_order else g)
    ce_b = _event_ce(e1, h_b, z_b, m_b, neg_b, neg_weight)
    la, lb = ce_a.mean(), ce_b.mean()
    return alpha * la + (1 - alpha) * lb, la.detach(), lb.detach()


def _gather_events(ev: ItemEvents, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m = idx >= 0
    safe = idx.clamp_min(0).to(ev.hidden.device)
    return ev.hidden[safe], ev.log_z_rest[safe], m.to(ev.hidden.device)


def _negatives(ev: ItemEvents, n_rows: int, n_neg: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    idx = torch.from_numpy(rng.integers(0, len(ev), size=(n_rows, n_neg))).to(ev.hidden.device)
    return ev.hidden[idx], ev.z_all()[idx]


def train_metaemb(
    generator: EmbeddingGenerator,
    item_features: Tensor,
    events: ItemEvents,
    *,
    steps: int = 300,
    n_items: int = 64,
    per_item: int = 8,
    warm_lr: float = 0.5,
    alpha: float = 0.1,
    lr: float = 3e-3,
    n_neg: int = 16,
    neg_weight: float = 1.0,
    seed: int = 0,
) -> HeadLog:
    """Train the generator on warm items treated as new (Adam on :func:`metaemb_loss`).

    Negatives for each item are ``n_neg`` random events of the same set (another item's event,
    except for a negligible chance), weighted by ``neg_weight``; ``n_neg=0`` uses positives only.

    Args:
        item_features: [n_warm, D] text features of the warm items (row j = item j of ``events``).
        events: the warm items' events (:func:`item_events` with the warm items as targets).
        n_items: warm items per step (only items with an event are drawn); per_item: K events per batch.
    """
    steps = _pos_int("steps", steps)
    rng = np.random.default_rng(seed)
    have = np.unique(events.item.cpu().numpy())
    opt = torch.optim.Adam(generator.parameters(), lr=_pos_float("lr", lr))
    by_item = {int(j): np.flatnonzero(events.item.cpu().numpy() == j) for j in have}
    log = HeadLog()
    t0 = time.perf_counter()
    for _ in range(steps):
        items = rng.choice(have, size=min(n_items, len(have)), replace=False)
        ia = np.stack([rng.choice(by_item[int(j)], size=per_item) for j in items])
        ib = np.stack([rng.choice(by_item[int(j)], size=per_item) for j in items])
        ha, za, ma = _gather_events(events, torch.from_numpy(ia))
        hb, zb, mb = _gather_events(events, torch.from_numpy(ib))
        neg_a = _negatives(events, len(items), n_neg, rng) if n_neg else None
        neg_b = _negatives(events, len(items), n_neg, rng) if n_neg else None
        loss, _, _ = metaemb_loss(generator, item_features[torch.from_numpy(items).to(item_features.device)],
                                  ha, za, ma, hb, zb, mb, warm_lr=warm_lr, alpha=alpha, neg_a=neg_a, neg_b=neg_b,
                                  neg_weight=neg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.losses.append(float(loss.detach()))
    log.seconds = time.perf_counter() - t0
    return log


def warm_up_embeddings(
    emb: Tensor,
    events: ItemEvents,
    event_idx: Tensor,
    *,
    steps: int,
    lr: float,
    negatives: ItemEvents | None = None,
    n_neg: int = 16,
    neg_weight: float = 1.0,
    seed: int = 0,
) -> Tensor:
    """Small warm-up updates of new items' embeddings: ``steps`` SGD steps on each item's first events.

    Args:
        emb: [n_new, n_embd] initial embeddings (generated, random or mean).
        events: events whose ``item`` indexes rows of ``emb``.
        event_idx: [n_new, K] event indices per item (-1 = none), e.g. ``events.of_items(n, K, first=True)``.
        negatives: events of other items (e.g. the warm items' events); ``n_neg`` of them, drawn once
            per item with ``seed``, enter every step with weight ``neg_weight`` (see :func:`metaemb_loss`).

    Returns:
        [n_new, n_embd] updated embeddings (an item without any event moves only through its negatives).
    """
    steps = _pos_int("steps", steps, low=0)
    lr = _pos_float("lr", lr)
    h, z, m = _gather_events(events, event_idx)
    neg = _negatives(negatives, emb.shape[0], _pos_int("n_neg", n_neg), np.random.default_rng(seed)) if negatives is not None else None
    e = emb.detach().clone()
    for _ in range(steps):
        e.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(_event_ce(e, h, z, m, neg, neg_weight).sum(), e)
        e = (e - lr * g).detach()
    return e


def new_item_metrics(events: ItemEvents, new_emb: Tensor, k: int = 10, warm_table: Tensor | None = None) -> pd.DataFrame:
    """Rank each event's (new) target item among the new items (and, with ``warm_table``, among
    warm + new items): HR@k and nDCG@k per event.

    Returns:
        DataFrame with ``user``, ``item``, ``hr@k_new``, ``ndcg@k_new`` (and ``hr@k_all``, ``ndcg@k_all``).
    """
    k = _pos_int("k", k)
    s = events.hidden @ new_emb.T  # [E, n_new]
    rel = torch.zeros_like(s, dtype=torch.bool)
    rel[torch.arange(len(events)), events.item] = True
    new = _metrics.topk_metrics(s, rel, k=k)
    out = {"user": events.user, "item": events.item.cpu().numpy(), f"hr@{k}_new": new["hr"], f"ndcg@{k}_new": new["ndcg"]}
    if warm_table is not None:
        sw = events.hidden @ warm_table.T
        allm = _metrics.topk_metrics(torch.cat([sw, s], 1), torch.cat([torch.zeros_like(sw, dtype=torch.bool), rel], 1), k=k)
        out[f"hr@{k}_all"], out[f"ndcg@{k}_all"] = allm["hr"], allm["ndcg"]
    return pd.DataFrame(out)


# ==============================================================================================
# K-fold over users: every user a test user once (more users -> narrower paired intervals)
# ==============================================================================================

Scorer = Callable[[LikeTasks], Tensor]
"""A fitted method: tasks -> [T, Q] query scores."""


def kfold_like_auc(
    ratings: pd.DataFrame,
    features: Any,
    item_ids: Any,
    fit: Callable[[list[tuple[np.ndarray, np.ndarray]], Tensor], dict[str, Scorer]],
    *,
    ks: Sequence[int] = (16,),
    n_folds: int = 5,
    n_episodes: int = 3,
    exclude_users: Any = None,
    min_query: int = 10,
    seed: int = 0,
    device: Any = None,
) -> pd.DataFrame:
    """K-fold evaluation over users of like/dislike heads: the same folds and episodes for every method.

    The users in ``ratings`` (minus ``exclude_users``, e.g. the validation users, who are neither
    trained on nor tested) are split into ``n_folds`` folds (:func:`user_folds`). For each fold,
    ``fit(pools, features)`` trains every method on the *other* folds' ratings
    (:func:`rating_pools`) and returns ``{name: scorer}``; then each test user with at least
    ``k + min_query`` ratings gets ``n_episodes`` episodes (support: k random ratings, query: all
    the others; :func:`mrec_utils.tasks.make_episodes` with seeds ``seed .. seed + n_episodes - 1``)
    and their query AUC and nDCG@10 are averaged over the episodes.

    Args:
        ratings: ratings of the items to use (``user_id``, ``item_id``, ``rating``, ``timestamp``).
        features: [n_items, D] item features; item_ids: [n_items] their item ids.
        fit: trains the methods of one fold (called ``n_folds`` times).

    Returns:
        DataFrame, one row per (method, k, user): ``method``, ``k``, ``fold``, ``user_id``, ``auc``
        (NaN when every episode's query has one class), ``ndcg@10``.
    """
    import warnings

    from . import tasks as _tasks

    if not isinstance(ratings, pd.DataFrame) or not {"user_id", "item_id", "rating"} <= set(ratings.columns):
        raise TypeError("ratings must be a DataFrame with user_id, item_id, rating (and timestamp).")
    if not callable(fit):
        raise TypeError("fit must be a callable (pools, features) -> {name: scorer}.")
    feats = _as_matrix(features, "features").astype(np.float64)
    ids = np.asarray(item_ids, dtype=np.int64)
    if len(ids) != len(feats):
        raise ValueError(f"item_ids has {len(ids)} entries but features has {len(feats)} rows.")
    ks = tuple(_pos_int("k", k) for k in ks)
    if not ks:
        raise ValueError("ks is empty.")
    n_episodes = _pos_int("n_episodes", n_episodes)
    min_query = _pos_int("min_query", min_query)
    dev = torch.device("cpu") if device is None else torch.device(device)
    ratings = ratings[ratings.item_id.isin(ids)]
    excluded = np.asarray([] if exclude_users is None else exclude_users, dtype=np.int64)
    folds = user_folds(np.setdiff1d(ratings.user_id.unique(), excluded), n_folds, seed=seed)
    feat_t = torch.as_tensor(feats, dtype=torch.get_default_dtype(), device=dev)
    rows = []
    for f, test_users in enumerate(folds):
        pools = rating_pools(ratings[~ratings.user_id.isin(np.concatenate([test_users, excluded]))], ids)
        scorers = fit(pools, feat_t)
        if not isinstance(scorers, dict) or not scorers or not all(callable(v) for v in scorers.values()):
            raise TypeError("fit must return a non-empty dict {name: scorer(tasks) -> scores}.")
        for k in ks:
            eps = [_tasks.make_episodes(ratings, test_users, k_support=k, n_query=None, seed=seed + e, on_short="skip",
                                        min_ratings=k + min_query) for e in range(n_episodes)]
            if not eps[0]:
                continue
            lts = [like_tasks(ep, feats, ids, device=dev) for ep in eps]
            for name, scorer in scorers.items():
                per = [evaluate_like(scorer(t), t) for t in lts]
                with warnings.catch_warnings():  # a user who likes (or dislikes) every query film has no AUC
                    warnings.simplefilter("ignore", RuntimeWarning)
                    auc = np.nanmean(np.stack([p.auc.to_numpy(dtype=float) for p in per]), axis=0)
                nd = np.mean(np.stack([p["ndcg@10"].to_numpy(dtype=float) for p in per]), axis=0)
                rows.append(pd.DataFrame({"method": name, "k": k, "fold": f, "user_id": lts[0].users, "auc": auc, "ndcg@10": nd}))
    if not rows:
        raise ValueError(f"no test user has k + {min_query} ratings for any k in {ks}.")
    return pd.concat(rows, ignore_index=True)


def paired_summary(per_user: pd.DataFrame, reference: str, metric: str = "auc", seed: int = 0) -> pd.DataFrame:
    """Mean ``metric`` per (method, k) and the paired bootstrap difference to ``reference`` on the same users.

    Args:
        per_user: rows ``method``, ``k``, ``user_id``, ``metric`` (e.g. :func:`kfold_like_auc`).
        reference: the method every other is compared with (e.g. the global head).

    Returns:
        DataFrame indexed by (method, k) with ``users`` (both values defined; for the reference row:
        its own defined values), ``metric`` (mean over those users), and for
        the other methods ``<metric> - reference``, ``95% low``, ``95% high``, ``beats reference``,
        ``worse than reference`` (the interval above / below zero).
    """
    need = {"method", "k", "user_id", metric}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise TypeError(f"per_user must be a DataFrame with columns {sorted(need)}.")
    if reference not in set(per_user.method):
        raise ValueError(f"reference {reference!r} is not a method of per_user ({sorted(set(per_user.method))}).")
    wide = per_user.pivot_table(index=["k", "user_id"], columns="method", values=metric, dropna=False)
    methods = [reference, *[m for m in dict.fromkeys(per_user.method) if m != reference]]
    rows = []
    for k, g in wide.groupby(level="k", sort=True):
        ref = g[reference].to_numpy(dtype=float)
        for m in methods:
            a = g[m].to_numpy(dtype=float)
            ok = ~np.isnan(a) & ~np.isnan(ref)
            row: dict[str, Any] = {"method": m, "k": k, "users": int(ok.sum()), metric: float(a[ok].mean()) if ok.any() else np.nan}
            if m != reference and ok.sum() >= 2:
                d = _metrics.paired_bootstrap_ci(a[ok], ref[ok], seed=seed)
                row.update({f"{metric} - {reference}": d.estimate, "95% low": d.low, "95% high": d.high,
                            f"beats {reference}": bool(d.low > 0), f"worse than {reference}": bool(d.high < 0)})
            rows.append(row)
    return pd.DataFrame(rows).set_index(["method", "k"])


# ==============================================================================================
# Runner: part 1 as one function (``python -m mrec_utils.benchmark gpt-meta``)
# ==============================================================================================

HEAD_METHODS: tuple[str, ...] = ("global", "logreg", "finetune", "maml", "fomaml", "anil", "reptile", "proto", "residual")
"""Method names of :func:`head_benchmark`, in the order of chapter 8's tables."""


@dataclass(frozen=True)
class HeadSettings:
    """Chapter 8's settings for the user heads, in one place (:func:`fit_heads`, :func:`head_benchmark`
    and chapter 10's ranking benchmark use them).

    ``d_proj`` (the heads' projection width), training steps of the global head, the MAML-family
    heads and the prototypical head, their inner loop (``inner_steps``, ``inner_lr``) and ``outer_lr``;
    the Meta-SGD residual head (``residual_*``); and the grids from which validation users choose the
    logistic-regression penalty (``logreg_l2s``) and the fine-tuning (steps, lr) (``finetune_grid``).
    """

    d_proj: int = 32
    global_steps: int = 300
    meta_steps: int = 200
    proto_steps: int = 300
    inner_steps: int = 3
    inner_lr: float = 0.1
    outer_lr: float = 1e-3
    residual_steps: int = 300
    residual_init_lr: float = 0.01
    residual_outer_lr: float = 3e-3
    residual_outer_loss: str = "pairwise"
    residual_eval_every: int = 100
    logreg_l2s: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    finetune_grid: tuple[tuple[int, float], ...] = ((3, 0.1), (10, 0.1), (3, 0.3))


@dataclass
class FittedHeads:
    """Output of :func:`fit_heads`.

    Attributes:
        scorers: ``{method: scorer}``; ``scorer(tasks) -> [T, Q]`` query scores after adaptation.
        seconds: training seconds per method (the global head's own time under ``"global"``; the
            meta-learners start from it, so their total cost adds it); validation choices are timed
            apart as ``"<method> (choice)"``.
        heads: the trained modules by method (logistic regression has none).
        choices: what validation chose: ``logreg_l2``, ``finetune`` (steps, lr), ``residual_learn_init``,
            and ``residual_lrs`` (the residual head's learned step sizes).
    """

    scorers: dict[str, Callable[["LikeTasks"], Tensor]]
    seconds: dict[str, float]
    heads: dict[str, nn.Module]
    choices: dict[str, Any]


def fit_heads(
    pools: Sequence[tuple[np.ndarray, np.ndarray]],
    features: Tensor,
    val: Sequence["LikeTasks"],
    methods: Sequence[str] = HEAD_METHODS,
    settings: HeadSettings = HeadSettings(),
    *,
    choices: dict[str, Any] | None = None,
    seed: int = 0,
) -> FittedHeads:
    """Train chapter 8's user heads on training ratings and return one scorer per method.

    The global head is trained first; fine-tuning, MAML, FOMAML, ANIL, Reptile and the residual
    head start from it. Validation tasks choose, unless ``choices`` fixes them: the logistic-regression
    penalty and the fine-tuning (steps, lr) on ``val[0]``'s mean query AUC, and whether the residual
    head's start is meta-learned (both candidates are trained with early stopping on all of ``val``;
    the better one is kept, not retrained).

    Args:
        pools: per training user ``(catalogue rows, ratings)`` (:func:`rating_pools`).
        features: [n_items, D] item features on the heads' device.
        val: validation :class:`LikeTasks` (one or more draws); never trained on.
        methods: a subset of :data:`HEAD_METHODS` (``"global"`` is always trained).
        choices: ``{"logreg_l2", "finetune", "residual_learn_init"}`` to reuse earlier choices (e.g.
            in every fold of :func:`kfold_like_auc`).
    """
    unknown = [m for m in methods if m not in HEAD_METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(HEAD_METHODS)}.")
    val = list(val)
    if not val or not all(isinstance(t, LikeTasks) for t in val):
        raise TypeError("val must be a non-empty list of LikeTasks (validation users).")
    cfg = settings
    dev = features.device
    chosen = dict(choices or {})
    val_auc = lambda scores: float(np.nanmean(evaluate_like(scores, val[0]).auc))  # noqa: E731
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    glob = UserHead(features.shape[1], d_proj=cfg.d_proj, seed=seed).to(dev)
    train_global_head(glob, pools, features, steps=cfg.global_steps, seed=seed)
    seconds["global"] = time.perf_counter() - t0
    heads: dict[str, nn.Module] = {"global": glob}
    scorers: dict[str, Callable[[LikeTasks], Tensor]] = {"global": lambda t: adapt_and_score(glob, t, steps=0)}
    if "logreg" in methods:
        t0 = time.perf_counter()
        if "logreg_l2" not in chosen:
            chosen["logreg_l2"] = pick_best(cfg.logreg_l2s, lambda v: val_auc(logreg_scratch(val[0], l2=v)))
        seconds["logreg (choice)"] = time.perf_counter() - t0
        scorers["logreg"] = lambda t, l2=chosen["logreg_l2"]: logreg_scratch(t, l2=l2)
    if "finetune" in methods:
        t0 = time.perf_counter()
        if "finetune" not in chosen:
            chosen["finetune"] = pick_best(cfg.finetune_grid, lambda s: val_auc(adapt_and_score(glob, val[0], steps=s[0], inner_lr=s[1])))
        seconds["finetune (choice)"] = time.perf_counter() - t0
        steps, lr = chosen["finetune"]
        scorers["finetune"] = lambda t: adapt_and_score(glob, t, steps=steps, inner_lr=lr)
    for m in ("maml", "fomaml", "anil", "reptile"):
        if m in methods:
            t0 = time.perf_counter()
            h = copy.deepcopy(glob)
            meta_train_head(h, pools, features, m, meta_steps=cfg.meta_steps, inner_steps=cfg.inner_steps,
                            inner_lr=cfg.inner_lr, outer_lr=cfg.outer_lr, seed=seed)
            seconds[m], heads[m] = time.perf_counter() - t0, h
            scorers[m] = (lambda h_, a_: lambda t: adapt_and_score(h_, t, adapt=a_, steps=cfg.inner_steps, inner_lr=cfg.inner_lr))(
                h, ["head"] if m == "anil" else "all")
    if "residual" in methods:
        kw = dict(meta_steps=cfg.residual_steps, inner_steps=cfg.inner_steps, init_lr=cfg.residual_init_lr,
                  outer_lr=cfg.residual_outer_lr, outer_loss=cfg.residual_outer_loss, eval_every=cfg.residual_eval_every,
                  val_tasks=val, seed=seed)
        t0 = time.perf_counter()
        starts = [chosen["residual_learn_init"]] if "residual_learn_init" in chosen else [True, False]
        cands = {}
        for learn_init in starts:
            rh = ResidualUserHead(glob)
            rlog, rlrs = meta_train_residual(rh, pools, features, learn_init=learn_init, **kw)
            cands[learn_init] = (max(a for _, a in rlog.checkpoints), rh, rlrs, rlog.best_step)
        chosen["residual_learn_init"] = pick_best(cands, lambda v: cands[v][0])
        _, rh, rlrs, best_step = cands[chosen["residual_learn_init"]]
        seconds["residual"], heads["residual"] = time.perf_counter() - t0, rh
        chosen["residual_lrs"], chosen["residual_best_step"] = rlrs, best_step
        scorers["residual"] = lambda t: adapt_and_score(rh, t, adapt=list(ResidualUserHead.ADAPT), steps=cfg.inner_steps, lrs=rlrs)
    if "proto" in methods:
        t0 = time.perf_counter()
        proto = UserHead(features.shape[1], d_proj=cfg.d_proj, seed=seed).to(dev)
        train_protonet(proto, pools, features, steps=cfg.proto_steps, seed=seed)
        seconds["proto"], heads["proto"] = time.perf_counter() - t0, proto
        scorers["proto"] = lambda t: protonet_scores(proto, t)
    return FittedHeads(scorers, seconds, heads, chosen)


def head_benchmark(
    ratings: pd.DataFrame,
    features: Any,
    item_ids: Any,
    *,
    ks: Sequence[int] = (4, 8, 16, 32),
    methods: Sequence[str] = HEAD_METHODS,
    new_frac: float = 0.2,
    min_item_count: int = 25,
    meta_steps: int = 200,
    n_folds: int = 0,
    seed: int = 0,
    device: Any = None,
) -> pd.DataFrame:
    """Chapter 8, part 1 in one call: user heads on LM item features for new users (and new films).

    The user-cold split of :func:`mrec_utils.tasks.make_split` (``seed``); the catalogue is the items
    with at least ``min_item_count`` training ratings that have a feature row; a ``new_frac`` share of it
    (seeded) is held out as new films (used only as query items of the ``"new films"`` setting, support
    = 16 warm ratings). Settings and choices are those of the chapter (validation users pick the
    logistic-regression penalty and the fine-tuning steps, and for ``"residual"`` (:class:`ResidualUserHead`,
    Meta-SGD with the pairwise meta-objective) whether its start is meta-learned and when to stop, on
    three episodes per validation user; meta-learners start from the global head).

    With ``n_folds >= 2`` the methods are also evaluated as in the chapter's K-fold section
    (:func:`kfold_like_auc`: every non-validation user with enough ratings of warm films is a test
    user once, 3 episodes each, every method retrained per fold with the choices above; the
    residual head still stops by the validation AUC); those rows have ``evaluation`` =
    ``"<n>-fold"``, the split's rows ``"split"``.

    Args:
        ratings: MovieLens ratings (``load_movielens().ratings``).
        features: [n, D] item features (e.g. :func:`lm_item_features` of LM embeddings).
        item_ids: [n] the item id of each feature row.

    Returns:
        DataFrame, one row per (method, setting): ``method``, ``k`` (an int, or ``"new films"``),
        ``users``, ``auc``, ``auc_low``, ``auc_high``, ``ndcg@10``, ``auc_minus_global`` with its paired
        interval ``diff_low``/``diff_high``, ``ms_per_user`` (adaptation + scoring), ``fit_seconds`` and
        ``evaluation``. K-fold rows have no timing (NaN) and their ``auc_low``/``auc_high`` are a
        bootstrap over their users.
    """
    from . import tasks as _tasks

    unknown = [m for m in methods if m not in HEAD_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(HEAD_METHODS)}.")
    feats = _as_matrix(features, "features").astype(np.float64)
    ids = np.asarray(item_ids, dtype=np.int64)
    if len(ids) != len(feats):
        raise ValueError(f"item_ids has {len(ids)} entries but features has {len(feats)} rows.")
    ks = tuple(_pos_int("k", k) for k in ks)
    n_folds = _pos_int("n_folds", n_folds, low=0)
    if n_folds == 1:
        raise ValueError("n_folds must be 0 (no K-fold evaluation) or >= 2.")
    if not 0 <= float(new_frac) < 1:
        raise ValueError(f"new_frac must be in [0, 1), got {new_frac!r}.")
    dev = torch.device("cpu") if device is None else torch.device(device)
    split = _tasks.make_split(ratings, "user-cold", seed=seed)
    counts = split.train.item_id.value_counts()
    catalogue = np.intersect1d(counts.index[counts.to_numpy() >= min_item_count].to_numpy(), ids)
    if len(catalogue) < 10:
        raise ValueError("fewer than 10 catalogue items have features; embed more items or lower min_item_count.")
    rng = np.random.default_rng(seed)
    is_new = np.zeros(len(catalogue), dtype=bool)
    is_new[rng.choice(len(catalogue), size=int(len(catalogue) * new_frac), replace=False)] = True
    warm_ids, new_ids = catalogue[~is_new], catalogue[is_new]
    pos = pd.Index(ids).get_indexer(catalogue)
    cat_feats = feats[pos]
    feat_t = torch.as_tensor(cat_feats, dtype=torch.get_default_dtype(), device=dev)
    pools = rating_pools(split.train[split.train.item_id.isin(warm_ids)], catalogue)

    def episodes_of(frame: pd.DataFrame, users: np.ndarray, k: int, query_pool: Any = None, ep_seed: int = seed) -> list:
        frame = frame[frame.item_id.isin(catalogue if query_pool is not None else warm_ids)]
        users = np.intersect1d(users, frame.user_id.unique())
        return _tasks.make_episodes(frame, users, k_support=k, n_query=None, seed=ep_seed, on_short="skip",
                                    min_ratings=None if query_pool is not None else k + 10, query_pool=query_pool)

    settings: dict[Any, LikeTasks] = {k: like_tasks(episodes_of(split.test, split.test_users, k), cat_feats, catalogue, device=dev) for k in ks}
    if len(new_ids):
        settings["new films"] = like_tasks(episodes_of(split.test, split.test_users, 16, new_ids), cat_feats, catalogue, device=dev)
    val = like_tasks(episodes_of(split.val, split.val_users, 16), cat_feats, catalogue, device=dev)
    val_auc = lambda s: float(np.nanmean(evaluate_like(s, val).auc))  # noqa: E731

    val_multi = [val] + [like_tasks(episodes_of(split.val, split.val_users, 16, ep_seed=seed + e), cat_feats, catalogue, device=dev)
                         for e in (1, 2)]
    cfg = HeadSettings(meta_steps=meta_steps)
    fitted = fit_heads(pools, feat_t, val_multi, methods, cfg, seed=seed)
    fns = {m: fitted.scorers[m] for m in ["global", *[m for m in methods if m != "global"]]}
    fit = {m: fitted.seconds[m] for m in fns if m in fitted.seconds}
    l2, (ft_steps, ft_lr) = fitted.choices.get("logreg_l2"), fitted.choices.get("finetune", (None, None))
    meta_kw = dict(meta_steps=cfg.meta_steps, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr, outer_lr=cfg.outer_lr, seed=seed)
    res_attrs = ({"learn_init": fitted.choices["residual_learn_init"], "best_step": fitted.choices["residual_best_step"]}
                 if "residual" in methods else {})
    fold_choices = {k: v for k, v in fitted.choices.items() if k in ("logreg_l2", "finetune", "residual_learn_init")}

    def build(pools_: list, feats_: Tensor) -> dict[str, Callable[[LikeTasks], Tensor]]:
        """One fold: retrain the requested methods on ``pools_`` with the choices made above."""
        return fit_heads(pools_, feats_, val_multi, methods, cfg, choices=fold_choices, seed=seed).scorers

    per: dict[tuple[str, Any], pd.DataFrame] = {}
    secs: dict[tuple[str, Any], float] = {}
    for name in ["global", *[m for m in methods if m != "global"]]:
        for key, t in settings.items():
            t0 = time.perf_counter()
            scores = fns[name](t)
            secs[(name, key)] = (time.perf_counter() - t0) / len(t)
            per[(name, key)] = evaluate_like(scores, t)
    rows = []
    for name in methods:
        for key in settings:
            df = per[(name, key)]
            a = df.auc.to_numpy()
            ok = ~np.isnan(a)
            ci = _metrics.bootstrap_ci(a[ok], seed=seed)
            row = {"method": name, "k": key, "users": int(len(df)), "auc": ci.estimate, "auc_low": ci.low, "auc_high": ci.high,
                   "ndcg@10": float(df["ndcg@10"].mean()), "ms_per_user": 1000 * secs[(name, key)], "fit_seconds": fit.get(name, 0.0)}
            g = per[("global", key)].auc.to_numpy()
            both = ok & ~np.isnan(g)
            if name != "global":
                d = _metrics.paired_bootstrap_ci(a[both], g[both], seed=seed)
                row.update(auc_minus_global=d.estimate, diff_low=d.low, diff_high=d.high)
            else:
                row.update(auc_minus_global=0.0, diff_low=0.0, diff_high=0.0)
            rows.append(row)
    out = pd.DataFrame(rows).assign(evaluation="split")
    if n_folds:
        warm_ratings = ratings[ratings.item_id.isin(warm_ids)]
        kf = kfold_like_auc(warm_ratings, cat_feats, catalogue, build, ks=ks, n_folds=n_folds,
                            n_episodes=3, exclude_users=split.val_users, seed=seed, device=dev)
        summ = paired_summary(kf, reference="global", seed=seed)
        kf_rows = []
        for (name, k), r in summ.iterrows():
            a = kf[(kf.method == name) & (kf.k == k)].auc.dropna().to_numpy()
            ci = _metrics.bootstrap_ci(a, seed=seed)
            kf_rows.append({"method": name, "k": k, "users": int(r["users"]), "auc": r["auc"], "auc_low": ci.low, "auc_high": ci.high,
                            "ndcg@10": float(kf[(kf.method == name) & (kf.k == k)]["ndcg@10"].mean()), "ms_per_user": np.nan,
                            "fit_seconds": np.nan, "auc_minus_global": 0.0 if name == "global" else r["auc - global"],
                            "diff_low": 0.0 if name == "global" else r["95% low"], "diff_high": 0.0 if name == "global" else r["95% high"],
                            "evaluation": f"{n_folds}-fold"})
        out = pd.concat([out, pd.DataFrame(kf_rows)], ignore_index=True)
    out.attrs = {"split": repr(split), "catalogue": int(len(catalogue)), "new_items": int(len(new_ids)),
                 "logreg_l2": l2, "finetune": [ft_steps, ft_lr], "meta": meta_kw, "residual": res_attrs, "n_folds": n_folds}
    return out
