"""Benchmarks as a command: ``python -m mrec_utils.benchmark <subcommand> [options]``.

Subcommands
-----------
``speed``
    Meta-steps per second of second-order MAML for a MeLU-sized network, written five ways:
    (a) :mod:`mrec_utils.meta` with ``vmap`` over tasks, (b) the same maths as a Python loop
    over tasks, (c) the ``higher`` library (``pip install "mrec_utils[bench]"``), (d) first-order
    MAML with ``vmap``, (e) a hand-batched reference for this one network (no ``vmap``); plus how far apart their meta-gradients are. See :func:`speed_benchmark`.

``coldstart``
    The cold-start comparison of chapter 5 (:func:`mrec_utils.coldstart.run_coldstart`): global
    and item means, MF with fold-in, the MeLU-style network with and without fine-tuning, MAML,
    FOMAML, MeLU/ANIL, Reptile and a prototypical head, on the same episodes, over several seeds;
    prints the table of the book and writes it (``--out results.csv|.json``). Example:
    ``python -m mrec_utils.benchmark coldstart --dataset ml-latest-small --scenario user-cold --shots 10``.

``report``
    Chapter 10's results table: reads the ``coldstart_*_per_user.csv`` files of several
    ``coldstart`` runs (each next to its ``--out`` JSON) and prints / writes the mean and 95%
    bootstrap interval per scenario x k x method (:func:`coldstart_report`).

``cost``
    Chapter 10's cost table: fits the methods once and reports training seconds, adaptation
    milliseconds per test user and parameters (:func:`coldstart_cost`).

``ranking``
    Chapters 5, 7 and 8 on the same episodes as ``coldstart`` (:func:`ranking_benchmark`): every
    method ranks each test user's query films; in-query nDCG@3 and like/dislike AUC, costs. Example:
    ``python -m mrec_utils.benchmark ranking --scenario user-cold --shots 10 --seeds 0 --threads 1``.

``ranking-report``
    Chapter 10's ranking table from several ``ranking`` runs (:func:`ranking_summary`).

Adding a subcommand: write ``_add_<name>_parser(subparsers)`` that creates the sub-parser and
sets ``func=<callable(args) -> int>``, and call it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from mrec_utils import meta, tasks, train
from mrec_utils.data import load_movielens
from mrec_utils.heads import HeadSettings

__all__ = ["SPEED_METHODS", "speed_benchmark", "REPORT_METRICS", "LIVE_SLICE", "load_coldstart_per_user", "coldstart_report",
           "coldstart_cost", "RANKING_METHODS", "RANKING_CHAPTER", "RANKING_METRICS", "RANKING_LIVE_SLICE", "RankingConfig",
           "RankingResult", "ranking_metrics", "ranking_benchmark", "ranking_summary", "load_ranking_per_user",
           "build_parser", "main"]

SPEED_METHODS: dict[str, str] = {
    "vmap": "(a) mrec_utils.meta, vmap over tasks",
    "loop": "(b) same maths, Python loop over tasks",
    "higher": "(c) higher.innerloop_ctx, loop over tasks",
    "vmap_first_order": "(d) first-order MAML, vmap over tasks",
    "bmm": "(e) hand-batched MLP (bmm), no vmap: reference",
}
"""Method keys of :func:`speed_benchmark` and what each one measures."""

_ORDER = {"vmap": "second", "loop": "second", "higher": "second", "vmap_first_order": "first", "bmm": "second"}


def _melu_mlp(input_dim: int, hidden: int) -> nn.Module:
    """The MeLU-sized decision network: input -> hidden -> hidden -> 1 with ReLU."""
    return nn.Sequential(nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _random_batch(n_tasks: int, n_support: int, n_query: int, input_dim: int, seed: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random regression tasks: y = tanh(x · w_task) + noise, all slots real (masks of ones)."""
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


def _higher_available() -> str | None:
    """None if ``higher`` imports, else the reason."""
    try:
        import higher  # noqa: F401
    except Exception as exc:  # ImportError, or an incompatibility raised at import time
        return f"{type(exc).__name__}: {exc}"
    return None


def _higher_backward(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, inner_opt: torch.optim.Optimizer) -> torch.Tensor:
    """Accumulate the second-order MAML meta-gradient into ``model``'s ``.grad`` the way the
    ``higher`` examples do: one ``innerloop_ctx`` per task, made differentiable from the plain
    ``torch.optim.SGD`` inner optimiser ``inner_opt``. Returns the meta-loss (detached)."""
    import higher

    n_tasks = batch["x_support"].shape[0]
    total = torch.zeros((), device=batch["y_query"].device, dtype=batch["y_query"].dtype)
    for t in range(n_tasks):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(steps):
                support_loss = (fmodel(batch["x_support"][t]).squeeze(-1) - batch["y_support"][t]).pow(2).mean()
                diffopt.step(support_loss)
            query_loss = (fmodel(batch["x_query"][t]).squeeze(-1) - batch["y_query"][t]).pow(2).mean() / n_tasks
            query_loss.backward()
            total = total + query_loss.detach()
    return total


def _bmm_backward(model: nn.Module, batch: dict[str, torch.Tensor], steps: int, inner_lr: float) -> torch.Tensor:
    """Accumulate the second-order MAML meta-gradient into ``model``'s ``.grad`` with code written
    for this one network shape (Linear-ReLU-Linear-ReLU-Linear): every task's weights are a slice
    of one ``[T, out, in]`` tensor, each layer is one ``torch.baddbmm`` over all tasks, and the inner
    gradients come from ``torch.autograd.grad(..., create_graph=True)`` of the summed task losses
    (tasks do not share weights, so that is every task's own gradient). No masks, no checks, no
    ``vmap``: how fast eager PyTorch runs this meta-step when nothing is general. Returns the meta-loss."""
    layers = [m for m in model if isinstance(m, nn.Linear)]
    n_tasks = batch["x_support"].shape[0]
    weights = [m.weight.expand(n_tasks, *m.weight.shape) for m in layers]  # [T, out, in], no copy
    biases = [m.bias.expand(n_tasks, *m.bias.shape) for m in layers]  # [T, out]

    def forward(ws: list[torch.Tensor], bs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        h = x  # [T, N, in]
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < len(ws) - 1:
                h = torch.relu(h)
        return h.squeeze(-1)  # [T, N]

    for _ in range(steps):
        support = (forward(weights, biases, batch["x_support"]) - batch["y_support"]).pow(2).mean(1).sum()
        grads = torch.autograd.grad(support, weights + biases, create_graph=True)
        weights = [torch.add(w, g, alpha=-inner_lr) for w, g in zip(weights, grads[: len(weights)])]
        biases = [torch.add(b, g, alpha=-inner_lr) for b, g in zip(biases, grads[len(weights):])]
    query = (forward(weights, biases, batch["x_query"]) - batch["y_query"]).pow(2).mean(1).mean()
    query.backward()
    return query.detach()


def _grad_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def _grad_diff(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |g - ref|, ||g - ref|| / ||ref||) over all parameters, computed in float64."""
    a = torch.cat([g[k].reshape(-1).double().cpu() for k in ref])
    b = torch.cat([ref[k].reshape(-1).double().cpu() for k in ref])
    return (a - b).abs().max().item(), ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return value


def speed_benchmark(
    *,
    input_dim: int = 256,
    hidden: int = 64,
    n_tasks: int = 32,
    n_support: int = 20,
    n_query: int = 10,
    steps: int = 5,
    inner_lr: float = 0.01,
    outer_lr: float = 1e-3,
    warmup: int = 2,
    repeats: int = 10,
    methods: Sequence[str] = tuple(SPEED_METHODS),
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> pd.DataFrame:
    """Time one MAML meta-step (forward, meta-gradient, Adam step) written in several ways.

    Every method starts from the same network (``input_dim -> hidden -> hidden -> 1``, ReLU),
    the same random meta-batch of ``n_tasks`` tasks with ``n_support`` support and ``n_query``
    query examples, ``steps`` inner SGD steps of size ``inner_lr`` and MSE loss. Methods (keys of
    :data:`SPEED_METHODS`): ``vmap`` (a), ``loop`` (b), ``higher`` (c), ``vmap_first_order`` (d), and
    ``bmm`` (e), a reference written by hand for this one network (:func:`_bmm_backward`) that
    shows how much of (a)'s time any eager implementation pays anyway.
    The methods are timed in interleaved rounds (a, b, c, d, e, a, b, ...) so that changes in machine
    load hit them alike; ``warmup`` rounds are discarded, then ``repeats`` rounds are timed.

    Gradient agreement is measured once, on the initial parameters: every second-order method
    against the plain loop (b), the first-order method against a first-order plain loop.

    Args:
        device: ``"cpu"`` (default), ``"cuda"``, ``"auto"`` or a ``torch.device``.
        dtype: floating dtype of model and data.
        methods: subset of :data:`SPEED_METHODS`; ``higher`` is skipped (see ``attrs["skipped"]``)
            when the package cannot be imported.

    Returns:
        One row per method with columns ``method``, ``description``, ``order``,
        ``meta_steps_per_s`` (1 / median wall time), ``median_ms``, ``min_ms``, ``max_ms`` (wall
        clock), ``median_cpu_ms`` (CPU time of this process, all its threads: less sensitive to
        other programs competing for the cores), ``speedup_vs_higher`` (wall-clock throughput ratio), ``grad_max_abs_diff``, ``grad_rel_diff`` (vs the plain loop of the
        same order; NaN for the loop itself). ``DataFrame.attrs`` holds the configuration, torch
        version, device, thread count, load averages before/after and the skipped methods.
    """
    from mrec_utils.train import get_device

    for name, value, low in (("input_dim", input_dim, 1), ("hidden", hidden, 1), ("n_tasks", n_tasks, 1),
                             ("n_support", n_support, 1), ("n_query", n_query, 1), ("steps", steps, 0),
                             ("warmup", warmup, 0), ("repeats", repeats, 1), ("seed", seed, 0)):
        _check_int(name, value, low)
    for name, value in (("inner_lr", inner_lr), ("outer_lr", outer_lr)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}.")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}.")
    if isinstance(methods, str):
        methods = [methods]
    unknown = [m for m in methods if m not in SPEED_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {list(SPEED_METHODS)}, got {list(methods)}.")
    methods = list(dict.fromkeys(methods))
    dev = get_device(device if device is not None else "auto")

    skipped: dict[str, str] = {}
    if "higher" in methods:
        reason = _higher_available()
        if reason is not None:
            skipped["higher"] = f"not importable ({reason}); pip install 'mrec_utils[bench]'"
            methods.remove("higher")
    if not methods:
        raise ValueError(f"no method left to run: {skipped}")

    torch.manual_seed(seed)
    base = _melu_mlp(input_dim, hidden).to(device=dev, dtype=dtype)
    batch = _random_batch(n_tasks, n_support, n_query, input_dim, seed, dev, dtype)
    tb = tasks.TaskBatch(**batch)
    kw = dict(loss_fn=meta.mse_loss_per_example, steps=steps, inner_lr=inner_lr)

    # -- gradient agreement on the initial parameters ------------------------------------------
    p0, f0 = meta.split_params(base)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    _, ref_so = meta.meta_gradient(base, p0, f0, tb, vectorize=False, **kw)
    ref_fo = None
    for m in methods:
        if m == "vmap":
            grads[m] = meta.meta_gradient(base, p0, f0, tb, **kw)[1]
        elif m == "loop":
            grads[m] = ref_so
        elif m == "vmap_first_order":
            grads[m] = meta.meta_gradient(base, p0, f0, tb, first_order=True, **kw)[1]
            ref_fo = meta.meta_gradient(base, p0, f0, tb, first_order=True, vectorize=False, **kw)[1]
        elif m == "higher":
            model = copy.deepcopy(base)
            _higher_backward(model, batch, steps, torch.optim.SGD(model.parameters(), lr=inner_lr))
            grads[m] = _grad_dict(model)
        elif m == "bmm":
            model = copy.deepcopy(base)
            _bmm_backward(model, batch, steps, inner_lr)
            grads[m] = _grad_dict(model)

    # -- one model + outer optimiser per method, all from the same initial weights -------------
    steppers: dict[str, Callable[[], None]] = {}
    for m in methods:
        model = copy.deepcopy(base)
        opt = torch.optim.Adam(model.parameters(), lr=outer_lr)
        params, frozen = meta.split_params(model)
        if m == "higher":
            inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

            def step(model=model, opt=opt, inner_opt=inner_opt) -> None:
                opt.zero_grad(set_to_none=True)
                _higher_backward(model, batch, steps, inner_opt)
                opt.step()
        elif m == "bmm":
            def step(model=model, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                _bmm_backward(model, batch, steps, inner_lr)
                opt.step()
        else:
            def step(model=model, opt=opt, params=params, frozen=frozen, m=m) -> None:
                meta.meta_step(model, params, frozen, tb, opt, vectorize=(m != "loop"), first_order=(m == "vmap_first_order"), **kw)
        steppers[m] = step

    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    times: dict[str, list[float]] = {m: [] for m in methods}
    cpu_times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(warmup + repeats):
        for m in methods:
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            steppers[m]()
            _sync(dev)
            if r >= warmup:
                times[m].append(time.perf_counter() - t0)
                cpu_times[m].append(time.process_time() - c0)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3

    rows = []
    for m in methods:
        med = statistics.median(times[m])
        ref = ref_fo if m == "vmap_first_order" else ref_so
        abs_d, rel_d = (float("nan"), float("nan")) if m == "loop" else _grad_diff(grads[m], ref)
        rows.append({
            "method": m, "description": SPEED_METHODS[m], "order": _ORDER[m],
            "meta_steps_per_s": 1.0 / med, "median_ms": 1e3 * med,
            "min_ms": 1e3 * min(times[m]), "max_ms": 1e3 * max(times[m]),
            "median_cpu_ms": 1e3 * statistics.median(cpu_times[m]),
            "grad_max_abs_diff": abs_d, "grad_rel_diff": rel_d,
        })
    df = pd.DataFrame(rows)
    if "higher" in methods:
        df["speedup_vs_higher"] = df["meta_steps_per_s"] / float(df.loc[df["method"] == "higher", "meta_steps_per_s"].iloc[0])
    else:
        df["speedup_vs_higher"] = float("nan")
    df = df[["method", "description", "order", "meta_steps_per_s", "median_ms", "min_ms", "max_ms",
             "median_cpu_ms", "speedup_vs_higher", "grad_max_abs_diff", "grad_rel_diff"]]
    df.attrs.update({
        "config": dict(input_dim=input_dim, hidden=hidden, n_tasks=n_tasks, n_support=n_support, n_query=n_query,
                       steps=steps, inner_lr=inner_lr, outer_lr=outer_lr, warmup=warmup, repeats=repeats,
                       dtype=str(dtype).replace("torch.", ""), seed=seed),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
        "skipped": skipped,
    })
    return df


# ----------------------------------------------------------------------------------- command line


def _format_speed(df: pd.DataFrame) -> str:
    shown = df.drop(columns=["description"]).copy()
    lines = [shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")]
    a = df.attrs
    lines.append(f"device={a['device']} ({a['device_name']}), torch {a['torch']}, threads={a['threads']}, "
                 f"cpus={a['cpu_count']}, load avg (1/5/15 min) before {a['loadavg_before']} after {a['loadavg_after']}")
    lines.append("config: " + ", ".join(f"{k}={v}" for k, v in a["config"].items()))
    wall = dict(zip(df["method"], df["median_ms"]))
    cpu = dict(zip(df["method"], df["median_cpu_ms"]))
    for fast, slow, what in (("vmap", "higher", "vmap / higher"), ("vmap", "loop", "vmap / loop"),
                             ("bmm", "higher", "hand-batched reference / higher"), ("bmm", "vmap", "hand-batched reference / vmap"),
                             ("vmap_first_order", "vmap", "first-order / second-order (vmap)")):
        if fast in wall and slow in wall:
            lines.append(f"{what} throughput: {wall[slow] / wall[fast]:.1f}x wall clock, {cpu[slow] / cpu[fast]:.1f}x CPU time")
    for m, why in a["skipped"].items():
        lines.append(f"skipped {m}: {why}")
    return "\n".join(lines)


def _write_out(df: pd.DataFrame, out: str) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix.lower() == ".json":
        path.write_text(json.dumps({"meta": df.attrs, "results": json.loads(df.to_json(orient="records"))}, indent=2))
    else:
        raise ValueError(f"--out must end in .csv or .json, got {out!r}.")
    return path


def _run_speed(args: argparse.Namespace) -> int:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    df = speed_benchmark(
        input_dim=args.input_dim, hidden=args.hidden, n_tasks=args.tasks, n_support=args.support,
        n_query=args.query, steps=args.steps, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
        warmup=args.warmup, repeats=args.repeats, methods=args.methods, device=args.device,
        dtype=getattr(torch, args.dtype), seed=args.seed,
    )
    print(_format_speed(df))
    if args.out:
        print(f"wrote {_write_out(df, args.out)}")
    return 0


def _add_speed_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "speed",
        help="meta-steps per second of MAML: vmap vs loop vs higher vs first order",
        description="Time one second-order MAML meta-step (MeLU-sized MLP) written with vmap, a Python loop "
        "and the higher library, plus first-order MAML, and compare their meta-gradients.",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--input-dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--tasks", type=int, default=32, help="tasks per meta-batch")
    p.add_argument("--support", type=int, default=20, help="support examples per task")
    p.add_argument("--query", type=int, default=10, help="query examples per task")
    p.add_argument("--steps", type=int, default=5, help="inner SGD steps")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (the median is reported)")
    p.add_argument("--methods", nargs="+", default=list(SPEED_METHODS), choices=list(SPEED_METHODS))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table to this .csv or .json file")
    p.set_defaults(func=_run_speed)


def _config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["meta.epochs=5", "net.hidden=32,16"]`` -> typed ColdStartSettings overrides (dotted keys)."""
    import dataclasses

    from mrec_utils.coldstart import ColdStartSettings

    defaults = ColdStartSettings()
    fields = {f"{g.name}.{f.name}": f for g in dataclasses.fields(defaults) if dataclasses.is_dataclass(getattr(defaults, g.name))
              for f in dataclasses.fields(getattr(defaults, g.name))}
    fields.update({f.name: f for f in dataclasses.fields(defaults) if not dataclasses.is_dataclass(getattr(defaults, f.name))})
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects KEY=VALUE with KEY one of {', '.join(fields)}; got {pair!r}.")
        group, _, name = key.rpartition(".")
        current = getattr(getattr(defaults, group) if group else defaults, name)
        if current is None:  # e.g. min_ratings: int | None -> the annotation says the type
            current = 0 if "int" in str(fields[key].type) else ""
        try:
            if value.lower() == "none" and (getattr(getattr(defaults, group) if group else defaults, name) is None):
                out[key] = None
            elif isinstance(current, tuple):
                kind = type(current[0]) if current else float
                out[key] = tuple(kind(v) for v in value.split(",") if v)
            elif isinstance(current, bool):
                out[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(current, (int, float)):
                out[key] = type(current)(value)
            else:
                out[key] = value
        except ValueError as exc:
            raise ValueError(f"--set {pair}: {exc}") from exc
    return out


def _run_coldstart(args: argparse.Namespace) -> int:
    from mrec_utils import coldstart

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {args.out!r}.")
    shots: Any = args.shots if args.shots == "melu" else int(args.shots) if args.shots.isdigit() else args.shots
    over = _config_overrides(args.set or [])
    over["net.use_user_features"] = {"auto": "auto", "yes": True, "no": False}[args.user_features]
    if args.no_item_id:
        over["net.use_item_id"] = False
    if args.device:
        over["device"] = args.device
    cfg = coldstart.ColdStartSettings().replace(**over)
    methods = _coldstart_methods(args.methods)
    t0 = time.perf_counter()
    res = coldstart.run_coldstart(load_movielens(args.dataset, args.data_dir), args.scenario, shots, seeds=args.seeds,
                                  methods=methods, settings=cfg, progress=not args.no_progress,
                                  catalogue=not args.no_catalogue)
    table = coldstart.format_table(res.summary)
    with pd.option_context("display.width", 250, "display.max_columns", 40):
        print(table.to_string())
    print(f"{res.settings['dataset']}, {args.scenario}, shots={shots}, seeds={list(args.seeds)}: "
          f"{time.perf_counter() - t0:.0f} s; reference (best non-meta baseline): {res.summary.attrs['reference']}")
    if args.out:
        df = res.summary.reset_index()
        df.attrs = {"settings": res.settings, "reference": res.summary.attrs["reference"]}
        print(f"wrote {_write_out(df, args.out)}")
    if args.per_user:
        res.per_user.to_csv(args.per_user, index=False)
        print(f"wrote {args.per_user}")
    return 0


def _coldstart_methods(names: Sequence[str] | None) -> list | None:
    from mrec_utils.coldstart import METHODS

    bad = [m for m in names or () if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}.")
    return None if names is None else [METHODS[m] for m in names]


def _add_coldstart_parser(subparsers: Any) -> None:
    from mrec_utils.coldstart import METHODS, SCENARIOS

    p = subparsers.add_parser(
        "coldstart",
        help="chapter 5's cold-start comparison: baselines vs meta-learning, same episodes",
        description="Train and evaluate every cold-start method on the same episodes (k-shot support, "
        "10 query ratings per test user) over several seeds; print the table of chapter 5.",
    )
    p.add_argument("--dataset", default="ml-latest-small", help="MovieLens release (ml-latest-small, ml-100k, ml-1m, ...)")
    p.add_argument("--data-dir", default=None, help="folder holding the release (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--scenario", default="user-cold", help=f"one of {', '.join(SCENARIOS)}")
    p.add_argument("--shots", default="10", help="support size k (e.g. 5, 10, 20) or 'melu' for MeLU's preset")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of: {' '.join(METHODS)} (default: all)")
    p.add_argument("--user-features", default="auto", choices=["auto", "yes", "no"],
                   help="use gender/age/occupation (ml-100k, ml-1m); 'yes' fails on releases without them")
    p.add_argument("--no-item-id", action="store_true", help="no item-id embedding (attributes only)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override a ColdStartSettings field, e.g. meta.epochs=20")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--no-catalogue", action="store_true", help="skip the full-catalogue HR@10 / nDCG@10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="write the summary table to this .csv or .json file")
    p.add_argument("--per-user", default=None, help="also write the per-user metrics to this .csv file")
    p.set_defaults(func=_run_coldstart)


# ----------------------------------------------------------------------------------- chapter 10


REPORT_METRICS: tuple[str, ...] = ("mae", "rmse", "ndcg@3", "hr@10", "ndcg@10")
"""Metrics of :func:`coldstart_report` (``rmse`` is computed from the per-user ``mse``)."""

LIVE_SLICE: dict[str, Any] = {
    "scenario": "user-cold", "shots": 10, "seeds": (0,),
    "methods": ("global_mean", "item_mean", "mf_foldin", "net", "net_finetune", "melu"),
}
"""The slice of the committed sweep that chapter 10 re-runs live and ``tests/test_benchmark_results.py``
re-computes: ``run_coldstart("ml-latest-small", **LIVE_SLICE)`` with one CPU thread must reproduce the
file ``benchmarks/results/coldstart_user-cold_k10_per_user.csv`` (seed 0, these methods)."""


def load_coldstart_per_user(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read the ``--per-user`` CSV files of several ``coldstart`` runs into one frame.

    Each file must sit next to the run's ``--out`` JSON of the same stem (``<stem>.json`` for
    ``<stem>_per_user.csv``), which names the scenario and the shots; they become the columns
    ``scenario`` and ``k``.

    Returns:
        one row per (scenario, k, seed, method, test user) with the metrics of
        :func:`mrec_utils.coldstart.evaluate` and ``fit_seconds``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    frames = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found; run benchmarks/run_all.sh to produce it.")
        meta_path = p.with_name(p.name.replace("_per_user.csv", ".json"))
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} (the run's --out JSON) not found next to {p}.")
        settings = json.loads(meta_path.read_text())["meta"]["settings"]
        df = pd.read_csv(p)
        df.insert(0, "k", settings["shots"])
        df.insert(0, "scenario", settings["scenario"])
        frames.append(df)
    if not frames:
        raise ValueError("no per-user files given.")
    return pd.concat(frames, ignore_index=True)


def coldstart_report(per_user: pd.DataFrame, metrics_: Sequence[str] = REPORT_METRICS, n_boot: int = 2000,
                     seed: int = 0) -> pd.DataFrame:
    """Mean and 95% bootstrap interval of each metric per scenario x k x method.

    The interval resamples the evaluated (seed, test user) pairs (percentile bootstrap,
    :func:`mrec_utils.metrics.bootstrap_ci`); RMSE is the square root of the mean squared error,
    its interval the square root of the MSE interval. Users without a relevant query item have
    NaN HR@10 / nDCG@10 and are left out of those two.

    Args:
        per_user: :func:`load_coldstart_per_user` output (columns scenario, k, seed, method, user_id, metrics).

    Returns:
        DataFrame indexed by (scenario, k, method) with ``<metric>``, ``<metric> low``,
        ``<metric> high`` per metric, ``seeds`` and ``users`` (evaluated pairs).
    """
    from mrec_utils.coldstart import METHODS

    need = {"scenario", "k", "seed", "method", "user_id", "mae", "mse"}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise ValueError(f"per_user must be a DataFrame with the columns {sorted(need)} (see load_coldstart_per_user).")
    return _mean_interval_table(per_user, ["scenario", "k", "method"], metrics_, list(METHODS), n_boot, seed)


def _mean_interval_table(per_user: pd.DataFrame, keys: list[str], metrics_: Sequence[str], order: Sequence[str],
                         n_boot: int, seed: int) -> pd.DataFrame:
    """Mean and 95% percentile-bootstrap interval of each metric per group of ``keys`` (``rmse`` from
    ``mse``; NaN values left out), sorted by scenario (chapter 2's order), k and ``order`` of methods."""
    from mrec_utils import metrics
    from mrec_utils.coldstart import SCENARIOS

    rows = []
    for key, d in per_user.groupby(keys, sort=False):
        row: dict[str, Any] = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        for name in metrics_:
            col = "mse" if name == "rmse" else name
            if col not in d:
                continue
            v = d[col].dropna().to_numpy(float)
            if len(v) < 2:
                est = lo = hi = float(v.mean()) if len(v) else float("nan")
            else:
                ci = metrics.bootstrap_ci(v, n_boot=n_boot, seed=seed)
                est, lo, hi = ci.estimate, ci.low, ci.high
            if name == "rmse":
                est, lo, hi = (float(np.sqrt(x)) for x in (est, lo, hi))
            row.update({name: est, f"{name} low": lo, f"{name} high": hi})
        row["seeds"] = d["seed"].nunique()
        row["users"] = len(d)
        rows.append(row)
    out = pd.DataFrame(rows)
    sort = []
    if "scenario" in keys:
        out["_s"] = out["scenario"].map({s: i for i, s in enumerate(SCENARIOS)})
        sort.append("_s")
    if "k" in keys:
        sort.append("k")
    out["_m"] = out["method"].map({s: i for i, s in enumerate(order)}).fillna(len(order))
    out = out.sort_values(sort + ["_m"]).drop(columns=[c for c in ("_s", "_m") if c in out]).set_index(keys)
    return out


def _n_params(module: nn.Module, spec: Any = None) -> int:
    return sum(v.numel() for v in (meta.split_params(module, spec)[0] if spec is not None else dict(module.named_parameters())).values())


def coldstart_cost(result: Any, repeats: int = 3) -> pd.DataFrame:
    """Cost of each fitted method of a :class:`mrec_utils.coldstart.ColdStartResult`.

    Columns: ``method``, ``train s`` (mean seconds to fit over the result's seeds, validation
    choices included), ``adapt ms / user`` (median over ``repeats`` of the wall time to adapt to
    and predict the query ratings of every test user at once, divided by the number of users;
    no catalogue), ``parameters`` (learned numbers), ``adapted / user`` (numbers changed for
    each new user). Timings depend on the machine and its load (``attrs["loadavg"]``).
    """
    import numpy as np

    from mrec_utils.coldstart import ColdStartResult, METHODS
    from mrec_utils.models import melu_adapt_spec

    if not isinstance(result, ColdStartResult):
        raise TypeError(f"result must be a ColdStartResult (run_coldstart's output), got {type(result).__name__}.")
    _check_int("repeats", repeats, 1)
    rows = []
    seeds = sorted({s for s, _ in result.fitted})
    for m in [m for m in METHODS if any(mm == m for _, mm in result.fitted)]:
        fits = [result.fitted[s, m] for s in seeds if (s, m) in result.fitted]
        f, data = fits[0], result.data[seeds[0]]
        n_cat, info = data.features.n_items, f.info
        if m == "global_mean":
            n_par, n_ad = 1, 0
        elif m == "item_mean":
            n_par, n_ad = n_cat, 0
        elif m == "mf_foldin":
            mf = info.mf
            n_par = 1 + sum(t.numel() for t in (mf.item_factors, mf.item_bias, mf.user_factors, mf.user_bias))
            n_ad = mf.item_factors.shape[1] + 1
        elif m == "protonet":
            n_par, n_ad = _n_params(info.model), 0
        else:
            model = info.model
            n_par = _n_params(model)
            n_ad = 0 if info.steps == 0 else _n_params(model, melu_adapt_spec(info.adapt))
        times = []
        for _ in range(repeats):
            _sync(data.device)
            t0 = time.perf_counter()
            f.predict(data.test, data.test_users, False)
            _sync(data.device)
            times.append(time.perf_counter() - t0)
        rows.append({"method": m, "train s": float(np.mean([x.seconds for x in fits])),
                     "adapt ms / user": 1e3 * statistics.median(times) / len(data.test),
                     "parameters": int(n_par), "adapted / user": int(n_ad)})
    out = pd.DataFrame(rows)
    out.attrs.update({"settings": {k: v for k, v in result.settings.items() if k != "config"},
                      "device": str(result.data[seeds[0]].device), "threads": torch.get_num_threads(),
                      "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None})
    return out


def _write_table(df: pd.DataFrame, out: str) -> list[Path]:
    """Write ``df`` (index reset) to ``out`` and to the same stem with the other suffix (.csv and .json)."""
    base = Path(out)
    if base.suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {out!r}.")
    flat = df.reset_index() if df.index.name or any(df.index.names) else df
    flat.attrs = dict(df.attrs)
    return [_write_out(flat, str(base.with_suffix(s))) for s in (".csv", ".json")]


def _run_report(args: argparse.Namespace) -> int:
    folder = Path(args.results)
    files = sorted(folder.glob("coldstart_*_per_user.csv"))
    if not files:
        raise FileNotFoundError(f"no coldstart_*_per_user.csv in {folder}; run benchmarks/run_all.sh first.")
    rep = coldstart_report(load_coldstart_per_user(files), seed=args.seed)
    rep.attrs = {"files": [f.name for f in files], "interval": "95% percentile bootstrap over (seed, test user) pairs"}
    with pd.option_context("display.width", 250, "display.max_columns", 40, "display.max_rows", 500):
        print(rep[[c for c in rep.columns if c in ("mae", "mae low", "mae high", "ndcg@10", "ndcg@10 low", "ndcg@10 high", "users")]]
              .round(3).to_string())
    if args.out:
        for p in _write_table(rep, args.out):
            print(f"wrote {p}")
    return 0


def _run_cost(args: argparse.Namespace) -> int:
    from mrec_utils import coldstart

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    cfg = coldstart.ColdStartSettings(device=args.device or None)
    shots: Any = args.shots if args.shots == "melu" else int(args.shots)
    res = coldstart.run_coldstart(load_movielens(args.dataset, args.data_dir), args.scenario, shots, seeds=args.seeds,
                                  methods=_coldstart_methods(args.methods), settings=cfg, progress=False, catalogue=False)
    cost = coldstart_cost(res, repeats=args.repeats)
    print(cost.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"device={cost.attrs['device']}, threads={cost.attrs['threads']}, load avg {cost.attrs['loadavg']}")
    if args.out:
        for p in _write_table(cost, args.out):
            print(f"wrote {p}")
    return 0


def _add_report_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "report", help="chapter 10's table: mean and 95%% interval per scenario x k x method from coldstart runs",
        description="Aggregate the per-user files of several coldstart runs (coldstart_*_per_user.csv next to "
        "their --out .json) into one table: mean and 95 percent bootstrap interval of MAE, RMSE, nDCG@3, HR@10, "
        "nDCG@10 per scenario x k x method.")
    p.add_argument("--results", default="benchmarks/results", help="folder holding the coldstart_* files")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="write the table to this .csv and the matching .json")
    p.set_defaults(func=_run_report)


def _add_cost_parser(subparsers: Any) -> None:
    from mrec_utils.coldstart import METHODS

    p = subparsers.add_parser(
        "cost", help="chapter 10's cost table: training time, adaptation time per user, parameters",
        description="Fit the cold-start methods once and report training seconds, adaptation milliseconds "
        "per test user and the number of learned / per-user adapted parameters.")
    p.add_argument("--dataset", default="ml-latest-small")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--scenario", default="user-cold")
    p.add_argument("--shots", default="10")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of: {' '.join(METHODS)} (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed adaptation repeats (median)")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the table to this .csv and the matching .json")
    p.set_defaults(func=_run_cost)


# ----------------------------------------------------------------------------------- chapter 8


def _run_gpt_meta(args: argparse.Namespace) -> int:
    from mrec_utils import data, heads, lm, metrics

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ml = data.load_movielens(args.dataset, data_dir=args.data_dir)
    res = heads.head_study(ml, methods=args.methods, ks=args.k, n_folds=args.folds, seed=args.seed,
                           llm=None if args.lm is None else lm.load_causal_lm(args.lm))
    rows = []
    for k, m in res[["k", "method"]].drop_duplicates().itertuples(index=False):
        both = res[res.k == k].pivot_table(index="user_id", columns="method", values="auc")[[m, "global"]].dropna()
        d = metrics.paired_bootstrap_ci(both[m], both["global"], seed=args.seed) if m != "global" else None
        rows.append({"k": k, "method": m, "users": len(both), "AUC": both[m].mean(),
                     "AUC - global [95%]": "" if d is None else f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"})
    print(pd.DataFrame(rows).round(4).to_string(index=False))
    print(f"{args.dataset}: {res.attrs['split']}; choices {res.attrs['choices']}; {time.perf_counter() - t0:.0f} s")
    if args.out:
        print(f"wrote {_write_out(res.assign(k=res.k.astype(str)), args.out)}")
    return 0


def _add_gpt_meta_parser(subparsers: Any) -> None:
    from mrec_utils.heads import HEAD_METHODS

    p = subparsers.add_parser(
        "gpt-meta",
        help="chapter 9: user heads on LM item features, K-fold over users (query AUC, nDCG@10)",
        description="Chapter 9's study (mrec_utils.heads.head_study): embed the catalogue's item texts with a causal LM "
        "(cached), choose the settings on validation users, then evaluate the heads K-fold over users.",
    )
    p.add_argument("--dataset", default="ml-latest-small", help="MovieLens release")
    p.add_argument("--data-dir", default=None, help="folder holding the release (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--lm", default=None, help="language model: a Hugging Face id or path (default: the offline SmolLM2 GGUF)")
    p.add_argument("--k", nargs="+", type=int, default=[4, 8, 16, 32], help="support sizes")
    p.add_argument("--methods", nargs="+", default=["global", "finetune", "maml", "fomaml", "anil", "residual"],
                   choices=list(HEAD_METHODS))
    p.add_argument("--folds", type=int, default=5, help="folds over users (chapter 9: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--out", default=None, help="write the per-user rows to this .csv or .json file")
    p.set_defaults(func=_run_gpt_meta)


# ----------------------------------------------------------------------------------- chapters 5, 7 and 8 on the same episodes

RANKING_METHODS: dict[str, str] = {
    "global_mean": "ch. 5: the training mean (every film ties)",
    "item_mean": "ch. 5: damped mean rating of the film",
    "mf_foldin": "ch. 5: matrix factorisation, user folded in from the support",
    "net": "ch. 5: MeLU-style network, no adaptation",
    "net_finetune": "ch. 5: the same network fine-tuned on the support",
    "maml": "ch. 5: MAML",
    "fomaml": "ch. 5: first-order MAML",
    "melu": "ch. 5: MeLU (decision layers adapted)",
    "reptile": "ch. 5: Reptile",
    "protonet": "ch. 5: prototypical head",
    "popularity": "ch. 7: how many training users rated the film",
    "cooccurrence": "ch. 7: co-occurrence counts with the last m support films",
    "item_gpt": "ch. 7: item-GPT next-film logit after reading the support films (in context)",
    "head_global": "ch. 8: one like-head on LM text features for everybody",
    "head_logreg": "ch. 8: per-user logistic regression on LM features, from scratch",
    "head_finetune": "ch. 8: the global head fine-tuned on the support",
    "head_maml": "ch. 8: MAML head",
    "head_fomaml": "ch. 8: first-order MAML head",
    "head_anil": "ch. 8: ANIL head (only the last layer adapted)",
    "head_reptile": "ch. 8: Reptile head",
    "head_proto": "ch. 8: prototypical network on LM features",
    "head_residual": "ch. 8: Meta-SGD residual head (global head + per-user linear term)",
}
"""Methods of :func:`ranking_benchmark`: chapter 5's rating models (they rank the query films by
predicted rating), chapter 7's id-based sequence models and chapter 8's like-heads on frozen LM text
features."""

RANKING_CHAPTER: dict[str, int] = {m: 5 if i < 10 else 7 if i < 13 else 8 for i, m in enumerate(RANKING_METHODS)}
"""The chapter of each method of :data:`RANKING_METHODS` (5, 7 or 8)."""

_CH7 = ("popularity", "cooccurrence", "item_gpt")
_HEAD_OF = {"head_global": "global", "head_logreg": "logreg", "head_finetune": "finetune", "head_maml": "maml",
            "head_fomaml": "fomaml", "head_anil": "anil", "head_reptile": "reptile", "head_proto": "proto",
            "head_residual": "residual"}
RANKING_METRICS: tuple[str, ...] = ("ndcg@3", "auc")
"""Per-user metrics of :func:`ranking_metrics`: in-query nDCG@3 (graded) and like/dislike AUC."""

RANKING_LIVE_SLICE: dict[str, Any] = {
    "scenario": "user-cold", "shots": 10, "seeds": (0,),
    "methods": ("popularity", "cooccurrence", "item_gpt", *_HEAD_OF),
}
"""The slice of the committed ranking sweep that chapter 10 re-runs live and ``tests/test_benchmark_results.py``
re-computes: ``ranking_benchmark("ml-latest-small", **RANKING_LIVE_SLICE)`` with one CPU thread must
reproduce ``benchmarks/results/ranking_user-cold_k10_per_user.csv`` (seed 0, these methods). Chapter 5's
methods are left out: :data:`LIVE_SLICE` re-runs them already, and the test checks that the ranking files
hold the same nDCG@3 for them as the coldstart files (same episodes, same models)."""


_HEADS = HeadSettings()


@dataclasses.dataclass(frozen=True)
class RankingConfig:
    """Settings of :func:`ranking_benchmark` for chapters 7 and 8 (chapter 5's are :class:`mrec_utils.coldstart.ColdStartSettings`).

    Chapter 7: ``vocab_min_count`` (a film is a GPT token when it has this many training ratings),
    the GPT's size (``gpt_max_len``, ``gpt_embd``, ``gpt_layers``, ``gpt_heads``, ``gpt_dropout``),
    ``gpt_members`` GPTs of seeds ``seed, seed + 1, ...`` trained in lockstep and averaged (chapter 7
    trains one), their training (warm start from co-occurrence embeddings, AdamW ``gpt_lr``, ``gpt_batch``, at most
    ``gpt_epochs`` epochs, early stopping after ``gpt_patience`` epochs without progress on the
    validation episodes) and the co-occurrence grid (``cooc_windows`` x ``cooc_lasts``, chosen on the
    validation episodes). Chapter 8: the LM (``lm``: None = the offline default), ``layers`` used for
    the embeddings, PCA ``components``, the head catalogue (films with ``min_item_count`` training
    ratings), ``d_proj``, training steps, the inner loop (``inner_steps``, ``inner_lr``), ``outer_lr``,
    the Meta-SGD residual head (``residual_*``; validation users choose a meta-learned or a zero
    start and the checkpoint), and the grids the validation users choose from (``logreg_l2s``,
    ``finetune_grid``). These are the
    settings of chapters 7 and 8 (the heads' defaults are :class:`mrec_utils.heads.HeadSettings`); the
    GPT trains for at most 10 epochs here (chapter 7 allows 20; with patience 2 both stop within the first few).
    """

    like_threshold: float = 4.0
    vocab_min_count: int = 5
    gpt_max_len: int = 50
    gpt_embd: int = 64
    gpt_layers: int = 2
    gpt_heads: int = 2
    gpt_dropout: float = 0.2
    gpt_members: int = 1
    gpt_epochs: int = 10
    gpt_batch: int = 16
    gpt_lr: float = 1e-3
    gpt_patience: int = 2
    cooc_windows: tuple[int, ...] = (1, 2, 5, 10)
    cooc_lasts: tuple[int, ...] = (1, 2, 5, 10)
    lm: str | None = None
    layers: int = 8
    components: int = 64
    min_item_count: int = 25
    # the heads' settings, defaults from chapter 8's HeadSettings (one source for both)
    d_proj: int = _HEADS.d_proj
    global_steps: int = _HEADS.global_steps
    meta_steps: int = _HEADS.meta_steps
    proto_steps: int = _HEADS.proto_steps
    inner_steps: int = _HEADS.inner_steps
    inner_lr: float = _HEADS.inner_lr
    outer_lr: float = _HEADS.outer_lr
    residual_steps: int = _HEADS.residual_steps
    residual_init_lr: float = _HEADS.residual_init_lr
    residual_outer_lr: float = _HEADS.residual_outer_lr
    residual_outer_loss: str = _HEADS.residual_outer_loss
    residual_eval_every: int = _HEADS.residual_eval_every
    logreg_l2s: tuple[float, ...] = _HEADS.logreg_l2s
    finetune_grid: tuple[tuple[int, float], ...] = _HEADS.finetune_grid

    def head_settings(self) -> HeadSettings:
        """The heads' fields as :class:`mrec_utils.heads.HeadSettings` (for :func:`~mrec_utils.heads.fit_heads`)."""
        return HeadSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(HeadSettings)})


def ranking_metrics(scores: Any, ratings: Any, mask: Any, like_threshold: float = 4.0) -> pd.DataFrame:
    """Per-episode ranking quality of the query films.

    Args:
        scores: [T, Q] any method's scores (higher = ranked first); finite on real slots.
        ratings: [T, Q] the query ratings; mask: [T, Q] bool, True on real query films.

    Returns:
        DataFrame, one row per episode: ``ndcg@3`` (gains ``2**r - 1``, tied scores averaged: chapter
        5's in-query nDCG@3), ``auc`` (like = rating >= ``like_threshold``; tied scores count 1/2; NaN
        when the query holds one class only), ``n_like``, ``n_query``.
    """
    from mrec_utils import metrics

    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    y = np.asarray(ratings.detach().cpu() if isinstance(ratings, torch.Tensor) else ratings, dtype=np.float64)
    m = np.asarray(mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask, dtype=bool)
    if s.ndim != 2 or s.shape != y.shape or s.shape != m.shape:
        raise ValueError(f"scores, ratings and mask must have one shape [T, Q], got {s.shape}, {y.shape}, {m.shape}.")
    if not np.isfinite(s[m]).all():
        raise ValueError("scores contain NaN or inf on real query films.")
    like = (y >= like_threshold) & m
    aucs = [metrics.auc(like[t][m[t]], s[t][m[t]]) if 0 < like[t].sum() < m[t].sum() else np.nan for t in range(len(s))]
    return pd.DataFrame({
        "ndcg@3": metrics.ndcg_at_k_batch(np.where(m, y, 0), np.where(m, s, 0), 3, ties="average", mask=m),
        "auc": np.array(aucs, dtype=np.float64), "n_like": like.sum(1), "n_query": m.sum(1),
    })


def _lowest_for_unknown(full: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Gather ``full [T, n_items]`` at ``idx [T, Q]``; unknown films (idx < 0) score below every known one."""
    q = np.take_along_axis(full, np.clip(idx, 0, None), axis=1).astype(np.float64)
    floor = full.min(axis=1, keepdims=True).astype(np.float64) - 1.0
    return np.where(idx >= 0, q, floor)


class _Ch7:
    """Chapter 7's id-based models on one seed's split: vocabulary, popularity, co-occurrence, item-GPT."""

    def __init__(self, d: Any, cfg: RankingConfig, methods: Sequence[str], progress: bool) -> None:
        from mrec_utils import gpt as models

        self.models, self.cfg = models, cfg
        vocab = models.build_item_vocab(d.train, min_count=cfg.vocab_min_count)
        self.index = pd.Index(vocab)
        self.n = len(vocab)
        self.train_seq = models.user_sequences(d.train, vocab, seed=d.seed)
        self.pop = models.popularity_scores(self.train_seq, self.n)
        self.fit: dict[str, float] = {"popularity": 0.0}
        self.info: dict[str, Any] = {"vocabulary": self.n}
        val_p, val_q = self.encode(d.val_episodes)
        tst_p, tst_q = self.encode(d.test_episodes)
        # does any evaluation episode have a known support film and a known query film?
        self.useful = any(len(p) and (q >= 0).any() for p, q in zip(val_p + tst_p, list(val_q) + list(tst_q)))
        self.info["test users with an empty prompt"] = int(sum(len(p) == 0 for p in tst_p))
        self.info["test query films unknown to the GPT"] = float((tst_q < 0)[d.test.mask_query.cpu().numpy()].mean())
        self.counts = self.last = self.gpt = None
        if "cooccurrence" in methods and self.useful:
            t0 = time.perf_counter()
            y, m = d.val.y_query.cpu().numpy(), d.val.mask_query.cpu().numpy()
            counts = {w: models.cooccurrence_counts(self.train_seq, self.n, window=w) for w in cfg.cooc_windows}
            val_ndcg = {(w, last): float(np.nanmean(ranking_metrics(self._cooc(counts[w], last, val_p, val_q), y, m)["ndcg@3"]))
                        for w in cfg.cooc_windows for last in cfg.cooc_lasts}
            w, self.last = train.pick_best(val_ndcg, val_ndcg.get)
            self.counts = counts[w]
            self.info.update(cooc_window=w, cooc_last=self.last)
            self.fit["cooccurrence"] = time.perf_counter() - t0
        if "item_gpt" in methods and self.useful:
            t0 = time.perf_counter()
            warm = models.cooccurrence_embeddings(models.cooccurrence_counts(self.train_seq, self.n, window=5),
                                                  dim=cfg.gpt_embd, seed=d.seed)
            gpt_settings = models.ItemGPTSettings(max_len=cfg.gpt_max_len, n_embd=cfg.gpt_embd, n_layer=cfg.gpt_layers,
                                                  n_head=cfg.gpt_heads, dropout=cfg.gpt_dropout, epochs=cfg.gpt_epochs,
                                                  batch_size=cfg.gpt_batch, lr=cfg.gpt_lr, patience=cfg.gpt_patience)
            members = [models.make_item_gpt(self.n, gpt_settings, seed=d.seed + i, item_vectors=warm).to(d.device)
                       for i in range(cfg.gpt_members)]
            self.gpt = members[0] if len(members) == 1 else members  # a list: scores average the members' log-probabilities
            # validation cases: each known query film of a validation episode, after its known support films
            cases = [(p, int(t)) for p, q in zip(val_p, val_q) if len(p) for t in q if t >= 0]
            val = ([c[0] for c in cases], np.array([c[1] for c in cases], dtype=np.int64)) if cases else None
            log = models.train_item_gpt(self.gpt, self.train_seq, gpt_settings, seed=d.seed, val=val, progress=progress)
            self.info.update(gpt_best_epoch=log.best_epoch, gpt_epochs_run=len(log.losses))
            self.fit["item_gpt"] = time.perf_counter() - t0

    def encode(self, episodes: Sequence[Any]) -> tuple[list[np.ndarray], np.ndarray]:
        """Support films as vocabulary indices in time order (unknown ones dropped), query films [T, Q] (-1 = unknown)."""
        prompts = [(lambda r: r[r >= 0])(self.index.get_indexer(e.support_items)) for e in episodes]
        width = max(len(e.query_items) for e in episodes)
        q = np.full((len(episodes), width), -1, dtype=np.int64)
        for t, e in enumerate(episodes):
            q[t, : len(e.query_items)] = self.index.get_indexer(e.query_items)
        return prompts, q

    def _cooc(self, counts: np.ndarray, last: int, prompts: list[np.ndarray], q: np.ndarray) -> np.ndarray:
        full = np.tile(1e-6 * self.pop / max(self.pop.max(), 1e-12), (len(prompts), 1))  # empty prompt: the tie-breaker
        rows = [i for i, p in enumerate(prompts) if len(p)]
        if rows:
            full[rows] = self.models.cooccurrence_scores(counts, [prompts[i] for i in rows], last=last, popularity=self.pop)
        return _lowest_for_unknown(full, q)

    def scores(self, method: str, episodes: Sequence[Any]) -> np.ndarray:
        prompts, q = self.encode(episodes)
        if method == "popularity":
            return _lowest_for_unknown(np.tile(self.pop, (len(prompts), 1)), q)
        if not self.useful:  # no evaluation episode has a known film: nothing to rank with (all tie)
            return np.zeros(q.shape)
        if method == "cooccurrence":
            return self._cooc(self.counts, self.last, prompts, q)
        full = np.zeros((len(prompts), self.n), dtype=np.float64)  # empty prompt: every query film ties
        rows = [i for i, p in enumerate(prompts) if len(p)]
        if rows:
            full[rows] = self.models.score_next_items(self.gpt, [prompts[i] for i in rows])
        out = _lowest_for_unknown(full, q)
        out[[i for i, p in enumerate(prompts) if not len(p)]] = 0.0
        return out

    def size(self, method: str) -> tuple[int, int]:
        """(learned numbers, numbers adapted per user)."""
        if method == "popularity":
            return self.n, 0
        if method == "cooccurrence":
            return (int(np.count_nonzero(self.counts)) if self.counts is not None else 0), 0
        members = [] if self.gpt is None else self.gpt if isinstance(self.gpt, list) else [self.gpt]
        return sum(p.numel() for m in members for p in m.parameters()), 0


class _Ch8:
    """Chapter 8's like-heads on frozen LM text features for one seed's split."""

    def __init__(self, d: Any, ml: Any, llm: Any, cfg: RankingConfig, methods: Sequence[str]) -> None:
        from mrec_utils import data, heads as gm, lm

        self.gm, self.cfg = gm, cfg
        counts = d.train.item_id.value_counts()
        catalogue = np.sort(counts.index[counts.to_numpy() >= cfg.min_item_count].to_numpy().astype(np.int64))
        eps = list(d.val_episodes) + list(d.test_episodes)
        need = np.unique(np.concatenate([catalogue] + [e.support_items for e in eps] + [e.query_items for e in eps]).astype(np.int64))
        texts = data.item_text(ml.items, ml.tags).reindex(need)
        if texts.isna().any():
            raise ValueError(f"films without text: {need[texts.isna().to_numpy()][:5].tolist()}")
        t0 = time.perf_counter()
        raw = lm.embed_texts(texts.tolist(), llm, layers=cfg.layers, pooling="mean", normalize=True, progress=False)
        self.embed_seconds, self.n_texts = time.perf_counter() - t0, len(need)
        # PCA fitted on the head catalogue only, so an item's features do not depend on which episodes were drawn
        feats = gm.lm_item_features(raw, n_components=cfg.components, fit_rows=np.searchsorted(need, catalogue))
        dev = d.device
        feat_t = torch.as_tensor(feats, device=dev)
        pools = gm.rating_pools(d.train[d.train.item_id.isin(catalogue)], need)
        self.val = gm.like_tasks(d.val_episodes, feats, need, device=dev)  # a like is a rating >= heads.LIKE
        self.feats, self.need = feats, need
        self.info: dict[str, Any] = {"head catalogue": int(len(catalogue)), "texts embedded": int(len(need))}
        heads = gm.fit_heads(pools, feat_t, [self.val], [_HEAD_OF[m] for m in methods if m in _HEAD_OF],
                             cfg.head_settings(), seed=d.seed)
        sec, ch = heads.seconds, heads.choices
        self.fn, self.heads = heads.scorers, heads.heads
        # what a method costs to fit: the meta-learners and fine-tuning start from the global head
        self.fit: dict[str, float] = {"global": sec["global"]}
        for name, key in (("logreg", "logreg (choice)"), ("proto", "proto")):
            if key in sec:
                self.fit[name] = sec[key]
        for name, key in (("finetune", "finetune (choice)"), ("maml", "maml"), ("fomaml", "fomaml"), ("anil", "anil"),
                          ("reptile", "reptile"), ("residual", "residual")):
            if key in sec:
                self.fit[name] = sec["global"] + sec[key]
        if "logreg_l2" in ch:
            self.info["logreg_l2"] = ch["logreg_l2"]
        if "finetune" in ch:
            self.info["finetune"] = list(ch["finetune"])
        if "residual_learn_init" in ch:
            self.info["residual_learn_init"], self.residual_lrs = ch["residual_learn_init"], ch["residual_lrs"]

    def tasks(self, episodes: Sequence[Any]) -> Any:
        """Episodes -> like tasks (:func:`mrec_utils.heads.like_tasks`) on the LM features."""
        return self.gm.like_tasks(episodes, self.feats, self.need, device=self.val.x_support.device)

    def size(self, method: str) -> tuple[int, int]:
        """(learned numbers, numbers adapted per user); the frozen LM is counted apart."""
        name = _HEAD_OF[method]
        if name == "logreg":
            return 0, int(self.feats.shape[1]) + 1
        if name == "proto":
            return sum(p.numel() for p in self.heads["proto"].body.parameters()), 0
        model = self.heads.get(name, self.heads["global"])
        n = sum(p.numel() for p in model.parameters())
        if name == "global":
            return n, 0
        if name == "anil":
            return n, sum(p.numel() for p in model.head.parameters())
        if name == "residual":  # the frozen global head, the per-user start and one step size per adapted number
            ad = sum(getattr(model, a).numel() for a in model.ADAPT)
            return sum(p.numel() for p in model.base.parameters()) + ad + sum(v.numel() for v in self.residual_lrs.values()), ad
        return n, n


@dataclasses.dataclass
class RankingResult:
    """Output of :func:`ranking_benchmark`.

    Attributes:
        per_user: one row per (seed, method, test user): ``seed``, ``method``, ``chapter``, ``user_id``,
            ``ndcg@3``, ``auc``, ``n_like``, ``n_query``.
        summary: :func:`ranking_summary` of ``per_user`` (mean and 95% interval per method).
        cost: one row per (seed, method): ``train s``, ``adapt ms / user``, ``parameters``, ``adapted / user``.
        info: per seed, what was chosen on validation users and how much of the episodes each model knows.
        settings: the run's arguments and configurations.
    """

    per_user: pd.DataFrame
    summary: pd.DataFrame
    cost: pd.DataFrame
    info: dict
    settings: dict


def _ranking_order(methods: Sequence[str]) -> list[str]:
    return [m for m in RANKING_METHODS if m in set(methods)]


def ranking_summary(per_user: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean and 95% percentile-bootstrap interval of nDCG@3 and AUC per method (over (seed, user) pairs;
    users whose query holds one class only are left out of the AUC)."""
    need = {"seed", "method", "user_id", *RANKING_METRICS}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise ValueError(f"per_user must be a DataFrame with the columns {sorted(need)} (ranking_benchmark's per_user).")
    keys = [c for c in ("scenario", "k") if c in per_user.columns] + ["method"]
    return _mean_interval_table(per_user, keys, RANKING_METRICS, _ranking_order(per_user["method"].unique()), n_boot, seed)


def ranking_benchmark(
    dataset: Any = "ml-latest-small",
    scenario: str = "user-cold",
    shots: int = 10,
    seeds: Sequence[int] = (0,),
    methods: Sequence[str] | None = None,
    *,
    config: RankingConfig | None = None,
    coldstart_config: Any = None,
    data_dir: Any = None,
    llm: Any = None,
    progress: bool = False,
    **split_kwargs: Any,
) -> RankingResult:
    """Chapters 5, 7 and 8 on chapter 5's episodes: every method ranks every test user's query films.

    Per seed, :func:`mrec_utils.coldstart.prepare_data` draws the split and the episodes exactly as
    ``benchmark coldstart`` does (k support and 10 query ratings per test user). Then every method
    scores the query films of every test episode, knowing only the training ratings and the episode's
    k support ratings:

    * chapter 5's rating models (:data:`mrec_utils.coldstart.METHODS`): the predicted rating;
    * chapter 7 (:mod:`mrec_utils.gpt`), with films as tokens of a vocabulary of films with
      ``vocab_min_count`` training ratings: ``popularity``; ``cooccurrence`` with the support films
      (window and history length chosen on validation episodes); ``item_gpt``: the next-film score
      of chapter 7's GPT (with ``gpt_members > 1``, log-probabilities averaged) after reading the
      support films in time order (no gradient step). A film outside the
      vocabulary (every new film of item-cold) has no token: it scores below every known film, ties
      with the other unknown ones, and a support film outside it is left out of the prompt. With an
      empty prompt the GPT is not asked and every query film ties; when no evaluation episode has a
      known support and query film, the GPT is not trained (its scores would all tie anyway);
    * chapter 9 (:mod:`mrec_utils.heads`): like-heads on frozen LM embeddings of the films' text
      (:func:`mrec_utils.lm.embed_texts`, ``layers`` blocks, cached on disk), adapted on the k
      support like/dislike labels; trained on the training ratings of films with ``min_item_count``
      training ratings; every film of the episodes has a text, so new films are scored too.

    Metrics (:func:`ranking_metrics`): in-query nDCG@3 with graded gains, and like/dislike AUC.

    Args:
        dataset: a MovieLens release name (or a loaded :class:`mrec_utils.data.MovieLens`).
        scenario, shots, seeds: as for :func:`mrec_utils.coldstart.run_coldstart` (shots an int).
        methods: keys of :data:`RANKING_METHODS` (default: all).
        config: :class:`RankingConfig`; coldstart_config: :class:`mrec_utils.coldstart.ColdStartSettings`.
        llm: a loaded LM (:func:`mrec_utils.lm.load_causal_lm`); default: ``config.lm`` loaded on the
            data's device (only when a chapter-8 method runs).
        split_kwargs: passed to :func:`mrec_utils.tasks.make_split` (as in ``run_coldstart``).

    Returns:
        :class:`RankingResult`.
    """
    from mrec_utils import coldstart, data, lm as mlm

    methods = list(RANKING_METHODS) if methods is None else list(methods)
    if isinstance(methods, str) or not methods or any(m not in RANKING_METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty list of {', '.join(RANKING_METHODS)}; got {methods!r}.")
    if len(set(methods)) != len(methods):
        raise ValueError("methods contains duplicates.")
    methods = _ranking_order(methods)
    if scenario not in coldstart.SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(coldstart.SCENARIOS)}.")
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an int >= 1 (the support size k), got {shots!r}.")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError("seeds must be a non-empty list of distinct ints >= 0.")
    cfg = RankingConfig() if config is None else config
    if not isinstance(cfg, RankingConfig):
        raise TypeError(f"config must be a RankingConfig, got {type(cfg).__name__}.")
    if isinstance(cfg.gpt_members, bool) or not isinstance(cfg.gpt_members, int) or cfg.gpt_members < 1:
        raise ValueError(f"RankingConfig.gpt_members must be an int >= 1, got {cfg.gpt_members!r}.")
    ccfg = coldstart.ColdStartSettings() if coldstart_config is None else coldstart_config
    ml = data.load_movielens(dataset, data_dir) if isinstance(dataset, str) else dataset
    if not isinstance(ml, data.MovieLens):
        raise TypeError("dataset must be a release name or a MovieLens object (data.load_movielens).")
    ch5 = [m for m in methods if RANKING_CHAPTER[m] == 5]
    ch7 = [m for m in methods if RANKING_CHAPTER[m] == 7]
    ch8 = [m for m in methods if RANKING_CHAPTER[m] == 8]
    rows, cost, info = [], [], {}
    for seed in seeds:
        d = coldstart.prepare_data(ml, scenario, int(shots), seed, ccfg, **split_kwargs)
        et, lo, hi = d.test, *d.rating_range
        y, mask = et.y_query.cpu().numpy(), et.mask_query.cpu().numpy()
        scorers: dict[str, tuple[Callable[[], Any], float, tuple[int, int]]] = {}
        for m in ch5:
            train.seed_everything(seed)
            f = coldstart.METHODS[m].fit(d)
            # sizes: chapter 5's cost table (``benchmark cost``) has them
            scorers[m] = ((lambda f_: lambda: np.clip(f_.predict(et, d.test_users, False)[0], lo, hi))(f), f.seconds, (None, None))
        info[seed] = {}
        if ch7:
            c7 = _Ch7(d, cfg, ch7, progress)
            info[seed].update(c7.info)
            for m in ch7:
                scorers[m] = ((lambda m_: lambda: c7.scores(m_, d.test_episodes))(m), c7.fit.get(m, 0.0), c7.size(m))
        if ch8:
            llm = mlm.load_causal_lm(cfg.lm, device=d.device) if llm is None else llm
            c8 = _Ch8(d, ml, llm, cfg, ch8)
            info[seed].update(c8.info, embed_seconds=c8.embed_seconds)
            info[seed]["frozen LM parameters"] = int(sum(p.numel() for p in llm.model.parameters()))
            for m in ch8:
                h = _HEAD_OF[m]
                scorers[m] = ((lambda h_: lambda: c8.fn[h_](c8.tasks(d.test_episodes)))(h), c8.fit[h], c8.size(m))
        for m in methods:
            fn, fit_s, (n_par, n_ad) = scorers[m]
            _sync(d.device)
            t0 = time.perf_counter()
            s = fn()
            _sync(d.device)
            secs = time.perf_counter() - t0
            s = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
            if s.shape != y.shape:
                raise RuntimeError(f"{m} returned scores of shape {s.shape}, expected {y.shape}.")
            ev = ranking_metrics(s, y, mask, cfg.like_threshold)
            ev.insert(0, "user_id", d.test_users)
            ev.insert(0, "chapter", RANKING_CHAPTER[m])
            ev.insert(0, "method", m)
            ev.insert(0, "seed", seed)
            rows.append(ev)
            cost.append({"seed": seed, "method": m, "train s": float(fit_s), "adapt ms / user": 1e3 * secs / len(et),
                         "parameters": None if n_par is None else int(n_par),
                         "adapted / user": None if n_ad is None else int(n_ad)})
    per_user = pd.concat(rows, ignore_index=True)
    settings = dict(dataset=ml.name, scenario=scenario, shots=int(shots), seeds=seeds, methods=methods,
                    config=dataclasses.asdict(cfg), coldstart_config=dataclasses.asdict(ccfg), split_kwargs=split_kwargs)
    return RankingResult(per_user, ranking_summary(per_user), pd.DataFrame(cost), info, settings)


def load_ranking_per_user(paths: Sequence[str | Path]) -> pd.DataFrame:
    """Read the ``ranking_*_per_user.csv`` files of several ``ranking`` runs (each next to its JSON of
    the same stem, which names the scenario and k) into one frame with ``scenario`` and ``k`` columns."""
    return load_coldstart_per_user(paths)


def _format_ranking(summary: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame(index=summary.index)
    out["chapter"] = [RANKING_CHAPTER[m] for m in summary.index.get_level_values("method")]
    for c, name in (("ndcg@3", "nDCG@3"), ("auc", "AUC")):
        out[f"{name} [95% CI]"] = [f"{r[c]:.3f} [{r[c + ' low']:.3f}, {r[c + ' high']:.3f}]" for _, r in summary.iterrows()]
    out["users"] = summary["users"].astype(int)
    return out


def _run_ranking(args: argparse.Namespace) -> int:
    from mrec_utils import coldstart

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    for out in (args.out, args.per_user):
        if out and Path(out).suffix.lower() not in ((".csv", ".json") if out is args.out else (".csv",)):
            raise ValueError(f"--out must end in .csv or .json and --per-user in .csv, got {out!r}.")
    if not args.shots.isdigit():
        raise ValueError(f"--shots must be a positive int (the support size k), got {args.shots!r}.")
    ccfg = coldstart.ColdStartSettings(device=args.device or None)
    cfg = RankingConfig() if args.lm is None else RankingConfig(lm=args.lm)
    t0 = time.perf_counter()
    res = ranking_benchmark(args.dataset, args.scenario, int(args.shots), seeds=args.seeds, methods=args.methods,
                            config=cfg, coldstart_config=ccfg, data_dir=args.data_dir, progress=not args.no_progress)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 200):
        print(_format_ranking(res.summary).to_string())
        print(res.cost.groupby("method", sort=False)[["train s", "adapt ms / user", "parameters", "adapted / user"]].mean()
              .round(3).to_string())
    print(f"{res.settings['dataset']}, {args.scenario}, k={args.shots}, seeds={list(args.seeds)}: {time.perf_counter() - t0:.0f} s")
    for seed, inf in res.info.items():
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in inf.items()))
    if args.out:
        df = res.summary.reset_index()
        df.attrs = {"settings": res.settings, "info": {str(k): v for k, v in res.info.items()},
                    "cost": json.loads(res.cost.to_json(orient="records")), "threads": torch.get_num_threads(),
                    "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
        print(f"wrote {_write_out(df, args.out)}")
    if args.per_user:
        Path(args.per_user).parent.mkdir(parents=True, exist_ok=True)
        res.per_user.to_csv(args.per_user, index=False)
        print(f"wrote {args.per_user}")
    return 0


def _add_ranking_parser(subparsers: Any) -> None:
    from mrec_utils.coldstart import SCENARIOS

    p = subparsers.add_parser(
        "ranking", help="chapters 5, 7 and 8 on chapter 5's episodes: in-query nDCG@3 and like/dislike AUC",
        description="Rank every test user's query films with chapter 5's rating models, chapter 7's popularity, "
        "co-occurrence and item-GPT (in context) and chapter 8's like-heads on LM text features, all on the "
        "episodes of `benchmark coldstart` (same scenario, k and seeds); report in-query nDCG@3 and AUC.")
    p.add_argument("--dataset", default="ml-latest-small", help="MovieLens release")
    p.add_argument("--data-dir", default=None, help="folder holding the release (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--scenario", default="user-cold", help=f"one of {', '.join(SCENARIOS)}")
    p.add_argument("--shots", default="10", help="support size k (5, 10, 20)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help=f"subset of: {' '.join(RANKING_METHODS)} (default: all)")
    p.add_argument("--lm", default=None, help="language model for chapter 8's features (default: the offline SmolLM2)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help="write the summary (and the settings, choices, costs) to this .json or .csv")
    p.add_argument("--per-user", default=None, help="also write the per-user metrics to this .csv file")
    p.set_defaults(func=_run_ranking)


def _run_ranking_report(args: argparse.Namespace) -> int:
    folder = Path(args.results)
    files = sorted(folder.glob("ranking_*_per_user.csv"))
    if not files:
        raise FileNotFoundError(f"no ranking_*_per_user.csv in {folder}; run benchmarks/run_all.sh first.")
    rep = ranking_summary(load_ranking_per_user(files), seed=args.seed)
    rep.attrs = {"files": [f.name for f in files], "interval": "95% percentile bootstrap over (seed, test user) pairs"}
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 500):
        print(_format_ranking(rep).to_string())
    if args.out:
        for p in _write_table(rep, args.out):
            print(f"wrote {p}")
    return 0


def _add_ranking_report_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ranking-report", help="chapter 10's ranking table: mean and 95%% interval per scenario x k x method",
        description="Aggregate the per-user files of several ranking runs (ranking_*_per_user.csv next to their "
        "--out .json) into one table: mean and 95 percent bootstrap interval of nDCG@3 and AUC.")
    p.add_argument("--results", default="benchmarks/results", help="folder holding the ranking_* files")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="write the table to this .csv and the matching .json")
    p.set_defaults(func=_run_ranking_report)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mrec_utils.benchmark`` parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(prog="python -m mrec_utils.benchmark", description="Benchmarks of mrec_utils; one subcommand each.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_speed_parser(subparsers)
    _add_coldstart_parser(subparsers)
    _add_report_parser(subparsers)
    _add_cost_parser(subparsers)
    _add_gpt_meta_parser(subparsers)
    _add_ranking_parser(subparsers)
    _add_ranking_report_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The book computes in float64 (every chapter's setup cell does the same): rounding differences
    # between CPUs and thread counts then stay far below every reported digit.
    torch.set_default_dtype(torch.float64)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
