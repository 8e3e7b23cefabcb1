"""MAML, first-order MAML, ANIL, Meta-SGD and Reptile with :mod:`torch.func`; the one meta-training loop; prototypical
and matching heads.

Any ``nn.Module`` with a forward that is a pure function of parameters and inputs works. Parameters travel as
dictionaries ``{name: tensor}`` (:func:`split_params`): ``params`` are adapted in the inner loop, ``frozen`` are not
(but meta-learned if they require grad: ANIL's body). For a meta-batch of T padded tasks
(:class:`mrec_utils.tasks.TaskBatch`):

* inner loop (:func:`inner_adapt`): ``theta_i <- theta_i - alpha * grad L_support_i(theta_i)``, K times, with ``alpha``
  a number or one tensor per parameter (Meta-SGD, Li et al. 2017);
* MAML (Finn et al. 2017, :func:`maml_loss`): ``J(theta) = mean_i L_query_i(theta_i^(K))``, differentiated *through* the
  inner loop (Hessian-vector products); FOMAML (``first_order=True``) treats the inner gradients as constants; ANIL
  (Raghu et al. 2020) adapts only the head (``split_params(model, "head")``);
* Reptile (Nichol, Achiam & Schulman 2018, :func:`reptile_step`): ``phi <- phi + epsilon * mean_i(phi_i - phi)``,
  ``phi_i`` after K SGD steps on task i. Reptile is not an acronym.

Losses are masked means over the real examples; padded rows are zeroed before the model sees them, so their content
(even NaN) changes nothing. A task without examples has loss 0; one with an empty query set is left out of the mean.
:func:`meta_train` is the loop of every chapter that meta-trains, with a method object (:class:`MAML`, :class:`Reptile`,
or your own with an ``update`` method).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from mrec_utils import train
from mrec_utils.tasks import Inputs, TaskBatch

Params = dict[str, Tensor]
"""Parameters ``{name: tensor}`` with the names of ``model.named_parameters()``."""
LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(prediction [N, ...], target [N, ...]) -> per-example losses [N]``."""
Rate = Union[float, Mapping[str, Tensor]]
"""An inner learning rate: one number, or one tensor per adapted parameter (Meta-SGD)."""
AdaptSpec = Union[str, Sequence[str], Callable[[str], bool]]
"""Which parameters the inner loop adapts (:func:`split_params`)."""


# ============================================================================ the core
def _zero_padded(x: Inputs, mask: Tensor) -> Inputs:
    """``x [N, ...]`` (or a tuple of such tensors) with the rows where ``mask [N]`` is False replaced by zeros."""
    if isinstance(x, tuple):
        return tuple(_zero_padded(t, mask) for t in x)
    return torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim())), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _detach(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in params.items()}


def _task_loss(model: nn.Module, params: Params, frozen: Params, x: Inputs, y: Tensor, mask: Tensor, loss_fn: LossFn) -> Tensor:
    """Masked mean loss of one task, padding zeroed before the model sees it; works under vmap."""
    per = loss_fn(functional_forward(model, params, frozen, _zero_padded(x, mask)), _zero_padded(y, mask))
    if per.shape != mask.shape:
        raise ValueError(f"loss_fn must return one loss per example, shape {tuple(mask.shape)}, got "
                         f"{tuple(per.shape)}; use e.g. mse_loss_per_example (reduction='none').")
    return masked_mean(per, mask)


def _adapt(model, params, frozen, x, y, mask, loss_fn, steps: int, inner_lr: Rate, first_order: bool) -> Params:
    """The inner SGD loop on one task (works under ``vmap``)."""
    grad_fn = grad(lambda p, fz: _task_loss(model, p, fz, x, y, mask, loss_fn))  # d/d params only
    # first order: the inner gradients are constants for the outer loop (computed on detached copies)
    fz_inner = _detach(frozen) if first_order else frozen
    for _ in range(steps):
        g = grad_fn(_detach(params) if first_order else params, fz_inner)
        if isinstance(inner_lr, Mapping):  # Meta-SGD: theta - alpha ⊙ g
            params = {k: torch.addcmul(p, inner_lr[k], g[k], value=-1) for k, p in params.items()}
        else:
            params = {k: torch.add(p, g[k], alpha=-inner_lr) for k, p in params.items()}
    return dict(params)


def inner_adapt(model: nn.Module, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor] | None, x_s: Inputs,
                y_s: Tensor, mask_s: Tensor | None = None, *, loss_fn: LossFn, steps: int, inner_lr: Rate) -> Params:
    """Adapt ``params`` to one task: ``steps`` full-batch SGD steps ``theta <- theta - inner_lr * grad L_s``,
    ``L_s`` the masked mean of ``loss_fn`` over ``x_s [S, ...]`` (tensor or tuple), ``y_s [S, ...]``,
    ``mask_s [S]`` (None = all real); ``inner_lr`` may be Meta-SGD rates (a dict of tensors, ``⊙``).
    Differentiable w.r.t. ``params`` through the inner gradients (second order); works inside
    ``torch.func.vmap``; under ``torch.no_grad()`` no graph is kept (evaluation)."""
    m = torch.ones(y_s.shape[:1], dtype=torch.bool, device=y_s.device) if mask_s is None else mask_s.bool()
    return _adapt(model, dict(params), dict(frozen or {}), x_s, y_s, m, loss_fn, steps, inner_lr, False)


def _mean_over_tasks(values: Tensor, task_mask: Tensor) -> Tensor:
    """Mean over tasks ``[T, ...]`` of those with ``task_mask [T]`` set (0 if none)."""
    m = task_mask.reshape(task_mask.shape + (1,) * (values.dim() - 1)).to(values.dtype)
    return (values * m).sum(0) / task_mask.sum().clamp_min(1).to(values.dtype)


def _task(x: Inputs, i: int) -> Inputs:
    return tuple(t[i] for t in x) if isinstance(x, tuple) else x[i]


def maml_loss(model: nn.Module, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor] | None, batch: TaskBatch, *,
              loss_fn: LossFn, steps: int, inner_lr: Rate, first_order: bool = False, vectorize: bool = True) -> Tensor:
    """The MAML meta-objective of a padded meta-batch, vectorised over tasks with ``vmap``:
    ``J = mean_i L_query_i(inner_adapt(params, support_i))`` over tasks with a query (Finn et al. sum; the mean only
    rescales the outer learning rate). Differentiable w.r.t. ``params``, ``frozen`` (ANIL's body) and Meta-SGD rates;
    ``first_order=True``: FOMAML. ``vectorize=False``: the reference (tests and the speed benchmark), a plain Python
    loop over tasks instead of ``vmap``, with the same value and gradients."""
    params, frozen, b = dict(params), dict(frozen or {}), batch

    def one_task(xs, ys, ms, xq, yq, mq):
        adapted = _adapt(model, params, frozen, xs, ys, ms, loss_fn, steps, inner_lr, first_order)
        return _task_loss(model, adapted, frozen, xq, yq, mq, loss_fn)

    args = (b.x_support, b.y_support, b.mask_support, b.x_query, b.y_query, b.mask_query)
    if vectorize:
        losses = vmap(one_task, randomness="different")(*args)
    else:
        losses = torch.stack([one_task(*(_task(a, i) for a in args)) for i in range(len(b))])
    return _mean_over_tasks(losses, b.mask_query.any(-1))


def meta_gradient(model, params, frozen, batch: TaskBatch, *, wrt: Mapping[str, Tensor] | None = None,
                  **maml_kwargs) -> tuple[Tensor, Params]:
    """``(J, dJ/d wrt)`` for ``J = maml_loss(..., **maml_kwargs)`` (``vectorize=False``: its reference loop); ``wrt``
    defaults to ``params`` (add ``frozen`` or Meta-SGD rates for their gradients, zero where unused)."""
    wrt = dict(params if wrt is None else wrt)
    loss = maml_loss(model, params, frozen, batch, **maml_kwargs)
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return loss.detach(), {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(wrt.items(), grads)}


def meta_step(model, params, frozen, batch: TaskBatch, optimizer: torch.optim.Optimizer, **maml_kwargs) -> Tensor:
    """One outer update: ``zero_grad``; ``J = maml_loss(..., **maml_kwargs)``; ``J.backward()``; ``optimizer.step()``.
    The optimizer decides what is meta-learned. Returns ``J`` detached."""
    optimizer.zero_grad(set_to_none=True)
    loss = maml_loss(model, params, frozen, batch, **maml_kwargs)
    loss.backward()
    optimizer.step()
    return loss.detach()


def reptile_step(model, params, frozen, batch: TaskBatch, *, loss_fn: LossFn, steps: int, inner_lr: float,
                 epsilon: float, use_query: bool = True) -> Params:
    """One batched Reptile update (Nichol et al. 2018, Algorithm 2): the new ``params`` (detached),
    ``phi + epsilon * mean_i(phi_i - phi)``, ``phi_i`` after ``steps`` SGD steps of size ``inner_lr`` on
    all of task i's data (``use_query=True``, the paper's setting) or its support only; tasks without
    data are left out. :func:`load_params_` writes the result into the model."""
    b = batch
    if use_query:
        x = tuple(torch.cat(p, 1) for p in zip(b.x_support, b.x_query)) if isinstance(b.x_support, tuple) \
            else torch.cat([b.x_support, b.x_query], 1)
        y, mask = torch.cat([b.y_support, b.y_query], 1), torch.cat([b.mask_support, b.mask_query], 1)
    else:
        x, y, mask = b.x_support, b.y_support, b.mask_support
    phi, fz = _detach(params), _detach(frozen or {})

    def one_task(xt, yt, mt):
        return _adapt(model, phi, fz, xt, yt, mt, loss_fn, steps, inner_lr, True)

    with torch.no_grad():
        phis = vmap(one_task, randomness="different")(x, y, mask)  # {name: [T, ...]}
        return {k: phi[k] + epsilon * _mean_over_tasks(phis[k] - phi[k], mask.any(-1)) for k in phi}


def init_meta_sgd_lrs(params: Mapping[str, Tensor], init: float = 0.01) -> Params:
    """Meta-SGD rates (Li et al. 2017): one learnable tensor per parameter, its shape, filled with
    ``init``. Give them to the outer optimizer and pass them as ``inner_lr``."""
    return {k: torch.full_like(v.detach(), init).requires_grad_(True) for k, v in params.items()}


# ============================================================================ parameters and losses
def split_params(model: nn.Module, adapt: AdaptSpec = "all") -> tuple[Params, Params]:
    """``(params, frozen)``: the model's own parameters (not copies) that the inner loop adapts, and the rest (which
    still get meta-gradients). ``adapt``: ``"all"`` (MAML, Reptile, Meta-SGD), ``"head"`` (the last ``nn.Linear``:
    ANIL), name prefixes (``["2"]`` matches ``2.weight``, not ``20.weight``) or a callable ``name -> bool``."""
    named = dict(model.named_parameters())
    if adapt == "all":
        select = lambda name: True  # noqa: E731
    elif adapt == "head":
        head = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        select = lambda name: name.startswith(head + ".")  # noqa: E731
    elif isinstance(adapt, (list, tuple)):
        select = lambda name: any(name == p or name.startswith(p + ".") for p in adapt)  # noqa: E731
    elif callable(adapt):
        select = adapt
    else:
        raise ValueError(f"unknown adapt spec {adapt!r}; use 'all', 'head', a list of parameter-name prefixes "
                         "(e.g. ['head']) or a callable name -> bool.")
    params = {n: p for n, p in named.items() if select(n)}
    if not params:
        raise ValueError(f"adapt spec {adapt!r} selects no parameter; names are {list(named)}.")
    return params, {n: p for n, p in named.items() if n not in params}


def functional_forward(model: nn.Module, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor] | None, x: Inputs) -> Tensor:
    """``model(x)`` with the given parameters (``torch.func.functional_call``); ``x`` a tensor or a
    tuple of positional inputs. Buffers and parameters in neither dict come from the module."""
    return functional_call(model, {**frozen, **params} if frozen else dict(params), x if isinstance(x, tuple) else (x,))


@torch.no_grad()
def load_params_(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` (e.g. from :func:`reptile_step`) into ``model``'s parameters, in place."""
    named = dict(model.named_parameters())
    for name, value in params.items():
        named[name].copy_(value)


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values [..., N]`` over the last dimension where ``mask`` (bool or 0/1) is set; 0 where
    none is; masked-out entries (even inf/NaN) never reach the value or the gradient."""
    if mask is None:
        return values.mean(-1)
    m = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    return total / m.sum(-1).clamp_min(1).to(values.dtype)


def _per_example(pred: Tensor, target: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)  # a model output [N, 1] against targets [N]
    out = fn(pred, target.to(pred.dtype))
    return out if out.dim() == 1 else out.reshape(out.shape[0], -1).mean(-1)


def mse_loss_per_example(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error per example ``[N]`` (``pred [N]`` or ``[N, 1]``; extra dimensions are averaged)."""
    return _per_example(pred, target, lambda p, t: (p - t).pow(2))


def bce_loss_per_example(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits per example ``[N]`` (targets in [0, 1]; numerically stable)."""
    return _per_example(logits, target, lambda p, t: F.binary_cross_entropy_with_logits(p, t, reduction="none"))


def cross_entropy_per_example(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per example for class scores ``[N, C]`` (logits or log-probabilities, e.g. from
    :func:`prototypical_logits` / :func:`matching_logits`) and integer labels ``[N]``."""
    return F.cross_entropy(logits, target.long(), reduction="none")


# ============================================================================ the meta-training loop
class MetaMethod(Protocol):
    """One outer update on a meta-batch, in place; returns the outer loss or None.
    ``progress = step / n_steps`` in [0, 1) (for annealed step sizes)."""

    def update(self, model: nn.Module, batch: TaskBatch, optimizer: torch.optim.Optimizer | None,
               progress: float) -> float | None: ...


class GradientMethod:
    """A :class:`MetaMethod` defined by its outer loss ``self.loss(model, batch)``: one optimizer step on it."""

    def update(self, model, batch, optimizer, progress):
        optimizer.zero_grad(set_to_none=True)
        loss = self.loss(model, batch)
        loss.backward()
        optimizer.step()
        return float(loss.detach())


@dataclass(frozen=True)
class MAML(GradientMethod):
    """MAML and its relatives as one outer update: Adam (or any optimizer) on :func:`maml_loss`.

    * MAML: ``MAML(inner_steps, inner_lr)``; FOMAML: ``first_order=True``;
    * ANIL: ``adapt="head"`` (only the head is adapted in the inner loop; the optimizer still meta-learns the body);
    * Meta-SGD: ``inner_lr=init_meta_sgd_lrs(params)`` (give the rates to the optimizer too).

    ``adapt`` is a :func:`split_params` spec; ``loss_fn`` the per-example loss of both loops."""

    inner_steps: int = 1
    inner_lr: Rate | None = None
    first_order: bool = False
    adapt: AdaptSpec = "all"
    loss_fn: LossFn = mse_loss_per_example

    def loss(self, model: nn.Module, batch: TaskBatch) -> Tensor:
        """The meta-objective ``J`` of ``batch`` at the model's current parameters."""
        params, frozen = split_params(model, self.adapt)
        return maml_loss(model, params, frozen, batch, loss_fn=self.loss_fn, steps=self.inner_steps,
                         inner_lr=self.inner_lr, first_order=self.first_order)

    def inner_loop(self, model: nn.Module, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor] | None,
                 x_s: Inputs, y_s: Tensor, mask_s: Tensor) -> Params:
        """:func:`inner_adapt` with this method's inner loop (first order when ``first_order``), for
        outer losses of your own."""
        return _adapt(model, dict(params), dict(frozen or {}), x_s, y_s, mask_s, self.loss_fn, self.inner_steps,
                      self.inner_lr, self.first_order)


@dataclass(frozen=True)
class Reptile:
    """Reptile as one outer update: :func:`reptile_step` with ``epsilon`` annealed linearly from its
    initial value to 0 over the run (as Nichol et al. do), then :func:`load_params_`. No optimizer."""

    inner_steps: int
    inner_lr: float
    epsilon: float
    adapt: AdaptSpec = "all"
    loss_fn: LossFn = mse_loss_per_example
    use_query: bool = True

    def update(self, model, batch, optimizer, progress):
        params, frozen = split_params(model, self.adapt)
        new = reptile_step(model, params, frozen, batch, loss_fn=self.loss_fn, steps=self.inner_steps,
                           inner_lr=self.inner_lr, epsilon=self.epsilon * (1 - progress), use_query=self.use_query)
        load_params_(model, new)
        return None


@dataclass
class MetaLog:
    """What :func:`meta_train` did: the outer loss of each step (methods that have one), the
    ``(step, validation score)`` checkpoints, the step whose state was kept, seconds."""

    losses: list[float] = field(default_factory=list)
    scores: list[tuple[int, float]] = field(default_factory=list)
    best_step: int | None = None
    seconds: float = 0.0


def meta_train(model: nn.Module, method: MetaMethod, sample_batch: Callable[[int], TaskBatch], n_steps: int, *,
               optimizer: torch.optim.Optimizer | None = None, validate: Callable[[], float] | None = None,
               every: int = 1, stop: train.EarlyStopping | None = None,
               keep: nn.Module | Mapping[str, Tensor] | None = None) -> MetaLog:
    """The meta-training loop: sample a meta-batch, take one outer step, validate, keep the best.
    ``method``: :class:`MAML` (MAML, FOMAML, ANIL, Meta-SGD), :class:`Reptile` or any :class:`MetaMethod`.
    ``sample_batch(step) -> TaskBatch``: the caller owns the randomness, so runs are reproducible. ``optimizer``: the
    outer optimizer (MAML family). ``validate() -> score`` runs after every ``every`` steps and the last; ``stop``
    (:class:`mrec_utils.train.EarlyStopping`, required with it) decides what is better and when to stop; the best state
    of ``keep`` (default the model; or a dict of tensors, e.g. with Meta-SGD rates) is restored at the end."""
    if validate is not None and stop is None:
        raise ValueError("meta_train: validate= needs stop= (a train.EarlyStopping) to decide which state is best.")
    keep = model if keep is None else keep
    log, start = MetaLog(), time.perf_counter()
    for step in train.progress(range(n_steps), desc=type(method).__name__):
        loss = method.update(model, sample_batch(step), optimizer, step / n_steps)
        if loss is not None:
            log.losses.append(loss)
        if validate is not None and ((step + 1) % every == 0 or step + 1 == n_steps):
            log.scores.append((step + 1, float(validate())))
            if stop.step(log.scores[-1][1], keep):
                break
    if validate is not None:
        stop.restore(keep)
        log.best_step = log.scores[stop.best_step][0]
    log.seconds = time.perf_counter() - start
    return log


# ============================================================================ metric-based heads
def _class_onehot(emb_support: Tensor, y_support: Tensor, mask_support: Tensor | None, n_classes: int):
    """(support embeddings zeroed at padding, one-hot labels of the real examples [..., S, C])."""
    mask = torch.ones(y_support.shape, dtype=torch.bool, device=y_support.device) if mask_support is None \
        else mask_support.bool()
    labels = torch.where(mask, y_support, torch.zeros((), dtype=y_support.dtype, device=y_support.device)).long()
    onehot = (labels[..., None] == torch.arange(n_classes, device=labels.device)) & mask[..., None]
    return torch.where(mask[..., None], emb_support, torch.zeros((), dtype=emb_support.dtype, device=emb_support.device)), onehot


def prototypical_logits(emb_support: Tensor, y_support: Tensor, emb_query: Tensor, mask_support: Tensor | None = None,
                        *, n_classes: int = 2, fallback_prototypes: Tensor | None = None) -> Tensor:
    """Prototypical-network logits ``[..., Q, C]`` (Snell et al. 2017): ``-||f(x) - c_c||^2``, ``c_c`` the mean of class
    c's support embeddings; never NaN for finite embeddings. ``emb_support [..., S, D]`` (``...``: optional task
    dimensions), ``y_support [..., S]`` labels in ``0..n_classes-1``, ``emb_query [..., Q, D]``,
    ``mask_support [..., S]`` (True = real) or None. ``fallback_prototypes [C, D]`` (or ``[..., C, D]``, default the
    origin) stand in for a class without support example (a ``-inf`` logit would give NaN gradients)."""
    emb_s, onehot = _class_onehot(emb_support, y_support, mask_support, n_classes)
    oh = onehot.to(emb_s.dtype)
    counts = oh.sum(-2)  # [..., C]
    protos = (oh.transpose(-1, -2) @ emb_s) / counts.clamp_min(1)[..., None]  # [..., C, D]
    fb = torch.zeros((), dtype=emb_s.dtype, device=emb_s.device) if fallback_prototypes is None else fallback_prototypes
    protos = torch.where(counts[..., None] > 0, protos, fb)
    return -(emb_query[..., :, None, :] - protos[..., None, :, :]).pow(2).sum(-1)


def matching_logits(emb_support: Tensor, y_support: Tensor, emb_query: Tensor, mask_support: Tensor | None = None,
                    *, n_classes: int = 2, temperature: float | Tensor = 1.0, eps: float = 1e-8) -> Tensor:
    """Matching-network class log-probabilities (Vinyals et al. 2016), without full-context embeddings.
    ``P(c | q) = sum_i a(q, s_i) [y_i = c]`` with ``a = softmax_i(cos(q, s_i) / temperature)`` over the task's real
    support examples (temperature 1 is the paper's kernel). A class without support example gets one pseudo example
    at the zero vector (cosine 0), so every log-probability stays finite. Arguments as in :func:`prototypical_logits`;
    the ``[..., Q, C]`` log-probabilities serve directly as logits in a cross-entropy loss."""
    emb_s, onehot = _class_onehot(emb_support, y_support, mask_support, n_classes)
    s_n, q_n = F.normalize(emb_s, dim=-1, eps=eps), F.normalize(emb_query, dim=-1, eps=eps)
    sim = (q_n @ s_n.transpose(-1, -2)) / temperature  # [..., Q, S]
    present = onehot.any(-2)  # [..., C]
    zero, neg_inf = sim.new_zeros(()), sim.new_full((), float("-inf"))
    per_class = torch.where(onehot[..., None, :, :], sim[..., :, :, None], neg_inf)
    # an absent class would reduce over -inf only (NaN gradient): fill it with zeros, replaced below
    class_score = torch.logsumexp(torch.where(present[..., None, None, :], per_class, zero), dim=-2)  # [..., Q, C]
    class_score = torch.where(present[..., None, :], class_score, zero)
    return class_score - torch.logsumexp(class_score, dim=-1, keepdim=True)
