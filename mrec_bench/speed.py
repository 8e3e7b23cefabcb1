"""Meta-training speed: one second-order MAML meta-step of a MeLU-sized network, written five ways.

(a) :mod:`mrec_utils.meta` with ``vmap`` over tasks, (b) the same maths as a Python loop over tasks,
(c) the ``higher`` library (``pip install "mrec_utils[bench]"``), (d) first-order MAML with ``vmap``,
(e) a hand-batched reference written for this one network (no ``vmap``, no masks). Every method starts
from the same weights and the same random meta-batch; the methods are timed in interleaved rounds, and
their meta-gradients are compared with the plain loop of the same order.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from mrec_utils import meta, tasks, train

SPEED_METHODS: dict[str, str] = {
    "vmap": "(a) mrec_utils.meta, vmap over tasks",
    "loop": "(b) same maths, Python loop over tasks",
    "higher": "(c) higher.innerloop_ctx, loop over tasks",
    "vmap_first_order": "(d) first-order MAML, vmap over tasks",
    "bmm": "(e) hand-batched MLP (bmm), no vmap: reference",
}
"""Method keys of :func:`speed_benchmark` and what each one measures."""

_ORDER = {"vmap": "second", "loop": "second", "higher": "second", "vmap_first_order": "first", "bmm": "second"}
Batch = dict[str, torch.Tensor]


def melu_mlp(input_dim: int, hidden: int) -> nn.Module:
    """The MeLU-sized decision network: input -> hidden -> hidden -> 1 with ReLU."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def random_batch(n_tasks: int, n_support: int, n_query: int, input_dim: int, seed: int, device: torch.device,
                 dtype: torch.dtype) -> Batch:
    """Random regression tasks: y = tanh(x . w_task) + noise, all slots real (masks of ones)."""
    g = torch.Generator().manual_seed(seed + 1)
    n = n_support + n_query
    x = torch.randn(n_tasks, n, input_dim, generator=g, dtype=torch.float64)
    w = torch.randn(n_tasks, input_dim, generator=g, dtype=torch.float64) / input_dim**0.5
    y = torch.tanh(torch.einsum("tnd,td->tn", x, w)) + 0.1 * torch.randn(n_tasks, n, generator=g, dtype=torch.float64)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    ones = torch.ones(n_tasks, n, dtype=torch.bool, device=device)
    return {
        "x_support": x[:, :n_support].contiguous(), "y_support": y[:, :n_support].contiguous(), "mask_support": ones[:, :n_support],
        "x_query": x[:, n_support:].contiguous(), "y_query": y[:, n_support:].contiguous(), "mask_query": ones[:, n_support:],
    }


def higher_backward(model: nn.Module, batch: Batch, steps: int, inner_opt: torch.optim.Optimizer) -> torch.Tensor:
    """(c): accumulate the second-order meta-gradient into ``model``'s ``.grad`` as the ``higher`` examples
    do, one ``innerloop_ctx`` per task made differentiable from a plain SGD optimiser. Returns the meta-loss."""
    import higher

    n_tasks = batch["x_support"].shape[0]
    total = torch.zeros((), device=batch["y_query"].device, dtype=batch["y_query"].dtype)
    for t in range(n_tasks):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step((fmodel(batch["x_support"][t]).squeeze(-1) - batch["y_support"][t]).pow(2).mean())
            query_loss = (fmodel(batch["x_query"][t]).squeeze(-1) - batch["y_query"][t]).pow(2).mean() / n_tasks
            query_loss.backward()
            total = total + query_loss.detach()
    return total


def bmm_backward(model: nn.Module, batch: Batch, steps: int, inner_lr: float) -> torch.Tensor:
    """(e): the second-order meta-gradient, written for this one network shape (Linear-ReLU-Linear-ReLU-
    Linear). Every task's weights are a slice of one ``[T, out, in]`` tensor, each layer one
    ``torch.baddbmm`` over all tasks; the inner gradients come from ``autograd.grad(create_graph=True)``
    of the summed task losses (tasks share no weights). No masks, no checks, no ``vmap``: how fast eager
    PyTorch runs this meta-step when nothing is general. Returns the meta-loss."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    n_tasks = batch["x_support"].shape[0]
    weights = [m.weight.expand(n_tasks, *m.weight.shape) for m in layers]  # [T, out, in], no copy
    biases = [m.bias.expand(n_tasks, *m.bias.shape) for m in layers]  # [T, out]

    def forward(ws: list[torch.Tensor], bs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x  # [T, N, in]
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            h = torch.relu(h) if i < len(ws) - 1 else h
        return h.squeeze(-1)  # [T, N]

    for _ in range(steps):
        support = (forward(weights, biases, batch["x_support"]) - batch["y_support"]).pow(2).mean(1).sum()
        grads = torch.autograd.grad(support, weights + biases, create_graph=True)
        weights = [torch.add(w, g, alpha=-inner_lr) for w, g in zip(weights, grads[: len(weights)])]
        biases = [torch.add(b, g, alpha=-inner_lr) for b, g in zip(biases, grads[len(weights):])]
    query = (forward(weights, biases, batch["x_query"]) - batch["y_query"]).pow(2).mean(1).mean()
    query.backward()
    return query.detach()


def grad_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The accumulated ``.grad`` of every parameter (zeros where there is none)."""
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def grad_diff(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |g - ref|, ||g - ref|| / ||ref||) over all parameters, in float64."""
    a = torch.cat([g[k].reshape(-1).double().cpu() for k in ref])
    b = torch.cat([ref[k].reshape(-1).double().cpu() for k in ref])
    return (a - b).abs().max().item(), ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gradients(base: nn.Module, batch: Batch, methods: list[str], kw: dict) -> tuple[dict, dict, dict | None]:
    """Each method's meta-gradient on the initial parameters, and the plain loops of both orders."""
    tb = tasks.TaskBatch(**batch)
    p0, f0 = meta.split_params(base)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    ref_so = meta.meta_gradient(base, p0, f0, tb, vectorize=False, **kw)[1]
    ref_fo = None
    for m in methods:
        if m == "vmap":
            grads[m] = meta.meta_gradient(base, p0, f0, tb, **kw)[1]
        elif m == "loop":
            grads[m] = ref_so
        elif m == "vmap_first_order":
            grads[m] = meta.meta_gradient(base, p0, f0, tb, first_order=True, **kw)[1]
            ref_fo = meta.meta_gradient(base, p0, f0, tb, first_order=True, vectorize=False, **kw)[1]
        else:
            model = copy.deepcopy(base)
            if m == "higher":
                higher_backward(model, batch, kw["steps"], torch.optim.SGD(model.parameters(), lr=kw["inner_lr"]))
            else:
                bmm_backward(model, batch, kw["steps"], kw["inner_lr"])
            grads[m] = grad_dict(model)
    return grads, ref_so, ref_fo


def _stepper(m: str, base: nn.Module, batch: Batch, outer_lr: float, kw: dict) -> Callable[[], None]:
    """One full meta-step of method ``m`` (its own copy of the model and its own Adam state)."""
    model = copy.deepcopy(base)
    opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
    if m in ("higher", "bmm"):
        inner_opt = torch.optim.SGD(model.parameters(), lr=kw["inner_lr"])

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            if m == "higher":
                higher_backward(model, batch, kw["steps"], inner_opt)
            else:
                bmm_backward(model, batch, kw["steps"], kw["inner_lr"])
            opt.step()
        return step
    params, frozen = meta.split_params(model)
    tb = tasks.TaskBatch(**batch)
    return lambda: meta.meta_step(model, params, frozen, tb, opt, vectorize=(m != "loop"),
                                  first_order=(m == "vmap_first_order"), **kw)


def _time_rounds(steppers: dict[str, Callable[[], None]], warmup: int, repeats: int, dev: torch.device) -> tuple[dict, dict]:
    """Wall and CPU seconds of each stepper, in interleaved rounds (a, b, c, a, b, c, ...)."""
    wall: dict[str, list[float]] = {m: [] for m in steppers}
    cpu: dict[str, list[float]] = {m: [] for m in steppers}
    for r in range(warmup + repeats):
        for m, step in steppers.items():
            sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            sync(dev)
            if r >= warmup:
                wall[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
    return wall, cpu


def _loadavg() -> list[float]:
    return [round(x, 2) for x in (os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3)]


def speed_benchmark(*, input_dim: int = 256, hidden: int = 64, n_tasks: int = 32, n_support: int = 20, n_query: int = 10,
                    steps: int = 5, inner_lr: float = 0.01, outer_lr: float = 1e-3, warmup: int = 2, repeats: int = 10,
                    methods: Sequence[str] = tuple(SPEED_METHODS), device: str | torch.device | None = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> pd.DataFrame:
    """Time one MAML meta-step (forward, meta-gradient, Adam step) written in the ways of :data:`SPEED_METHODS`.

    Every method starts from the same network (``input_dim -> hidden -> hidden -> 1``), the same random
    meta-batch of ``n_tasks`` tasks with ``n_support`` support and ``n_query`` query examples, ``steps``
    inner SGD steps of size ``inner_lr`` and MSE loss. ``warmup`` rounds are discarded, then ``repeats``
    rounds are timed. ``higher`` is skipped (``attrs["skipped"]``) when it cannot be imported.

    Returns:
        One row per method: ``method``, ``description``, ``order``, ``meta_steps_per_s`` (1 / median wall
        time), ``median_ms``, ``min_ms``, ``max_ms``, ``median_cpu_ms`` (CPU time of this process),
        ``speedup_vs_higher``, ``grad_max_abs_diff`` and ``grad_rel_diff`` (vs the plain loop of the same
        order; NaN for the loop itself). ``attrs``: configuration, device, versions, threads, load averages.
    """
    methods = [methods] if isinstance(methods, str) else list(dict.fromkeys(methods))
    if not methods or any(m not in SPEED_METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty subset of {list(SPEED_METHODS)}, got {methods}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    dev = train.get_device(device if device is not None else "auto")
    skipped = {}
    if "higher" in methods:
        try:
            import higher  # noqa: F401
        except Exception as exc:  # ImportError, or an incompatibility raised at import time
            skipped["higher"] = f"not importable ({type(exc).__name__}: {exc}); pip install 'mrec_utils[bench]'"
            methods.remove("higher")
    if not methods:
        raise ValueError(f"no method left to run: {skipped}")
    torch.manual_seed(seed)
    base = melu_mlp(input_dim, hidden).to(device=dev, dtype=dtype)
    batch = random_batch(n_tasks, n_support, n_query, input_dim, seed, dev, dtype)
    kw = dict(loss_fn=meta.mse_loss_per_example, steps=steps, inner_lr=inner_lr)
    grads, ref_so, ref_fo = _gradients(base, batch, methods, kw)
    steppers = {m: _stepper(m, base, batch, outer_lr, kw) for m in methods}
    load_before = _loadavg()
    wall, cpu = _time_rounds(steppers, warmup, repeats, dev)
    rows = []
    for m in methods:
        med = statistics.median(wall[m])
        diff = (float("nan"), float("nan")) if m == "loop" else grad_diff(grads[m], ref_fo if m == "vmap_first_order" else ref_so)
        rows.append({"method": m, "description": SPEED_METHODS[m], "order": _ORDER[m], "meta_steps_per_s": 1.0 / med,
                     "median_ms": 1e3 * med, "min_ms": 1e3 * min(wall[m]), "max_ms": 1e3 * max(wall[m]),
                     "median_cpu_ms": 1e3 * statistics.median(cpu[m]), "grad_max_abs_diff": diff[0], "grad_rel_diff": diff[1]})
    df = pd.DataFrame(rows)
    ref = df.loc[df["method"] == "higher", "meta_steps_per_s"]
    df.insert(8, "speedup_vs_higher", df["meta_steps_per_s"] / float(ref.iloc[0]) if len(ref) else float("nan"))
    df.attrs.update({
        "config": dict(input_dim=input_dim, hidden=hidden, n_tasks=n_tasks, n_support=n_support, n_query=n_query, steps=steps,
                       inner_lr=inner_lr, outer_lr=outer_lr, warmup=warmup, repeats=repeats,
                       dtype=str(dtype).replace("torch.", ""), seed=seed),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": _loadavg(), "skipped": skipped,
    })
    return df


def format_speed(df: pd.DataFrame) -> str:
    """The table, the machine and the throughput ratios as the command prints them."""
    lines = [df.drop(columns=["description"]).to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    a = df.attrs
    lines.append(f"device={a['device']} ({a['device_name']}), torch {a['torch']}, threads={a['threads']}, cpus={a['cpu_count']}, "
                 f"load avg (1/5/15 min) before {a['loadavg_before']} after {a['loadavg_after']}")
    lines.append("config: " + ", ".join(f"{k}={v}" for k, v in a["config"].items()))
    wall, cpu = dict(zip(df["method"], df["median_ms"])), dict(zip(df["method"], df["median_cpu_ms"]))
    for fast, slow, what in (("vmap", "higher", "vmap / higher"), ("vmap", "loop", "vmap / loop"),
                             ("bmm", "higher", "hand-batched reference / higher"), ("bmm", "vmap", "hand-batched reference / vmap"),
                             ("vmap_first_order", "vmap", "first-order / second-order (vmap)")):
        if fast in wall and slow in wall:
            lines.append(f"{what} throughput: {wall[slow] / wall[fast]:.1f}x wall clock, {cpu[slow] / cpu[fast]:.1f}x CPU time")
    lines += [f"skipped {m}: {why}" for m, why in a["skipped"].items()]
    return "\n".join(lines)
