"""Benchmarks as a command: ``python -m mrec_utils.benchmark <subcommand> [options]``.

Subcommands
-----------
``speed``
    Meta-steps per second of second-order MAML for a MeLU-sized network, written four ways:
    (a) :mod:`mrec_utils.meta` with ``vmap`` over tasks, (b) the same maths as a Python loop
    over tasks, (c) the ``higher`` library (``pip install "mrec_utils[bench]"``), (d) first-order
    MAML with ``vmap``; plus how far apart their meta-gradients are. See :func:`speed_benchmark`.

Adding a subcommand: write ``_add_<name>_parser(subparsers)`` that creates the sub-parser and
sets ``func=<callable(args) -> int>``, and call it from :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from torch import nn

from mrec_utils import meta

__all__ = ["SPEED_METHODS", "speed_benchmark", "build_parser", "main"]

SPEED_METHODS: dict[str, str] = {
    "vmap": "(a) mrec_utils.meta, vmap over tasks",
    "loop": "(b) same maths, Python loop over tasks",
    "higher": "(c) higher.innerloop_ctx, loop over tasks",
    "vmap_first_order": "(d) first-order MAML, vmap over tasks",
}
"""Method keys of :func:`speed_benchmark` and what each one measures."""

_ORDER = {"vmap": "second", "loop": "second", "higher": "second", "vmap_first_order": "first"}


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
    :data:`SPEED_METHODS`): ``vmap`` (a), ``loop`` (b), ``higher`` (c), ``vmap_first_order`` (d).
    The methods are timed in interleaved rounds (a, b, c, d, a, b, ...) so that changes in machine
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
    kw = dict(loss_fn=meta.mse_loss_per_example, steps=steps, inner_lr=inner_lr)

    # -- gradient agreement on the initial parameters ------------------------------------------
    p0, f0 = meta.split_params(base)
    grads: dict[str, dict[str, torch.Tensor]] = {}
    _, ref_so = meta.meta_gradient(base, p0, f0, batch, vectorize=False, **kw)
    ref_fo = None
    for m in methods:
        if m == "vmap":
            grads[m] = meta.meta_gradient(base, p0, f0, batch, **kw)[1]
        elif m == "loop":
            grads[m] = ref_so
        elif m == "vmap_first_order":
            grads[m] = meta.meta_gradient(base, p0, f0, batch, first_order=True, **kw)[1]
            ref_fo = meta.meta_gradient(base, p0, f0, batch, first_order=True, vectorize=False, **kw)[1]
        elif m == "higher":
            model = copy.deepcopy(base)
            _higher_backward(model, batch, steps, torch.optim.SGD(model.parameters(), lr=inner_lr))
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
        else:
            def step(model=model, opt=opt, params=params, frozen=frozen, m=m) -> None:
                meta.meta_step(model, params, frozen, batch, opt, vectorize=(m != "loop"), first_order=(m == "vmap_first_order"), **kw)
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


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mrec_utils.benchmark`` parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(prog="python -m mrec_utils.benchmark", description="Benchmarks of mrec_utils; one subcommand each.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_speed_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
