"""Gradient-based and metric-based meta-learning written with :mod:`torch.func`.

Everything here works with any :class:`torch.nn.Module` whose forward is a pure function of its
parameters and inputs (no BatchNorm running statistics are updated; dropout is allowed but makes the
results random). Parameters are plain dictionaries ``{name: tensor}`` as returned by
:func:`split_params`; the module itself is only used as a *function* through
:func:`torch.func.functional_call`.

Algorithms and their sources
----------------------------
* MAML (Finn, Abbeel & Levine, 2017). The meta-objective is the loss on each task's **query** set
  evaluated at the parameters obtained by a few SGD steps on that task's **support** set,
  averaged over tasks::

      theta_i^(0) = theta
      theta_i^(k+1) = theta_i^(k) - alpha * grad L_support_i(theta_i^(k))      k = 0..K-1
      J(theta) = mean_i L_query_i(theta_i^(K))

  The meta-gradient ``dJ/dtheta`` differentiates *through* the inner updates (second order:
  it contains the Hessian of the support loss, applied as Hessian-vector products). :func:`maml_loss` evaluates ``J``
  for a padded meta-batch with :func:`torch.func.vmap`; ``torch.autograd.grad(J, ...)`` (or
  :func:`meta_gradient` / :func:`meta_step`) gives the meta-gradient.
* First-order MAML (FOMAML, same paper): the inner gradients are treated as constants, so
  ``dJ/dtheta = mean_i grad L_query_i(theta_i^(K))``.
* ANIL (Raghu et al., 2020): only the head is adapted in the inner loop
  (``split_params(model, adapt="head")``); the body is still meta-learned by the outer loop.
* Meta-SGD (Li et al., 2017): per-parameter learning rates ``theta - lr ⊙ g`` that are learned
  by the outer loop (:func:`init_meta_sgd_lrs`, ``lrs=``).
* Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms"):
  ``phi <- phi + epsilon * mean_i(phi_i - phi)`` where ``phi_i`` is ``phi`` after K SGD steps on
  task i (:func:`reptile_step`). Reptile is *not* an acronym in the paper.
* Prototypical networks (Snell, Swersky & Zemel, 2017) and matching networks (Vinyals et al.,
  2016) as classification heads for like/dislike tasks (:func:`prototypical_logits`,
  :func:`matching_logits`).

Padded meta-batches
-------------------
Tasks have different numbers of ratings. A meta-batch therefore holds padded tensors
``x_support [T, S, ...]``, ``y_support [T, S, ...]``, ``mask_support [T, S]`` (and the same for the
query set); a mask entry is ``True``/nonzero for a real example and ``False``/0 for padding. Losses
are *masked means* over the real examples; padded rows are replaced by zeros before they reach the
model, so for a model that treats examples independently (an MLP, embedding look-ups; not
BatchNorm or attention across the examples) their content, even NaN, cannot change any value or
gradient. Integer inputs (item ids) are zeroed too, so index 0 must be valid. A task with no real
example has loss 0 (never NaN), and a task with an empty query set is left out of the mean over
tasks (so padding whole tasks onto a meta-batch changes nothing either).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

__all__ = [
    "Params",
    "TaskBatch",
    "split_params",
    "functional_forward",
    "load_params_",
    "masked_mean",
    "mse_loss_per_example",
    "bce_loss_per_example",
    "cross_entropy_per_example",
    "task_loss",
    "inner_adapt",
    "maml_loss",
    "maml_loss_loop",
    "meta_gradient",
    "meta_step",
    "reptile_step",
    "init_meta_sgd_lrs",
    "prototypical_logits",
    "matching_logits",
]

Params = dict[str, Tensor]
"""Parameters as a dictionary ``{name: tensor}`` with the names of ``model.named_parameters()``."""

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(prediction [N, ...], target [N, ...]) -> per-example losses [N]``."""

Inputs = Union[Tensor, tuple[Tensor, ...]]
"""Model input: one tensor, or a tuple of tensors passed as positional arguments to ``forward``."""

AdaptSpec = Union[str, Sequence[str], Callable[[str], bool]]


# --------------------------------------------------------------------------------------------
# Small validation helpers
# --------------------------------------------------------------------------------------------


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")


def _check_params(model: nn.Module, params: Any, frozen: Any) -> tuple[Params, Params]:
    """Validate the two parameter dictionaries and return them as plain dicts."""
    if not isinstance(params, Mapping) or len(params) == 0:
        raise TypeError(
            "params must be a non-empty dict {name: tensor}; build it with "
            "split_params(model, adapt=...)."
        )
    if frozen is None:
        frozen = {}
    if not isinstance(frozen, Mapping):
        raise TypeError("frozen must be a dict {name: tensor} (or None); see split_params().")
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    known |= {name for name, _ in model.named_buffers(remove_duplicate=False)}
    for which, d in (("params", params), ("frozen", frozen)):
        for name, value in d.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"{which}[{name!r}] must be a torch.Tensor, got {type(value).__name__}.")
            if name not in known:
                raise ValueError(
                    f"{which} has a key {name!r} that is not a parameter of the model; use the names "
                    "of model.named_parameters() (split_params() does this for you)."
                )
    overlap = set(params) & set(frozen)
    if overlap:
        raise ValueError(f"params and frozen share keys {sorted(overlap)}; each name must be in one only.")
    return dict(params), dict(frozen)


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int >= 0, got {steps!r}.")
    if steps < 0:
        raise ValueError(f"steps must be >= 0 (number of inner SGD steps), got {steps}.")
    return int(steps)


def _check_positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive float, got {value!r}.")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}.")
    return value


def _check_lrs(inner_lr: Any, lrs: Any, params: Params) -> tuple[float | None, Params | None]:
    """Validate ``inner_lr`` / Meta-SGD ``lrs``; exactly the update rule that will be used."""
    if lrs is None:
        if inner_lr is None:
            raise ValueError("inner_lr is required (a float > 0) unless per-parameter lrs= are given.")
        return _check_positive(inner_lr, "inner_lr"), None
    if inner_lr is not None:
        _check_positive(inner_lr, "inner_lr")  # ignored, but must not be nonsense
    if not isinstance(lrs, Mapping):
        raise TypeError("lrs must be a dict {name: tensor} like params; build it with init_meta_sgd_lrs(params).")
    if set(lrs) != set(params):
        missing, extra = sorted(set(params) - set(lrs)), sorted(set(lrs) - set(params))
        raise ValueError(f"lrs must have exactly the keys of params (missing {missing}, extra {extra}).")
    for name, lr in lrs.items():
        if not isinstance(lr, Tensor):
            raise TypeError(f"lrs[{name!r}] must be a tensor, got {type(lr).__name__}.")
        if lr.dim() != 0 and lr.shape != params[name].shape:
            raise ValueError(
                f"lrs[{name!r}] has shape {tuple(lr.shape)}; it must have the shape of the parameter "
                f"{tuple(params[name].shape)} (Meta-SGD) or be a 0-dim tensor."
            )
    return None, dict(lrs)


def _check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(
            "loss_fn must be a callable loss_fn(pred, target) -> per-example losses [N], "
            "e.g. mse_loss_per_example."
        )


def _as_args(x: Inputs) -> tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _leading(x: Inputs, ndim: int, what: str) -> tuple[int, ...]:
    """Leading ``ndim`` sizes shared by the tensor(s) in ``x``."""
    shapes = []
    for t in _as_args(x):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what} must be a tensor or a tuple of tensors, got {type(t).__name__}.")
        if t.dim() < ndim:
            raise ValueError(f"{what} needs at least {ndim} dimensions, got shape {tuple(t.shape)}.")
        shapes.append(tuple(t.shape[:ndim]))
    if not shapes:
        raise ValueError(f"{what} is an empty tuple.")
    if len(set(shapes)) != 1:
        raise ValueError(f"the tensors of {what} disagree on their leading sizes: {shapes}.")
    return shapes[0]


def _bool_mask(mask: Tensor | None, shape: tuple[int, ...], device: torch.device, what: str) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"{what} must be a tensor (True/1 = real example, False/0 = padding) or None.")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {tuple(shape)}.")
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_padded(x: Tensor, mask: Tensor) -> Tensor:
    """Replace padded rows (``mask`` False) of ``x [N, ...]`` by zeros. ``mask [N]`` bool."""
    m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sanitize(x: Inputs, mask: Tensor) -> Inputs:
    if isinstance(x, (tuple, list)):
        return tuple(_zero_padded(t, mask) for t in x)
    return _zero_padded(x, mask)


def _detach(params: Mapping[str, Tensor]) -> Params:
    return {k: v.detach() for k, v in params.items()}


def _check_device(params: Params, tensors: Sequence[Tensor], what: str) -> None:
    device = next(iter(params.values())).device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"{what} is on {t.device} but the parameters are on {device}; move it with .to(device).")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


def _last_linear_prefix(model: nn.Module) -> str:
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise ValueError(
            "adapt='head' looks for the last nn.Linear of the model and found none; pass the head's "
            "parameter-name prefixes instead, e.g. adapt=['out'] or adapt=['head.weight', 'head.bias']."
        )
    return last


def split_params(model: nn.Module, adapt: AdaptSpec = "all") -> tuple[Params, Params]:
    """Split ``model``'s parameters into the ones adapted in the inner loop and the rest.

    Args:
        model: any ``nn.Module``.
        adapt: which parameters the inner loop adapts.

            * ``"all"`` — every parameter (MAML, Reptile, Meta-SGD).
            * ``"head"`` — the parameters of the **last ``nn.Linear``** in ``model.named_modules()``
              order (ANIL). That order is the order in which sub-modules were assigned in
              ``__init__`` (for ``nn.Sequential`` it is the execution order); if your head is not the
              last ``nn.Linear`` registered, pass its prefix explicitly.
            * a list/tuple of name prefixes, e.g. ``["head"]`` or ``["2"]``: a parameter is adapted
              when its name equals a prefix or starts with ``prefix + "."``
              (so ``"2"`` matches ``"2.weight"`` but not ``"20.weight"``).
            * a callable ``adapt(name) -> bool``.

    Returns:
        ``(adapt_params, frozen_params)``: two dicts ``{name: nn.Parameter}`` holding the model's own
        parameter objects (not copies), so an optimizer over ``model.parameters()`` updates them.
        "Frozen" only means *not adapted in the inner loop*: frozen parameters still receive
        meta-gradients from :func:`maml_loss` if they require grad (that is ANIL's body).
        ``requires_grad`` plays no role in the split.

    Raises:
        ValueError: unknown string spec, a prefix that matches nothing, or an empty selection.
        TypeError: ``adapt`` of an unsupported type.
    """
    _check_model(model)
    named = dict(model.named_parameters())
    if not named:
        raise ValueError("the model has no parameters to meta-learn.")
    if isinstance(adapt, str):
        if adapt == "all":
            select: Callable[[str], bool] = lambda name: True  # noqa: E731
        elif adapt == "head":
            prefix = _last_linear_prefix(model)
            select = lambda name: name == prefix or name.startswith(prefix + ".")  # noqa: E731
        else:
            raise ValueError(
                f"unknown adapt spec {adapt!r}; use 'all', 'head', a list of parameter-name prefixes "
                "(e.g. ['head']) or a callable name -> bool."
            )
    elif isinstance(adapt, (list, tuple)):
        prefixes = list(adapt)
        if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
            raise ValueError("adapt as a list must be a non-empty list of non-empty name prefixes (str).")
        for p in prefixes:
            if not any(n == p or n.startswith(p + ".") for n in named):
                raise ValueError(f"adapt prefix {p!r} matches no parameter; names are {list(named)}.")
        select = lambda name: any(name == p or name.startswith(p + ".") for p in prefixes)  # noqa: E731
    elif callable(adapt):
        select = adapt
    else:
        raise TypeError(f"adapt must be 'all', 'head', a list of prefixes or a callable, got {type(adapt).__name__}.")
    adapt_params = {n: p for n, p in named.items() if select(n)}
    frozen = {n: p for n, p in named.items() if n not in adapt_params}
    if not adapt_params:
        raise ValueError(f"adapt spec {adapt!r} selects no parameter; names are {list(named)}.")
    return adapt_params, frozen


def functional_forward(model: nn.Module, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor] | None, x: Inputs) -> Tensor:
    """``model(x)`` evaluated with the given parameters (``torch.func.functional_call``).

    ``x`` is a tensor or a tuple of tensors passed as positional arguments. Buffers and any
    parameter missing from both dicts are taken from the module itself.
    """
    merged = {**frozen, **params} if frozen else dict(params)
    return functional_call(model, merged, _as_args(x))


@torch.no_grad()
def load_params_(model: nn.Module, params: Mapping[str, Tensor]) -> None:
    """Copy ``params`` (e.g. the result of :func:`reptile_step`) into ``model``'s parameters in place."""
    _check_model(model)
    named = dict(model.named_parameters())
    for name, value in params.items():
        if name not in named:
            raise ValueError(f"{name!r} is not a parameter of the model.")
        if named[name].shape != value.shape:
            raise ValueError(f"shape mismatch for {name!r}: model {tuple(named[name].shape)}, given {tuple(value.shape)}.")
        named[name].copy_(value)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values [..., N]`` over the last dimension, counting only entries where ``mask`` is set.

    Args:
        values: ``[..., N]`` (e.g. per-example losses of one task ``[N]`` or of a meta-batch ``[T, N]``).
        mask: ``[..., N]`` bool or 0/1 (nonzero = real example), or ``None`` for a plain mean.

    Returns:
        ``[...]``. Where the mask has no real entry the result is exactly 0 (not NaN). Masked-out
        entries never influence the value or the gradient, even if they are inf/NaN.
    """
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a tensor, got {type(values).__name__}.")
    if values.dim() == 0:
        raise ValueError("values must have at least one dimension (the examples).")
    if mask is None:
        return values.mean(-1)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}.")
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal values shape {tuple(values.shape)}.")
    m = mask if mask.dtype == torch.bool else mask != 0
    total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    count = m.sum(-1).clamp_min(1).to(values.dtype)
    return total / count


def _align(pred: Tensor, target: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise TypeError(f"{name}: pred and target must be tensors.")
    if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)  # a model output [N, 1] against targets [N]
    if pred.shape != target.shape:
        raise ValueError(f"{name}: prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}.")
    if pred.dim() == 0:
        raise ValueError(f"{name}: expected a batch dimension [N, ...], got scalars.")
    return pred, target.to(pred.dtype)


def _per_example(values: Tensor) -> Tensor:
    return values if values.dim() == 1 else values.reshape(values.shape[0], -1).mean(-1)


def mse_loss_per_example(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error per example: ``pred [N] or [N, 1] or [N, ...]``, ``target`` alike -> ``[N]``.

    Extra trailing dimensions are averaged. A trailing size-1 dimension of ``pred`` is squeezed.
    """
    pred, target = _align(pred, target, "mse_loss_per_example")
    return _per_example((pred - target).pow(2))


def bce_loss_per_example(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy on logits per example (targets in [0, 1]) -> ``[N]``.

    Numerically stable (``binary_cross_entropy_with_logits``); shapes as in :func:`mse_loss_per_example`.
    """
    logits, target = _align(logits, target, "bce_loss_per_example")
    return _per_example(F.binary_cross_entropy_with_logits(logits, target, reduction="none"))


def cross_entropy_per_example(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per example for class scores ``logits [N, C]`` (logits or log-probabilities)
    and integer labels ``target [N]`` -> ``[N]``. Use it with :func:`prototypical_logits` /
    :func:`matching_logits` outputs (log-softmax of log-probabilities is the identity)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_per_example: need logits [N, C] and target [N], got {tuple(logits.shape)} and {tuple(target.shape)}.")
    return F.cross_entropy(logits, target.long(), reduction="none")


def _task_loss(model: nn.Module, params: Params, frozen: Params, x: Inputs, y: Tensor, mask: Tensor, loss_fn: LossFn) -> Tensor:
    """Masked mean loss of one task; inputs already sanitized. Works under vmap."""
    pred = functional_forward(model, params, frozen, x)
    per = loss_fn(pred, y)
    if not isinstance(per, Tensor) or per.shape != mask.shape:
        got = tuple(per.shape) if isinstance(per, Tensor) else type(per).__name__
        raise ValueError(
            f"loss_fn must return one loss per example, shape {tuple(mask.shape)}, got {got}; "
            "use e.g. mse_loss_per_example / bce_loss_per_example (reduction='none')."
        )
    return masked_mean(per, mask)


def task_loss(model: nn.Module, params: Mapping[str, Tensor], frozen: Mapping[str, Tensor] | None, x: Inputs, y: Tensor, mask: Tensor | None = None, *, loss_fn: LossFn) -> Tensor:
    """Masked mean loss of one task: ``x [N, ...]`` (tensor or tuple), ``y [N, ...]``, ``mask [N]`` -> scalar."""
    _check_model(model)
    params, frozen = _check_params(model, params, frozen)
    _check_loss_fn(loss_fn)
    (n,) = _leading(x, 1, "x")
    if not isinstance(y, Tensor) or y.dim() < 1 or y.shape[0] != n:
        raise ValueError(f"y must be a tensor with {n} rows like x.")
    m = _bool_mask(mask, (n,), y.device, "mask")
    return _task_loss(model, params, frozen, _sanitize(x, m), _zero_padded(y, m), m, loss_fn)


# --------------------------------------------------------------------------------------------
# Inner loop
# --------------------------------------------------------------------------------------------


def _adapt(
    model: nn.Module,
    params: Params,
    frozen: Params,
    x: Inputs,
    y: Tensor,
    mask: Tensor,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float | None,
    first_order: bool,
    lrs: Params | None,
) -> Params:
    """The inner SGD loop on already validated and sanitized inputs (works under ``vmap``)."""

    def support_loss(p: Params, fz: Params) -> Tensor:
        return _task_loss(model, p, fz, x, y, mask, loss_fn)

    grad_fn = grad(support_loss)  # gradient w.r.t. the first argument only
    # First order: the inner gradients are constants for the outer loop, so they are computed on
    # detached copies (identical values, but no outer autograd graph is recorded for them).
    fz_inner = _detach(frozen) if first_order else frozen
    for _ in range(steps):
        g = grad_fn(_detach(params) if first_order else params, fz_inner)
        # fused p - lr * g (one kernel instead of two; matters for large per-task weights)
        if lrs is None:
            params = {k: torch.add(p, g[k], alpha=-inner_lr) for k, p in params.items()}
        else:
            params = {k: torch.addcmul(p, lrs[k], g[k], value=-1) for k, p in params.items()}
    return dict(params)


def inner_adapt(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None,
    x_s: Inputs,
    y_s: Tensor,
    mask_s: Tensor | None = None,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float | None = None,
    first_order: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
) -> Params:
    """Adapt ``params`` to one task with ``steps`` steps of full-batch SGD on its support set.

    ``theta^(k+1) = theta^(k) - inner_lr * grad L_s(theta^(k))`` where ``L_s`` is the masked mean of
    ``loss_fn`` over the support examples; with Meta-SGD ``lrs`` the step is the elementwise
    ``theta - lrs ⊙ grad`` and ``inner_lr`` is ignored.

    Args:
        model, params, frozen: see :func:`split_params`; only ``params`` are adapted.
        x_s: support inputs ``[S, ...]`` (or a tuple of such tensors, passed as ``model(*x_s)``).
        y_s: support targets ``[S, ...]``.
        mask_s: ``[S]`` (True/1 = real, False/0 = padding) or ``None``.
        loss_fn: ``loss_fn(pred, target) -> [S]`` per-example losses.
        steps: number of inner SGD steps (0 returns ``params`` unchanged).
        inner_lr: SGD step size > 0 (required unless ``lrs`` is given).
        first_order: if False (default) the result is a differentiable function of ``params``
            including the dependence of the inner gradients on ``params`` (second-order MAML;
            ``torch.func.grad`` composes with ordinary autograd, which plays the role of
            ``create_graph=True``). If True the inner gradients are treated as constants (FOMAML).
        lrs: Meta-SGD learning rates ``{name: tensor}`` with the parameters' shapes (or 0-dim).
            Li et al. take one inner step; with ``steps > 1`` the same rates are used at every step.

    Returns:
        The adapted parameters ``{name: tensor}`` (new tensors; the inputs are not modified).
        Can be called inside :func:`torch.func.vmap`. To adapt for evaluation only, call it under
        ``torch.no_grad()``: the inner gradients are still computed (``torch.func.grad`` ignores an
        outer ``no_grad``) but no graph is kept.
    """
    _check_model(model)
    params, frozen = _check_params(model, params, frozen)
    _check_loss_fn(loss_fn)
    steps = _check_steps(steps)
    inner_lr, lrs = _check_lrs(inner_lr, lrs, params)
    (n,) = _leading(x_s, 1, "x_s")
    if not isinstance(y_s, Tensor) or y_s.dim() < 1 or y_s.shape[0] != n:
        raise ValueError(f"y_s must be a tensor whose first dimension is the {n} support examples of x_s.")
    m = _bool_mask(mask_s, (n,), y_s.device, "mask_s")
    return _adapt(model, params, frozen, _sanitize(x_s, m), _zero_padded(y_s, m), m, loss_fn, steps, inner_lr, bool(first_order), lrs)


# --------------------------------------------------------------------------------------------
# Meta-batches
# --------------------------------------------------------------------------------------------


@dataclass
class TaskBatch:
    """A padded meta-batch of ``T`` tasks (``S`` support and ``Q`` query slots per task).

    Attributes:
        x_support: ``[T, S, ...]`` tensor or tuple of tensors.
        y_support: ``[T, S, ...]``.
        mask_support: ``[T, S]`` bool (True = real example) or None (= no padding).
        x_query, y_query, mask_query: the same for the query set (``Q`` slots).
    """

    x_support: Inputs
    y_support: Tensor
    x_query: Inputs
    y_query: Tensor
    mask_support: Tensor | None = None
    mask_query: Tensor | None = None


_FIELDS = ("x_support", "y_support", "mask_support", "x_query", "y_query", "mask_query")


def _get_field(batch: Any, name: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(name)
    return getattr(batch, name, None)


def _as_task_batch(batch: Any, params: Params) -> TaskBatch:
    """Validate a padded meta-batch (dict or object with the six fields); masks become bool."""
    if batch is None:
        raise TypeError("batch must be a dict or dataclass with x_support, y_support, x_query, y_query (and masks).")
    vals = {f: _get_field(batch, f) for f in _FIELDS}
    missing = [f for f in ("x_support", "y_support", "x_query", "y_query") if vals[f] is None]
    if missing:
        raise ValueError(f"batch is missing {missing}; it needs x_support, y_support, x_query, y_query and optional masks.")
    out = {}
    t_sizes = {}
    for part in ("support", "query"):
        x, y = vals[f"x_{part}"], vals[f"y_{part}"]
        t, s = _leading(x, 2, f"x_{part}")
        if not isinstance(y, Tensor) or y.dim() < 2 or tuple(y.shape[:2]) != (t, s):
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"y_{part} must be a tensor [T, N, ...] = [{t}, {s}, ...] like x_{part}, got {got}.")
        m = _bool_mask(vals[f"mask_{part}"], (t, s), y.device, f"mask_{part}")
        _check_device(params, [*_as_args(x), y, m], f"batch x_{part}/y_{part}/mask_{part}")
        t_sizes[part] = t
        out[f"x_{part}"], out[f"y_{part}"], out[f"mask_{part}"] = x, y, m
    if t_sizes["support"] != t_sizes["query"]:
        raise ValueError(f"support and query disagree on the number of tasks: {t_sizes['support']} vs {t_sizes['query']}.")
    if t_sizes["support"] == 0:
        raise ValueError("the meta-batch has no task (T = 0).")
    return TaskBatch(**out)


def _mean_over_tasks(values: Tensor, task_mask: Tensor) -> Tensor:
    """Mean over tasks ``[T, ...]`` of tasks with ``task_mask [T]`` set (0 if none)."""
    m = task_mask.reshape(task_mask.shape + (1,) * (values.dim() - 1)).to(values.dtype)
    return (values * m).sum(0) / task_mask.sum().clamp_min(1).to(values.dtype)


def _validate_meta_args(model, params, frozen, batch, loss_fn, steps, inner_lr, lrs):
    _check_model(model)
    params, frozen = _check_params(model, params, frozen)
    _check_loss_fn(loss_fn)
    steps = _check_steps(steps)
    inner_lr, lrs = _check_lrs(inner_lr, lrs, params)
    tb = _as_task_batch(batch, params)
    return params, frozen, steps, inner_lr, lrs, tb


def maml_loss(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None,
    batch: Any,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float | None = None,
    first_order: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The MAML meta-objective of a padded meta-batch, vectorised over tasks with ``vmap``.

    ``J = mean_i L_query_i(inner_adapt(params, support_i))`` over the tasks ``i`` whose query mask is
    not empty. (Finn et al. write a *sum* over the tasks of a meta-batch; the mean only rescales the
    outer learning rate and keeps it independent of the meta-batch size.) ``torch.autograd.grad(J, ...)`` gives the meta-gradient w.r.t. ``params``, ``frozen``
    (ANIL body) and ``lrs`` (Meta-SGD), whichever require grad.

    Args:
        batch: dict or :class:`TaskBatch` with ``x_support [T, S, ...]``, ``y_support [T, S, ...]``,
            ``mask_support [T, S]``, ``x_query [T, Q, ...]``, ``y_query [T, Q, ...]``, ``mask_query [T, Q]``
            (masks optional).
        The other arguments are those of :func:`inner_adapt`.

    Returns:
        A scalar tensor.
    """
    params, frozen, steps, inner_lr, lrs, tb = _validate_meta_args(model, params, frozen, batch, loss_fn, steps, inner_lr, lrs)
    first_order = bool(first_order)

    def one_task(xs, ys, ms, xq, yq, mq):
        xs, ys, xq, yq = _sanitize(xs, ms), _zero_padded(ys, ms), _sanitize(xq, mq), _zero_padded(yq, mq)
        adapted = _adapt(model, params, frozen, xs, ys, ms, loss_fn, steps, inner_lr, first_order, lrs)
        return _task_loss(model, adapted, frozen, xq, yq, mq, loss_fn)

    losses = vmap(one_task, randomness="different")(
        tb.x_support, tb.y_support, tb.mask_support, tb.x_query, tb.y_query, tb.mask_query
    )
    return _mean_over_tasks(losses, tb.mask_query.any(-1))


def _index(x: Inputs, i: int) -> Inputs:
    return tuple(t[i] for t in x) if isinstance(x, (tuple, list)) else x[i]


def maml_loss_loop(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None,
    batch: Any,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float | None = None,
    first_order: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Reference implementation of :func:`maml_loss` with a plain Python loop over tasks
    (``torch.func.grad`` per task, no ``vmap``). Same arguments, same value and gradients."""
    params, frozen, steps, inner_lr, lrs, tb = _validate_meta_args(model, params, frozen, batch, loss_fn, steps, inner_lr, lrs)
    losses = []
    for i in range(tb.y_support.shape[0]):
        ms, mq = tb.mask_support[i], tb.mask_query[i]
        xs, ys = _sanitize(_index(tb.x_support, i), ms), _zero_padded(tb.y_support[i], ms)
        xq, yq = _sanitize(_index(tb.x_query, i), mq), _zero_padded(tb.y_query[i], mq)
        adapted = _adapt(model, params, frozen, xs, ys, ms, loss_fn, steps, inner_lr, bool(first_order), lrs)
        losses.append(_task_loss(model, adapted, frozen, xq, yq, mq, loss_fn))
    return _mean_over_tasks(torch.stack(losses), tb.mask_query.any(-1))


def meta_gradient(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None,
    batch: Any,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float | None = None,
    first_order: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
    wrt: Mapping[str, Tensor] | None = None,
    vectorize: bool = True,
) -> tuple[Tensor, Params]:
    """``(J, dJ/d wrt)``: the MAML meta-objective and its gradient (``torch.autograd.grad``).

    ``wrt`` defaults to ``params``; pass ``frozen`` (ANIL body) or ``lrs`` (Meta-SGD) to get those
    gradients. Tensors that ``J`` does not depend on get zero gradients. ``vectorize=False`` uses
    :func:`maml_loss_loop`.
    """
    wrt = params if wrt is None else wrt
    if not isinstance(wrt, Mapping) or not wrt:
        raise TypeError("wrt must be a non-empty dict {name: tensor}.")
    not_leaf = [k for k, v in wrt.items() if not (isinstance(v, Tensor) and v.requires_grad)]
    if not_leaf:
        raise ValueError(f"cannot differentiate w.r.t. {not_leaf}: they do not require grad.")
    fn = maml_loss if vectorize else maml_loss_loop
    loss = fn(model, params, frozen, batch, loss_fn=loss_fn, steps=steps, inner_lr=inner_lr, first_order=first_order, lrs=lrs)
    grads = torch.autograd.grad(loss, list(wrt.values()), allow_unused=True)
    return loss.detach(), {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(wrt.items(), grads)}


def meta_step(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None,
    batch: Any,
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float | None = None,
    first_order: bool = False,
    lrs: Mapping[str, Tensor] | None = None,
    vectorize: bool = True,
) -> Tensor:
    """One outer (meta) update: ``zero_grad``; ``J = maml_loss(...)``; ``J.backward()``; ``optimizer.step()``.

    The optimizer decides what is meta-learned (e.g. ``model.parameters()`` plus ``lrs.values()``
    for Meta-SGD). Returns ``J`` detached (call ``.item()`` to log it).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("optimizer must be a torch.optim.Optimizer over the meta-parameters.")
    fn = maml_loss if vectorize else maml_loss_loop
    optimizer.zero_grad(set_to_none=True)
    loss = fn(model, params, frozen, batch, loss_fn=loss_fn, steps=steps, inner_lr=inner_lr, first_order=first_order, lrs=lrs)
    loss.backward()
    optimizer.step()
    return loss.detach()


# --------------------------------------------------------------------------------------------
# Reptile
# --------------------------------------------------------------------------------------------


def _cat(a: Inputs, b: Inputs) -> Inputs:
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            raise ValueError("x_support and x_query must both be tensors or tuples of the same length.")
        return tuple(torch.cat([u, v], dim=1) for u, v in zip(a, b))
    if isinstance(b, (tuple, list)):
        raise ValueError("x_support and x_query must both be tensors or tuples of the same length.")
    if a.shape[2:] != b.shape[2:]:
        raise ValueError(f"support and query examples differ in shape: {tuple(a.shape[2:])} vs {tuple(b.shape[2:])}.")
    return torch.cat([a, b], dim=1)


def reptile_step(
    model: nn.Module,
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor] | None,
    batch: Any,
    *,
    loss_fn: LossFn,
    steps: int,
    inner_lr: float,
    epsilon: float,
    use_query: bool = True,
) -> Params:
    """One batched Reptile update (Nichol, Achiam & Schulman 2018, Algorithm 2).

    ``phi_new = phi + epsilon * mean_i(phi_i - phi)`` where ``phi_i`` is ``phi`` after ``steps``
    full-batch SGD steps (step size ``inner_lr``) on task ``i``. Serial Reptile (Algorithm 1) is
    a meta-batch of one task.

    Args:
        use_query: if True (default) the inner steps use *all* data of the task (support ∪ query),
            as in the paper where a task is just a loss to minimise; if False only the support set
            is used (then the query set stays held out for evaluation).
        epsilon: outer step size > 0 (the paper anneals it linearly towards 0).
        The other arguments are those of :func:`maml_loss`; tasks without any real example are left
        out of the mean. The paper runs Adam on mini-batches in its experiments, and its Taylor
        analysis (section 5.1) takes each inner step on a *different* mini-batch; here the inner
        optimiser is plain full-batch SGD, for which the "AvgGradInner" term of that analysis
        becomes the gradient of half the squared norm of the full-batch gradient.

    Returns:
        The new values of ``params`` as detached tensors (``frozen`` is untouched); write them into
        the model with :func:`load_params_`.
    """
    params, frozen, steps, inner_lr, _, tb = _validate_meta_args(model, params, frozen, batch, loss_fn, steps, inner_lr, None)
    eps = _check_positive(epsilon, "epsilon")
    if use_query:
        x, y = _cat(tb.x_support, tb.x_query), torch.cat([tb.y_support, tb.y_query], dim=1)
        mask = torch.cat([tb.mask_support, tb.mask_query], dim=1)
    else:
        x, y, mask = tb.x_support, tb.y_support, tb.mask_support
    phi = _detach(params)
    fz = _detach(frozen)

    def one_task(xt, yt, mt):
        return _adapt(model, phi, fz, _sanitize(xt, mt), _zero_padded(yt, mt), mt, loss_fn, steps, inner_lr, True, None)

    with torch.no_grad():
        phis = vmap(one_task, randomness="different")(x, y, mask)  # {name: [T, ...]}
        has_data = mask.any(-1)
        return {k: phi[k] + eps * _mean_over_tasks(phis[k] - phi[k], has_data) for k in phi}


# --------------------------------------------------------------------------------------------
# Meta-SGD
# --------------------------------------------------------------------------------------------


def init_meta_sgd_lrs(params: Mapping[str, Tensor], init: float = 0.01) -> Params:
    """Meta-SGD learning rates (Li et al. 2017): one learnable tensor per parameter, same shape,
    filled with ``init``. Returns new leaf tensors with ``requires_grad=True`` on the parameters'
    device/dtype; give them to the outer optimizer together with the model parameters and pass
    ``lrs=`` to :func:`inner_adapt` / :func:`maml_loss`."""
    if not isinstance(params, Mapping) or not params:
        raise TypeError("params must be a non-empty dict {name: tensor}.")
    init = _check_positive(init, "init")
    return {k: torch.full_like(v.detach(), init).requires_grad_(True) for k, v in params.items()}


# --------------------------------------------------------------------------------------------
# Metric-based heads
# --------------------------------------------------------------------------------------------


def _eager_bool(t: Tensor) -> bool | None:
    """``bool(t)`` when the value is available; None inside a function transform (vmap/grad)."""
    try:
        return bool(t)
    except RuntimeError:
        return None


def _metric_inputs(emb_support, y_support, emb_query, mask_support, n_classes, fallback, fallback_name):
    for name, t in (("emb_support", emb_support), ("y_support", y_support), ("emb_query", emb_query)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}.")
    if isinstance(n_classes, bool) or not isinstance(n_classes, numbers.Integral) or n_classes < 2:
        raise ValueError(f"n_classes must be an int >= 2, got {n_classes!r}.")
    if emb_support.dim() < 2 or emb_query.dim() < 2:
        raise ValueError("emb_support must be [..., S, D] and emb_query [..., Q, D].")
    if emb_support.shape[-1] != emb_query.shape[-1]:
        raise ValueError(f"support and query embeddings differ in size: {emb_support.shape[-1]} vs {emb_query.shape[-1]}.")
    if emb_support.shape[:-2] != emb_query.shape[:-2]:
        raise ValueError(f"task dimensions differ: support {tuple(emb_support.shape[:-2])}, query {tuple(emb_query.shape[:-2])}.")
    if y_support.shape != emb_support.shape[:-1]:
        raise ValueError(f"y_support must have shape {tuple(emb_support.shape[:-1])} (one label per support embedding), got {tuple(y_support.shape)}.")
    mask = _bool_mask(mask_support, tuple(emb_support.shape[:-1]), emb_support.device, "mask_support")
    if y_support.is_floating_point():
        bad = _eager_bool(((y_support != torch.round(y_support)) & mask).any())
        if bad:
            raise ValueError("y_support must hold integer class labels 0..n_classes-1 (e.g. 0 = dislike, 1 = like).")
    bad = _eager_bool((((y_support < 0) | (y_support >= n_classes)) & mask).any())
    if bad:
        raise ValueError(f"y_support has labels outside 0..{n_classes - 1} on real (unmasked) entries.")
    d = emb_support.shape[-1]
    if fallback is not None:
        if not isinstance(fallback, Tensor) or fallback.shape[-2:] != (n_classes, d):
            raise ValueError(f"{fallback_name} must be a tensor [..., n_classes, D] = [..., {n_classes}, {d}].")
    labels = torch.where(mask, y_support, torch.zeros((), dtype=y_support.dtype, device=y_support.device)).long()
    classes = torch.arange(n_classes, device=labels.device)
    onehot = (labels[..., None] == classes) & mask[..., None]  # [..., S, C]
    emb_s = _zero_padded_last(emb_support, mask)
    return emb_s, onehot, mask


def _zero_padded_last(emb: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask[..., None], emb, torch.zeros((), dtype=emb.dtype, device=emb.device))


def prototypical_logits(
    emb_support: Tensor,
    y_support: Tensor,
    emb_query: Tensor,
    mask_support: Tensor | None = None,
    *,
    n_classes: int = 2,
    fallback_prototypes: Tensor | None = None,
) -> Tensor:
    """Prototypical-network logits (Snell et al. 2017): negative squared Euclidean distance of each
    query embedding to each class prototype, the mean of that class's support embeddings.

    Args:
        emb_support: ``[..., S, D]`` (``...`` = optional task dimensions, e.g. ``[T]``).
        y_support: ``[..., S]`` integer labels in ``0..n_classes-1`` (like/dislike: 1/0).
        emb_query: ``[..., Q, D]``.
        mask_support: ``[..., S]`` (True/1 = real, False/0 = padding) or None.
        n_classes: number of classes C (2 for like/dislike).
        fallback_prototypes: ``[C, D]`` (or ``[..., C, D]``) prototypes used for a class that has no
            support example in a task, e.g. a learnable ``nn.Parameter`` or class means over the
            training users. Default: the zero vector (the origin of the embedding space). The
            alternative of a ``-inf`` logit is avoided on purpose: it would give an infinite loss
            and NaN gradients whenever the query contains that class.

    Returns:
        ``[..., Q, C]`` logits; ``softmax`` over the last dimension gives class probabilities.
        Never NaN for finite embeddings, whatever the padding or missing classes.
    """
    emb_s, onehot, _ = _metric_inputs(emb_support, y_support, emb_query, mask_support, n_classes, fallback_prototypes, "fallback_prototypes")
    oh = onehot.to(emb_s.dtype)
    counts = oh.sum(-2)  # [..., C]
    protos = (oh.transpose(-1, -2) @ emb_s) / counts.clamp_min(1)[..., None]  # [..., C, D]
    fb = torch.zeros((), dtype=emb_s.dtype, device=emb_s.device) if fallback_prototypes is None else fallback_prototypes
    protos = torch.where(counts[..., None] > 0, protos, fb)
    diff = emb_query[..., :, None, :] - protos[..., None, :, :]  # [..., Q, C, D]
    return -diff.pow(2).sum(-1)


def matching_logits(
    emb_support: Tensor,
    y_support: Tensor,
    emb_query: Tensor,
    mask_support: Tensor | None = None,
    *,
    n_classes: int = 2,
    temperature: float | Tensor = 1.0,
    fallback_embeddings: Tensor | None = None,
    eps: float = 1e-8,
) -> Tensor:
    """Matching-network class log-probabilities (Vinyals et al. 2016), without full-context embeddings.

    ``P(c | q) = sum_i a(q, s_i) [y_i = c]`` with attention ``a(q, s_i) = softmax_i(cos(q, s_i) / temperature)``
    over the task's real support examples. The embeddings are used as given: the paper's optional
    *full context embeddings* (a bidirectional LSTM over the support set and an attention LSTM for
    the query) are **not** implemented. ``temperature=1`` is the paper's kernel.

    Args:
        emb_support, y_support, emb_query, mask_support, n_classes: as in :func:`prototypical_logits`.
        temperature: > 0; a float or a learnable 0-dim tensor.
        fallback_embeddings: ``[C, D]`` (or ``[..., C, D]``). A class with no support example in a
            task gets one pseudo support example at this embedding (default: the zero vector,
            whose cosine similarity with any query is 0), so its probability stays positive and
            the log-probability finite.
        eps: lower bound on vector norms in the cosine similarity.

    Returns:
        ``[..., Q, C]`` log-probabilities (``exp`` sums to 1 over the last dimension). Use them
        directly as logits in a cross-entropy loss. Never NaN for finite embeddings.
    """
    emb_s, onehot, _ = _metric_inputs(emb_support, y_support, emb_query, mask_support, n_classes, fallback_embeddings, "fallback_embeddings")
    if not isinstance(temperature, Tensor):
        temperature = _check_positive(temperature, "temperature")
    eps = _check_positive(eps, "eps")
    s_n = F.normalize(emb_s, dim=-1, eps=eps)
    q_n = F.normalize(emb_query, dim=-1, eps=eps)
    sim = (q_n @ s_n.transpose(-1, -2)) / temperature  # [..., Q, S]
    present = onehot.any(-2)  # [..., C]
    neg_inf = torch.full((), float("-inf"), dtype=sim.dtype, device=sim.device)
    zero = torch.zeros((), dtype=sim.dtype, device=sim.device)
    per_class = torch.where(onehot[..., None, :, :], sim[..., :, :, None], neg_inf)  # [..., Q, S, C]
    # An absent class would reduce over -inf only (value -inf, local gradient NaN). Fill such
    # columns with zeros so that every intermediate stays finite, and replace the result below.
    per_class = torch.where(present[..., None, None, :], per_class, zero)
    class_score = torch.logsumexp(per_class, dim=-2)  # [..., Q, C]
    if fallback_embeddings is None:
        fb_sim = zero
    else:
        fb_sim = (q_n @ F.normalize(fallback_embeddings, dim=-1, eps=eps).transpose(-1, -2)) / temperature
    class_score = torch.where(present[..., None, :], class_score, fb_sim)
    return class_score - torch.logsumexp(class_score, dim=-1, keepdim=True)
