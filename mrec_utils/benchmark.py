"""Benchmarks as a command: ``python -m mrec_utils.benchmark <subcommand> [options]``.

Subcommands
-----------
``speed``
    Meta-steps per second of second-order MAML for a MeLU-sized network, written four ways:
    (a) :mod:`mrec_utils.meta` with ``vmap`` over tasks, (b) the same maths as a Python loop
    over tasks, (c) the ``higher`` library (``pip install "mrec_utils[bench]"``), (d) first-order
    MAML with ``vmap``; plus how far apart their meta-gradients are. See :func:`speed_benchmark`.

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

__all__ = ["SPEED_METHODS", "speed_benchmark", "REPORT_METRICS", "LIVE_SLICE", "load_coldstart_per_user", "coldstart_report",
           "coldstart_cost", "build_parser", "main"]

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


def _config_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["meta_epochs=5", "hidden=32,16"]`` -> typed ColdStartConfig overrides."""
    import dataclasses

    from mrec_utils.coldstart import ColdStartConfig

    fields = {f.name: f for f in dataclasses.fields(ColdStartConfig)}
    defaults = ColdStartConfig()
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects KEY=VALUE with KEY one of {', '.join(fields)}; got {pair!r}.")
        current = getattr(defaults, key)
        if current is None:  # e.g. min_ratings: int | None -> the annotation says the type
            current = 0 if "int" in str(fields[key].type) else ""
        try:
            if value.lower() == "none" and getattr(defaults, key) is None:
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
    over["use_user_features"] = {"auto": "auto", "yes": True, "no": False}[args.user_features]
    if args.no_item_id:
        over["use_item_id"] = False
    if args.device:
        over["device"] = args.device
    cfg = coldstart.ColdStartConfig().replace(**over)
    t0 = time.perf_counter()
    res = coldstart.run_coldstart(args.dataset, args.scenario, shots, seeds=args.seeds, methods=args.methods,
                                  config=cfg, data_dir=args.data_dir, progress=not args.no_progress,
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
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override a ColdStartConfig field, e.g. meta_epochs=20")
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
    import numpy as np

    from mrec_utils import metrics
    from mrec_utils.coldstart import METHODS, SCENARIOS

    need = {"scenario", "k", "seed", "method", "user_id", "mae", "mse"}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise ValueError(f"per_user must be a DataFrame with the columns {sorted(need)} (see load_coldstart_per_user).")
    rows = []
    for (sc, k, m), d in per_user.groupby(["scenario", "k", "method"], sort=False):
        row: dict[str, Any] = {"scenario": sc, "k": k, "method": m}
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
    out["_s"] = out["scenario"].map({s: i for i, s in enumerate(SCENARIOS)})
    out["_m"] = out["method"].map({s: i for i, s in enumerate(METHODS)}).fillna(len(METHODS))
    out = out.sort_values(["_s", "k", "_m"]).drop(columns=["_s", "_m"]).set_index(["scenario", "k", "method"])
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
            mf = info["mf"]
            n_par = 1 + sum(t.numel() for t in (mf.item_factors, mf.item_bias, mf.user_factors, mf.user_bias))
            n_ad = mf.item_factors.shape[1] + 1
        elif m == "protonet":
            n_par, n_ad = _n_params(info["model"]), 0
        else:
            model = info["model"]
            n_par = _n_params(model)
            n_ad = 0 if info["steps"] == 0 else _n_params(model, melu_adapt_spec(info["adapt"]))
        times = []
        for _ in range(repeats):
            _sync(data.device)
            t0 = time.perf_counter()
            f.predict(data.test, False)
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
    cfg = coldstart.ColdStartConfig() if not args.device else coldstart.ColdStartConfig(device=args.device)
    shots: Any = args.shots if args.shots == "melu" else int(args.shots)
    res = coldstart.run_coldstart(args.dataset, args.scenario, shots, seeds=args.seeds, methods=args.methods,
                                  config=cfg, data_dir=args.data_dir, progress=False, catalogue=False)
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
    import numpy as np

    from mrec_utils import data, gpt_meta, lm, tasks

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".json"):
        raise ValueError(f"--out must end in .csv or .json, got {args.out!r}.")
    t0 = time.perf_counter()
    ml = data.load_movielens(args.dataset, data_dir=args.data_dir)
    train = tasks.make_split(ml.ratings, "user-cold", seed=args.seed).train  # the split head_benchmark uses
    counts = train.item_id.value_counts()
    ids = np.sort(counts.index[counts.to_numpy() >= args.min_item_count].to_numpy())  # the catalogue: embed only these
    texts = data.item_text(ml.items, ml.tags).reindex(ids)
    model = lm.load_causal_lm(args.lm)
    raw = lm.embed_texts(texts.tolist(), model, layers=args.layers, pooling="mean", normalize=True,
                         progress=not args.no_progress)
    feats = gpt_meta.lm_item_features(raw, n_components=args.components)
    t1 = time.perf_counter()
    res = gpt_meta.head_benchmark(ml.ratings, feats, ids, ks=args.k, methods=args.methods, meta_steps=args.meta_steps,
                                  min_item_count=args.min_item_count, seed=args.seed, device=args.device)
    show = res.assign(**{"AUC [95%]": [f"{a:.3f} [{lo:.3f}, {hi:.3f}]" for a, lo, hi in zip(res.auc, res.auc_low, res.auc_high)],
                         "AUC - global [95%]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                                zip(res.auc_minus_global, res.diff_low, res.diff_high)]})
    show = show[["method", "k", "users", "AUC [95%]", "AUC - global [95%]", "ndcg@10", "ms_per_user"]].round(3)
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.max_rows", 200):
        print(show.to_string(index=False))
    print(f"{args.dataset}: LM features {raw.shape} in {t1 - t0:.0f} s, heads {time.perf_counter() - t1:.0f} s; {res.attrs['split']}")
    if args.out:
        df = res.assign(k=res.k.astype(str))
        df.attrs = {**res.attrs, "lm": model.name, "layers": args.layers, "components": args.components}
        print(f"wrote {_write_out(df, args.out)}")
    return 0


def _add_gpt_meta_parser(subparsers: Any) -> None:
    from mrec_utils.gpt_meta import HEAD_METHODS

    p = subparsers.add_parser(
        "gpt-meta",
        help="chapter 8, part 1: meta-learned user heads on LM item features (query AUC, nDCG@10)",
        description="Embed the catalogue's item texts with a causal LM (cached), then compare a global head, "
        "per-user logistic regression, fine-tuning, MAML, FOMAML, ANIL, Reptile and a prototypical network "
        "on the same new users for several support sizes k, plus new (text-only) films at k = 16.",
    )
    p.add_argument("--dataset", default="ml-latest-small", help="MovieLens release")
    p.add_argument("--data-dir", default=None, help="folder holding the release (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--lm", default=None, help="language model: a Hugging Face id or path (default: the offline SmolLM2 GGUF)")
    p.add_argument("--layers", type=int, default=8, help="transformer blocks used for the embeddings (chapter 8/9: 8)")
    p.add_argument("--components", type=int, default=64, help="PCA dimension of the item features")
    p.add_argument("--k", nargs="+", type=int, default=[4, 8, 16, 32], help="support sizes")
    p.add_argument("--methods", nargs="+", default=list(HEAD_METHODS), choices=list(HEAD_METHODS))
    p.add_argument("--meta-steps", type=int, default=200, help="outer steps of MAML/FOMAML/ANIL/Reptile")
    p.add_argument("--min-item-count", type=int, default=25, help="catalogue: items with this many training ratings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", default=None, help="write the table to this .csv or .json file")
    p.set_defaults(func=_run_gpt_meta)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mrec_utils.benchmark`` parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(prog="python -m mrec_utils.benchmark", description="Benchmarks of mrec_utils; one subcommand each.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_speed_parser(subparsers)
    _add_coldstart_parser(subparsers)
    _add_report_parser(subparsers)
    _add_cost_parser(subparsers)
    _add_gpt_meta_parser(subparsers)
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
