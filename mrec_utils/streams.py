"""Rating streams (chapter 6): replay each user's ratings in time order and predict every rating from the
ones before it (``pred[:, t]`` from ``y[:, :t]``), adapting chapter 5's meta-learned network online with a
strategy: :class:`Static` (never adapt), :class:`Readapt` (after each rating, K SGD steps from theta on the
ratings seen, weighted: all alike, the last w, or by gamma^age) or :class:`Continual` (online SGD on the
newest rating). With one inner step, re-adapting from theta is ``theta - lr * sum_j omega_tj g_j`` with
every g_j taken at theta, so :func:`replay_streams` computes each gradient once and every position at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.func import functional_call, vmap

from mrec_utils import meta, metrics, tasks, train
from mrec_utils.coldstart import adapt_batch, predict_batch
from mrec_utils.models import Features


@dataclass(frozen=True)
class Static:
    name = "static"


@dataclass(frozen=True)
class Readapt:
    """``steps`` SGD steps of rate ``lr`` from theta on the ratings seen: all (``reset``), the last
    ``window``, or weighted by ``gamma^age`` (``recency``; age by ``decay="position"`` or in ``"days"``)."""

    lr: float
    steps: int = 1
    window: int | None = None
    gamma: float = 1.0
    decay: str = "position"

    @property
    def name(self) -> str:
        return "+".join((["window"] if self.window else []) + (["recency"] if self.gamma < 1 else [])) or "reset"


@dataclass(frozen=True)
class Continual:
    lr: float
    steps: int = 1
    name = "continual"


Strategy = Static | Readapt | Continual

STREAM_STRATEGIES: dict[str, str] = {
    "static": "the meta-learned initialisation, never adapted",
    "reset": "after each rating, re-adapt from the meta-learned init on every rating seen so far",
    "window": "after each rating, re-adapt from the meta-learned init on the last w ratings only",
    "recency": "after each rating, re-adapt from the meta-learned init with inner-loss weights ∝ gamma^age",
    "continual": "keep fine-tuning: one SGD step on each new rating from the previous adapted state",
}
"""The strategies of chapter 6 and what each does."""


# ============================================================================ streams
@dataclass
class RatingStreams:
    """Users' ratings in time order, right-padded: ``item_ids [U, L]`` (-1 in padding), model input ``x [U, L,
    C]``, ``y``, ``mask`` (a prefix of Trues per row), ``days`` since the user's first rating."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    x: Tensor
    y: Tensor
    mask: Tensor
    days: Tensor

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        return self.mask.sum(1).cpu().numpy().astype(np.int64)

    def subset(self, idx: np.ndarray | list[int]) -> RatingStreams:
        idx = np.asarray(idx, dtype=np.int64).ravel()
        t = torch.as_tensor(idx, device=self.x.device)
        return RatingStreams(self.user_ids[idx], self.item_ids[idx], self.x[t], self.y[t], self.mask[t], self.days[t])

    def shuffled(self, seed: int = 0) -> RatingStreams:
        """Each user's ratings in a seeded random order (a control without drift); ``days`` keep their slots."""
        rng = np.random.default_rng(seed)
        perm = np.tile(np.arange(self.y.shape[1]), (len(self), 1))
        for u, n in enumerate(self.lengths):
            perm[u, :n] = rng.permutation(n)
        p = torch.as_tensor(perm, device=self.x.device)
        x = torch.gather(self.x, 1, p[..., None].expand_as(self.x))
        return RatingStreams(self.user_ids.copy(), np.take_along_axis(self.item_ids, perm, 1), x,
                             torch.gather(self.y, 1, p), self.mask.clone(), self.days.clone())


def make_streams(features: Features, ratings: pd.DataFrame, users: np.ndarray | None = None, *,
                 max_len: int | None = None, min_len: int = 2, seed: int = 0,
                 device: torch.device | None = None) -> RatingStreams:
    """Each user's first ``max_len`` ratings in time order, encoded; ``users`` in this order (default: all).
    Same-second ratings are ordered by a seeded random key, not by item id (ids follow the order films
    entered the catalogue); the row order of ``ratings`` does not matter."""
    df, t = tasks._prepare(ratings)  # checked, sorted by (user, time, item)
    order = np.lexsort((np.random.default_rng(seed).random(len(df)), t, df["user_id"].to_numpy()))
    df, t = df.iloc[order].reset_index(drop=True), t[order]
    u = df["user_id"].to_numpy(np.int64)
    want = np.unique(u) if users is None else np.asarray(users, dtype=np.int64).ravel()
    if (missing := np.setdiff1d(want, u)).size:
        raise ValueError(f"users without any rating: {missing[:10].tolist()}.")
    starts, n = np.searchsorted(u, want, side="left"), np.searchsorted(u, want, side="right") - np.searchsorted(u, want)
    if (n < min_len).any():
        raise ValueError(f"users {want[n < min_len][:10].tolist()} have fewer than min_len={min_len} ratings; "
                         "drop them or lower min_len.")
    n = n if max_len is None else np.minimum(n, max_len)
    rows = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, n)])
    who, slot = np.repeat(np.arange(len(want)), n), np.concatenate([np.arange(k) for k in n])
    shape = (len(want), int(n.max()))

    def padded(values: np.ndarray, fill: float, dtype: type) -> np.ndarray:
        out = np.full(shape + values.shape[1:], fill, dtype=dtype)
        out[who, slot] = values
        return out

    items = df["item_id"].to_numpy(np.int64)[rows]
    x = padded(features.encode(u[rows], items), 0, np.int64)
    y, days = padded(df["rating"].to_numpy(np.float64)[rows], 0, np.float64), padded((t[rows] - t[starts][who]) / 86400.0, 0, np.float64)
    dev = device or torch.device("cpu")
    return RatingStreams(want.copy(), padded(items, -1, np.int64), torch.as_tensor(x, device=dev),
                         torch.as_tensor(y, dtype=torch.get_default_dtype(), device=dev),
                         torch.as_tensor(padded(np.ones(len(rows), bool), False, bool), device=dev), torch.as_tensor(days, device=dev))


# ============================================================================ recency weights
def recency_weights(ages: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Weights ``n gamma^a_j / sum_l gamma^a_l`` of the n real ratings of each row (``ages``, ``mask [..., S]``),
    so that the masked *mean* of ``w_j e_j`` is the weighted mean with weights summing to 1; 0 in padding."""
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=ages.device)
    a = torch.where(m, ages.double(), zero)
    # gamma^(a - min a) avoids underflow for long histories; the normalisation cancels the shift
    a_min = torch.where(m, a, torch.full((), float("inf"), dtype=torch.float64, device=a.device)).amin(-1, keepdim=True)
    a_min = torch.where(m.any(-1, keepdim=True), a_min, torch.zeros_like(a_min))
    raw = torch.where(m, float(gamma) ** (a - a_min), zero)
    w = m.sum(-1, keepdim=True).to(torch.float64) * raw / raw.sum(-1, keepdim=True).clamp_min(1e-300)
    return w.to(torch.get_default_dtype())


def weighted_mse_per_example(pred: Tensor, target: Tensor) -> Tensor:
    """``w (pred - r)^2`` per example, ``target [..., 2] = (r, w)``."""
    return target[..., 1] * (pred - target[..., 0]).pow(2)


def adapt_weighted(model: torch.nn.Module, params: meta.Params, frozen: meta.Params, x_s: Tensor, y_s: Tensor,
                   mask_s: Tensor, weights: Tensor, *, steps: int, lr: float) -> meta.Params:
    """:func:`~mrec_utils.coldstart.adapt_batch` with weights ``[T, S]`` on the squared errors."""
    p, fz = {k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in frozen.items()}
    y = torch.stack([y_s, weights.to(y_s.dtype)], -1)

    def one(x, yy, m):
        return meta.inner_adapt(model, p, fz, x, yy, m, loss_fn=weighted_mse_per_example, steps=steps, inner_lr=lr)

    with torch.no_grad():
        return vmap(one)(x_s, y, mask_s)


# ============================================================================ replay
def _ages(streams: RatingStreams, idx: Tensor, t: int, decay: str) -> Tensor:
    if decay == "position":
        return (t - 1 - torch.arange(t, device=streams.y.device)).to(torch.float64).expand(len(idx), t)
    d = streams.days[idx.to(streams.days.device), :t].to(streams.y.device)
    return (d[:, -1:] - d).clamp_min(0)


def _seen(mask: Tensor, t: int, window: int | None) -> Tensor:
    seen = mask[:, :t]
    return seen if window is None else seen & (torch.arange(t, device=mask.device) >= t - window)


def _weight_matrix(streams: RatingStreams, idx: Tensor, s: Readapt) -> Tensor:
    """[u, L, L] weights omega[t, j] of rating j after t ratings (rows sum to 1; 0 for t = 0)."""
    mask = streams.mask[idx]
    u, L = mask.shape
    pos = torch.arange(L, device=mask.device)
    seen = (pos[None, :] < pos[:, None])[None] & mask[:, None, :]  # [u, t, j]: j < t and real
    if s.window is not None:
        seen = seen & (pos[None, :] >= pos[:, None] - s.window)[None]
    w = seen.double()
    if s.gamma < 1:
        if s.decay == "position":
            ages = (pos[:, None] - 1 - pos[None, :]).to(torch.float64).clamp_min(0)[None].expand(u, L, L)
        else:
            d = streams.days[idx].to(mask.device)
            newest = torch.cat([d[:, :1], d[:, :-1]], 1)  # time of rating t-1, the newest seen
            ages = (newest[:, :, None] - d[:, None, :]).clamp_min(0)
        w = recency_weights(ages, seen, s.gamma).double()
    return (w / seen.sum(-1, keepdim=True).clamp_min(1).double()).to(torch.get_default_dtype())


def _readapt_one_step(model: torch.nn.Module, p0: meta.Params, fz: meta.Params, streams: RatingStreams, s: Readapt,
                      chunk_floats: int = 1 << 24) -> Tensor:
    """:class:`Readapt` with one step, every position at once: ``theta - lr * omega @ g``, g at theta."""
    x, y = streams.x, streams.y
    U, L = y.shape
    per = max(1, chunk_floats // max(1, L * sum(v.numel() for v in p0.values())))

    def sq_err(p, xx, yy):
        return meta.mse_loss_per_example(functional_call(model, {**fz, **p}, (xx[None],)), yy[None])[0]

    out = torch.empty((U, L), dtype=y.dtype, device=y.device)
    for start in range(0, U, per):
        idx = torch.arange(start, min(U, start + per), device=y.device)
        u = len(idx)
        xs, ys = x[idx].reshape(u * L, -1), y[idx].reshape(u * L)
        with torch.no_grad():
            g = vmap(torch.func.grad(sq_err), in_dims=(None, 0, 0))(p0, xs, ys)  # {name: [u*L, ...]}
            omega = _weight_matrix(streams, idx, s)
            adapted = {k: (v.reshape(1, 1, -1) - s.lr * torch.bmm(omega, g[k].reshape(u, L, -1))).reshape(u * L, *v.shape)
                       for k, v in p0.items()}
            out[idx] = predict_batch(model, adapted, fz, xs[:, None, :])[:, 0].reshape(u, L)
    return out


def _replay_loop(model: torch.nn.Module, p0: meta.Params, fz: meta.Params, streams: RatingStreams,
                 s: Readapt | Continual, out: Tensor, progress: bool) -> Tensor:
    x, y, mask = streams.x, streams.y, streams.mask
    state = {k: v[None].expand(len(streams), *v.shape).clone() for k, v in p0.items()} if isinstance(s, Continual) else {}

    def step(p, xx, yy, mm):  # one user's continual update
        return meta.inner_adapt(model, p, fz, xx, yy, mm, loss_fn=meta.mse_loss_per_example, steps=s.steps, inner_lr=s.lr)

    for t in train.progress(range(1, y.shape[1]), desc=s.name, disable=not progress):
        idx = torch.nonzero(mask[:, t]).squeeze(1)  # streams with a rating t to predict
        if len(idx) == 0:
            continue
        if isinstance(s, Continual):  # one update on the newest rating t-1, from the user's previous state
            with torch.no_grad():
                new = vmap(step)({k: v[idx] for k, v in state.items()}, x[idx, t - 1:t], y[idx, t - 1:t], mask[idx, t - 1:t])
            for k in state:
                state[k][idx] = new[k]
        elif s.gamma < 1:
            seen = _seen(mask[idx], t, s.window)
            w = recency_weights(_ages(streams, idx, t, s.decay), seen, s.gamma)
            new = adapt_weighted(model, p0, fz, x[idx, :t], y[idx, :t], seen, w, steps=s.steps, lr=s.lr)
        else:
            new = adapt_batch(model, p0, fz, x[idx, :t], y[idx, :t], _seen(mask[idx], t, s.window), steps=s.steps, lr=s.lr)
        out[idx, t] = predict_batch(model, new, fz, x[idx, t:t + 1])[:, 0]
    return out


def replay_streams(model: torch.nn.Module, params: meta.Params, frozen: meta.Params, streams: RatingStreams,
                   strategy: Strategy, *, vectorize: bool = True, progress: bool = False) -> Tensor:
    """[U, L] predictions (NaN in padding, not clipped): ``pred[:, t]`` after the ratings ``0..t-1`` (t = 0: the
    model as is); ``params``: what adaptation changes (:func:`mrec_utils.meta.split_params`). ``vectorize``:
    one-step :class:`Readapt` at every position at once, else position by position (same numbers)."""
    p0, fz = {k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in frozen.items()}
    out = torch.full(streams.y.shape, float("nan"), dtype=streams.y.dtype, device=streams.y.device)
    init = predict_batch(model, {k: v[None].expand(len(streams), *v.shape) for k, v in p0.items()}, fz, streams.x)
    out[:, 0] = init[:, 0]
    if isinstance(s := strategy, Static):
        pred = init
    elif vectorize and isinstance(s, Readapt) and s.steps == 1:
        pred = _readapt_one_step(model, p0, fz, streams, s)
    else:
        pred = _replay_loop(model, p0, fz, streams, s, out, progress)
    return torch.where(streams.mask, pred, out)


# ============================================================================ errors and their summary
def stream_errors(pred: Tensor, streams: RatingStreams, rating_range: tuple[float, float] | None = None) -> np.ndarray:
    """[U, L] float64 absolute errors ``|clip(pred) - y|`` (NaN in padding)."""
    p = pred.double() if rating_range is None else pred.double().clamp(*rating_range)
    err = (p - streams.y.double()).abs()
    return torch.where(streams.mask, err, torch.full((), float("nan"), dtype=torch.float64, device=err.device)).cpu().numpy()


def _bin_means(errors: np.ndarray, sel: np.ndarray) -> np.ndarray:
    block = np.asarray(errors, dtype=np.float64)[:, sel]
    real = ~np.isnan(block)
    count = real.sum(1)
    return np.where(count > 0, np.where(real, block, 0.0).sum(1) / np.maximum(count, 1), np.nan)


def summarize_streams(errors: dict[str, np.ndarray], bins: list[tuple[int, int | None]], reference: str | None = None,
                      n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Per strategy and bin of positions ``(lo, hi)`` (inclusive; hi None: open): ``users``, the mean error with
    a bootstrap interval over users (each user's bin mean first) and, with ``reference``, the paired
    difference to it (``diff``, ``diff_low``, ``diff_high``; negative = lower error)."""
    L = next(iter(errors.values())).shape[1]
    pos, rows = np.arange(L), []
    for lo, hi in bins:
        per_user = {k: _bin_means(e, (pos >= lo) & (pos <= (L if hi is None else hi))) for k, e in errors.items()}
        label = f"{lo}+" if hi is None else (f"{lo}" if hi == lo else f"{lo}-{hi}")
        for k, v in per_user.items():
            ok = ~np.isnan(v)
            row = {"strategy": k, "bin": label, "lo": lo, "hi": hi, "users": int(ok.sum())}
            if ok.sum() >= 2:
                ci = metrics.bootstrap_ci(v[ok], n_boot=n_boot, seed=seed)
                row.update(mean=ci.estimate, low=ci.low, high=ci.high)
                if reference is not None and k != reference:
                    both = ok & ~np.isnan(per_user[reference])
                    d = metrics.paired_bootstrap_ci(v[both], per_user[reference][both], n_boot=n_boot, seed=seed)
                    row.update(diff=d.estimate, diff_low=d.low, diff_high=d.high)
            else:
                row.update(mean=float(v[ok].mean()) if ok.any() else np.nan, low=np.nan, high=np.nan)
            rows.append(row)
    return pd.DataFrame(rows)
