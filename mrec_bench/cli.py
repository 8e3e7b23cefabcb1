"""``python -m mrec_bench <command> [options]``: the benchmark's command line.

Commands: ``speed`` (meta-training speed table), ``coldstart`` (chapter 5's comparison for one scenario and
k), ``report`` (the results table from per-user files), ``cost`` (training and adaptation cost of chapter 5's
methods), ``gpt-meta`` (chapter 9's heads on their own protocol), ``ranking`` (chapters 5, 7 and 9 ranking
the same episodes), ``ranking-report``, ``nextfilm`` (chapter 7's next-film comparison) and ``sweep``
(everything over data sets x scenarios x k x seeds on Dask, the committed files of chapter 12). Arguments
are checked here; a bad one exits with status 2 and a message that says what to do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

from mrec_utils import coldstart, data

from . import nextfilm, reports, speed, sweep
from .ranking import RANKING_METHODS, RankingSettings, ranking_benchmark

WIDE = {"display.width": 250, "display.max_columns": 40, "display.max_rows": 500}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _suffix(*allowed: str):
    def check(text: str) -> str:
        if Path(text).suffix.lower() not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} must end in {' or '.join(allowed)}")
        return text
    return check


def _setup(args: argparse.Namespace) -> None:
    """The book computes in float64 (every chapter's setup cell does the same); ``--threads`` if given."""
    torch.set_default_dtype(torch.float64)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _write(df: pd.DataFrame, out: str, attrs: dict | None = None) -> None:
    """``df`` to ``out`` (.csv) or to ``out`` with its attributes (.json)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        df.to_csv(path, index=False)
    else:
        doc = {"meta": attrs if attrs is not None else df.attrs, "results": json.loads(df.to_json(orient="records"))}
        path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {path}")


def _common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    if dataset:
        p.add_argument("--dataset", default="ml-latest-small", choices=data.available_releases(), help="MovieLens release")
        p.add_argument("--data-dir", default=None, help="folder holding the release (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")


# ------------------------------------------------------------------------------------------------ speed


def _run_speed(args: argparse.Namespace) -> None:
    df = speed.speed_benchmark(input_dim=args.input_dim, hidden=args.hidden, n_tasks=args.tasks, n_support=args.support,
                               n_query=args.query, steps=args.steps, inner_lr=args.inner_lr, outer_lr=args.outer_lr,
                               warmup=args.warmup, repeats=args.repeats, methods=args.methods, device=args.device or "cpu",
                               dtype=getattr(torch, args.dtype), seed=args.seed)
    print(speed.format_speed(df))
    if args.out:
        _write(df, args.out)


def _add_speed(sub) -> None:
    p = sub.add_parser("speed", help="meta-steps per second of MAML: vmap vs loop vs higher vs first order",
                       description="Time one second-order MAML meta-step (MeLU-sized MLP) written with vmap, a Python loop, "
                       "the higher library and by hand, plus first-order MAML, and compare their meta-gradients.")
    _common(p, dataset=False)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    for name, default, what in (("input-dim", 256, "network input size"), ("hidden", 64, "hidden width"),
                                ("tasks", 32, "tasks per meta-batch"), ("support", 20, "support examples per task"),
                                ("query", 10, "query examples per task"), ("steps", 5, "inner SGD steps"),
                                ("repeats", 10, "timed rounds (the median is reported)")):
        p.add_argument(f"--{name}", type=_positive, default=default, help=what)
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--outer-lr", type=float, default=1e-3)
    p.add_argument("--methods", nargs="+", default=list(speed.SPEED_METHODS), choices=list(speed.SPEED_METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=_suffix(".csv", ".json"), default=None, help="also write the table to this .csv or .json file")
    p.set_defaults(func=_run_speed)


# ------------------------------------------------------------------------------------------------ chapter 5


def config_overrides(pairs: Sequence[str]) -> dict:
    """``["meta.epochs=5", "net.hidden=32,16"]`` -> typed :class:`~mrec_utils.coldstart.ColdStartSettings`
    overrides (dotted keys: ``group.field``; ``device`` and ``patience`` undotted)."""
    defaults = coldstart.ColdStartSettings()
    fields = {f"{g.name}.{f.name}": f for g in dataclasses.fields(defaults) if dataclasses.is_dataclass(getattr(defaults, g.name))
              for f in dataclasses.fields(getattr(defaults, g.name))}
    fields.update({f.name: f for f in dataclasses.fields(defaults) if not dataclasses.is_dataclass(getattr(defaults, f.name))})
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set expects KEY=VALUE with KEY one of {', '.join(fields)}; got {pair!r}.")
        group, _, name = key.rpartition(".")
        current = getattr(getattr(defaults, group) if group else defaults, name)
        try:
            if value.lower() == "none" and current is None:
                out[key] = None
            elif current is None:  # e.g. min_ratings: int | None
                out[key] = int(value) if "int" in str(fields[key].type) else value
            elif isinstance(current, tuple):
                out[key] = tuple(type(current[0] if current else 1.0)(v) for v in value.split(",") if v)
            elif isinstance(current, bool):
                out[key] = value.lower() in ("1", "true", "yes")
            else:
                out[key] = type(current)(value)
        except ValueError as exc:
            raise ValueError(f"--set {pair}: {exc}") from exc
    return out


def _coldstart_config(args: argparse.Namespace) -> coldstart.ColdStartSettings:
    over = config_overrides(getattr(args, "set", None) or [])
    if getattr(args, "user_features", "auto") != "auto":
        over["net.use_user_features"] = args.user_features == "yes"
    if getattr(args, "no_item_id", False):
        over["net.use_item_id"] = False
    if args.device:
        over["device"] = args.device
    return coldstart.ColdStartSettings().replace(**over)


def _coldstart_methods(names: Sequence[str] | None) -> list[coldstart.Method] | None:
    """Method names (checked by argparse) -> chapter 5's :class:`~mrec_utils.coldstart.Method` objects (None: all)."""
    return None if names is None else [coldstart.METHODS[m] for m in names]


def _shots(text: str) -> int | str:
    if text == "melu":
        return text
    return _positive(text)


def _run_coldstart(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    res = coldstart.run_coldstart(data.load_movielens(args.dataset, args.data_dir), args.scenario, args.shots, seeds=args.seeds,
                                  methods=_coldstart_methods(args.methods), settings=_coldstart_config(args),
                                  progress=not args.no_progress, catalogue=not args.no_catalogue)
    with pd.option_context(*[x for kv in WIDE.items() for x in kv]):
        print(coldstart.format_table(res.summary).to_string())
    print(f"{res.settings['dataset']}, {args.scenario}, shots={args.shots}, seeds={list(args.seeds)}: "
          f"{time.perf_counter() - t0:.0f} s; reference (best non-meta baseline): {res.summary.attrs['reference']}")
    if args.out:
        _write(res.summary.reset_index(), args.out, {"settings": res.settings, "reference": res.summary.attrs["reference"]})
    if args.per_user:
        _write(res.per_user.assign(scenario=args.scenario, k=args.shots).pipe(lambda d: d[["scenario", "k", *d.columns[:-2]]]),
               args.per_user)


def _add_setting(p: argparse.ArgumentParser, seeds: Sequence[int] = (0, 1, 2)) -> None:
    p.add_argument("--scenario", default="user-cold", choices=list(coldstart.SCENARIOS))
    p.add_argument("--shots", type=_shots, default=10, help="support size k (e.g. 5, 10, 20)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(seeds))


def _add_coldstart(sub) -> None:
    p = sub.add_parser("coldstart", help="chapter 5's cold-start comparison: baselines vs meta-learning, same episodes",
                       description="Train and evaluate every cold-start method on the same episodes (k-shot support, 10 "
                       "query ratings per test user) over several seeds; print the table of chapter 5.")
    _common(p)
    _add_setting(p)
    p.add_argument("--methods", nargs="+", default=None, choices=list(coldstart.METHODS), metavar="METHOD",
                   help=f"default: all of {' '.join(coldstart.METHODS)}")
    p.add_argument("--user-features", default="auto", choices=["auto", "yes", "no"],
                   help="use gender/age/occupation (ml-100k, ml-1m); 'yes' fails on releases without them")
    p.add_argument("--no-item-id", action="store_true", help="no item-id embedding (attributes only)")
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override a ColdStartSettings field (dotted), e.g. meta.epochs=20")
    p.add_argument("--no-catalogue", action="store_true", help="skip the full-catalogue HR@10 / nDCG@10")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", type=_suffix(".csv", ".json"), default=None, help="write the summary table to this .csv or .json file")
    p.add_argument("--per-user", type=_suffix(".csv"), default=None, help="also write the per-user metrics to this .csv file")
    p.set_defaults(func=_run_coldstart)


def _run_report(args: argparse.Namespace) -> None:
    kind = "ranking" if args.command == "ranking-report" else "coldstart"
    paths = args.results or [Path(reports.results_dir()) / args.dataset]
    pu = reports.load_per_user(paths, kind)
    rep = (reports.ranking_report if kind == "ranking" else reports.coldstart_report)(pu, seed=args.seed)
    show = [c for c in rep.columns if c.split(" ")[0] in (("ndcg@3", "auc") if kind == "ranking" else ("mae", "ndcg@10"))]
    with pd.option_context(*[x for kv in WIDE.items() for x in kv]):
        print(rep[show + ["users", "distinct users"]].round(3).to_string())
    if args.out:
        _write(rep.reset_index(), args.out, {"interval": "95% percentile bootstrap, users resampled as clusters"})


def _add_report(sub, name: str, kind: str) -> None:
    p = sub.add_parser(name, help=f"the {kind} table: mean and 95%% interval per scenario x k x method",
                       description=f"Aggregate {kind} per-user files (of `sweep` or `{kind} --per-user`) into mean and 95 "
                       "percent bootstrap interval per scenario x k x method; users are resampled as clusters.")
    p.add_argument("--results", nargs="+", default=None, help=f"per-user files or folders (default: the committed {kind} files)")
    p.add_argument("--dataset", default="ml-latest-small", help="which committed folder, when --results is not given")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=_suffix(".csv", ".json"), default=None, help="write the table to this .csv or .json file")
    p.set_defaults(func=_run_report)


def _run_cost(args: argparse.Namespace) -> None:
    cfg = _coldstart_config(args)
    res = coldstart.run_coldstart(data.load_movielens(args.dataset, args.data_dir), args.scenario, args.shots, seeds=args.seeds,
                                  methods=_coldstart_methods(args.methods), settings=cfg, progress=False, catalogue=False)
    cost = sweep.coldstart_cost(res, repeats=args.repeats)
    print(cost.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"threads={torch.get_num_threads()}")
    if args.out:
        _write(cost, args.out, {"settings": {k: v for k, v in res.settings.items() if k != "settings"}, "threads": torch.get_num_threads()})


def _add_cost(sub) -> None:
    p = sub.add_parser("cost", help="training time, adaptation time per user and parameters of chapter 5's methods",
                       description="Fit the cold-start methods once and report training seconds, adaptation milliseconds "
                       "per test user and the number of learned / per-user adapted parameters.")
    _common(p)
    _add_setting(p, seeds=(0,))
    p.add_argument("--methods", nargs="+", default=None, choices=list(coldstart.METHODS), metavar="METHOD",
                   help=f"default: all of {' '.join(coldstart.METHODS)}")
    p.add_argument("--repeats", type=_positive, default=3, help="timed adaptation repeats (median)")
    p.add_argument("--out", type=_suffix(".csv", ".json"), default=None, help="write the table to this .csv or .json file")
    p.set_defaults(func=_run_cost)


# ------------------------------------------------------------------------------------------------ chapters 7 and 9


def _run_gpt_meta(args: argparse.Namespace) -> None:
    from mrec_utils import heads, lm, metrics

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
    with pd.option_context(*[x for kv in WIDE.items() for x in kv]):
        print(pd.DataFrame(rows).round(4).to_string(index=False))
    print(f"{args.dataset}: {res.attrs['split']}; choices {res.attrs['choices']}; {time.perf_counter() - t0:.0f} s")
    if args.out:
        _write(res.assign(k=res.k.astype(str)), args.out, res.attrs)


def _add_gpt_meta(sub) -> None:
    from mrec_utils.heads import HEAD_METHODS

    p = sub.add_parser("gpt-meta", help="chapter 9: user heads on LM item features, K-fold over users (query AUC, nDCG@10)",
                       description="Chapter 9's study (mrec_utils.heads.head_study): embed the catalogue's item texts with a "
                       "causal LM (cached), choose the settings on validation users, then evaluate the heads K-fold over users.")
    p.add_argument("--dataset", default="ml-latest-small", choices=data.available_releases(), help="MovieLens release")
    p.add_argument("--data-dir", default=None, help="folder holding the release (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--lm", default=None, help="language model: a Hugging Face id or path (default: the offline SmolLM2 GGUF)")
    p.add_argument("--k", nargs="+", type=_positive, default=[4, 8, 16, 32], help="support sizes")
    p.add_argument("--methods", nargs="+", default=["global", "finetune", "maml", "fomaml", "anil", "residual"],
                   choices=list(HEAD_METHODS))
    p.add_argument("--folds", type=_positive, default=5, help="folds over users (chapter 9: 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive, default=None, help="torch.set_num_threads for this run")
    p.add_argument("--out", type=_suffix(".csv", ".json"), default=None, help="write the per-user rows to this .csv or .json file")
    p.set_defaults(func=_run_gpt_meta)


def _run_ranking(args: argparse.Namespace) -> None:
    s = RankingSettings(coldstart=_coldstart_config(args), lm=args.lm)
    t0 = time.perf_counter()
    res = ranking_benchmark(data.load_movielens(args.dataset, args.data_dir), args.scenario, args.shots, seeds=args.seeds,
                            methods=args.methods, settings=s, progress=not args.no_progress)
    pu = res.per_user.assign(scenario=args.scenario, k=args.shots).pipe(lambda d: d[["scenario", "k", *d.columns[:-2]]])
    rep = reports.ranking_report(pu)
    with pd.option_context(*[x for kv in WIDE.items() for x in kv]):
        print(rep.round(3).to_string())
        print(res.cost.groupby("method", sort=False)[["train s", "adapt ms / user", "parameters", "adapted / user"]].mean().round(3).to_string())
    print(f"{args.dataset}, {args.scenario}, k={args.shots}, seeds={list(args.seeds)}: {time.perf_counter() - t0:.0f} s")
    for seed, info in res.info.items():
        print(f"seed {seed}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()))
    if args.out:
        _write(rep.reset_index(), args.out, {"settings": res.settings, "info": res.info, "cost": res.cost.to_dict("records")})
    if args.per_user:
        _write(pu, args.per_user)


def _add_ranking(sub) -> None:
    p = sub.add_parser("ranking", help="chapters 5, 7 and 9 on chapter 5's episodes: in-query nDCG@3 and like/dislike AUC",
                       description="Rank every test user's query films with chapter 5's rating models, chapter 7's popularity, "
                       "co-occurrence and item-GPT and chapter 9's like-heads on LM text features, all on the episodes of "
                       "`coldstart` (same scenario, k and seeds); report in-query nDCG@3 and AUC.")
    _common(p)
    _add_setting(p)
    p.add_argument("--methods", nargs="+", default=None, choices=list(RANKING_METHODS), metavar="METHOD",
                   help=f"default: all of {' '.join(RANKING_METHODS)}")
    p.add_argument("--lm", default=None, help="language model of chapter 9's features (default: the offline SmolLM2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", type=_suffix(".csv", ".json"), default=None, help="write the summary to this .csv or .json file")
    p.add_argument("--per-user", type=_suffix(".csv"), default=None, help="also write the per-user metrics to this .csv file")
    p.set_defaults(func=_run_ranking)


def _run_nextfilm(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    res = nextfilm.nextfilm_benchmark(args.dataset, seeds=args.seeds, methods=args.methods, device=args.device or "cpu",
                                      progress=not args.no_progress, data_dir=args.data_dir)
    rep = nextfilm.nextfilm_report(res.per_user)
    with pd.option_context(*[x for kv in WIDE.items() for x in kv]):
        print(res.per_user.groupby("method", sort=False)[list(nextfilm.NEXTFILM_METRICS)].mean().round(3).to_string())
        print(rep.round(3).to_string(index=False))
    for info in res.runs["runs"]:
        shown = ("cooc_window", "cooc_last", "cooc_on_edge", "cooc_wider_choice", "gpt_best_epoch", "gpt_epochs_run")
        print(f"seed {info['seed']}: " + ", ".join(f"{k}={info[k]}" for k in shown if k in info))
    print(f"{args.dataset}, seeds={list(args.seeds)}: {time.perf_counter() - t0:.0f} s")
    if args.out:
        _write(res.per_user, str(Path(args.out) / "nextfilm_per_user.csv"))
        _write(rep, str(Path(args.out) / "nextfilm_report.csv"))
        (Path(args.out) / "nextfilm_runs.json").write_text(json.dumps(res.runs, indent=1, default=str) + "\n")
        print(f"wrote {Path(args.out) / 'nextfilm_runs.json'}")


def _add_nextfilm(sub) -> None:
    p = sub.add_parser("nextfilm", help="chapter 7's next-film comparison: item-GPT vs popularity and co-occurrence",
                       description="Chapter 7's leave-last-out next-film ranking over the whole catalogue (HR@10, nDCG@10) "
                       "with the chapter's settings unchanged: popularity, co-occurrence tuned on validation users and the "
                       "warm-started item-GPT; paired 95%% intervals over test users.")
    _common(p)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="split and model seeds (chapter 7: 0)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(nextfilm.NEXTFILM_METHODS), metavar="METHOD",
                   help=f"default: all of {' '.join(nextfilm.NEXTFILM_METHODS)}")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", default=None, help="folder for nextfilm_per_user.csv, nextfilm_report.csv and nextfilm_runs.json "
                   "(the book's: benchmarks/results/<dataset>)")
    p.set_defaults(func=_run_nextfilm)


# ------------------------------------------------------------------------------------------------ the sweep


def _run_sweep(args: argparse.Namespace) -> None:
    jobs = sweep.sweep_jobs(args.datasets, args.scenarios, args.ks, args.seeds)
    s = RankingSettings(coldstart=_coldstart_config(args))
    t0 = time.perf_counter()
    results = sweep.run_sweep(jobs, scheduler=args.scheduler, workers=args.workers, progress=not args.no_progress,
                              checkpoints=Path(args.out) / ".checkpoints", settings=s, data_dir=args.data_dir,
                              coldstart_methods=args.coldstart_methods or tuple(coldstart.METHODS),
                              ranking_methods=args.ranking_methods or tuple(RANKING_METHODS))
    for r in results:
        if r.skipped:
            print(f"skipped {r.job}: {r.skipped}")
    for path in sweep.write_results(results, args.out, s):
        print(f"wrote {path}")
    shutil.rmtree(Path(args.out) / ".checkpoints", ignore_errors=True)
    print(f"{len(jobs)} runs in {time.perf_counter() - t0:.0f} s")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="every method over data sets x scenarios x k x seeds on Dask: chapter 12's files",
                       description="Run chapter 5's comparison and the ranking of chapters 5, 7 and 9 for every data set, "
                       "scenario, k and seed, one Dask task each (a local cluster of single-threaded workers by default), "
                       "and write benchmarks/results/<dataset>/.")
    p.add_argument("--datasets", nargs="+", default=list(sweep.DATASETS), choices=data.available_releases(), metavar="DATASET",
                   help=f"MovieLens releases (default: {' '.join(sweep.DATASETS)})")
    p.add_argument("--scenarios", nargs="+", default=list(coldstart.SCENARIOS), choices=list(coldstart.SCENARIOS), metavar="SCENARIO",
                   help=f"default: {' '.join(coldstart.SCENARIOS)}")
    p.add_argument("--ks", nargs="+", type=_positive, default=list(sweep.KS), help="support sizes k")
    p.add_argument("--seeds", nargs="+", type=int, default=list(sweep.SEEDS))
    p.add_argument("--coldstart-methods", nargs="+", default=None, choices=list(coldstart.METHODS), metavar="METHOD",
                   help="chapter 5's methods (default: all)")
    p.add_argument("--ranking-methods", nargs="+", default=None, choices=list(RANKING_METHODS), metavar="METHOD",
                   help="methods of the ranking (default: all)")
    p.add_argument("--scheduler", default=None,
                   help="address of a running Dask scheduler (tcp://host:8786), or 'serial' (no Dask); default: a local cluster")
    p.add_argument("--workers", type=_positive, default=None, help="local cluster: worker processes (default: one per core)")
    p.add_argument("--data-dir", default=None, help="folder holding the releases (default: MREC_DATA_DIR, then the cache)")
    p.add_argument("--device", default="cpu", help="the book's files are computed on the CPU")
    p.add_argument("--no-progress", action="store_true", help="no line per finished job")
    p.add_argument("--out", default="benchmarks/results",
                   help="folder of the files (one sub-folder per data set); finished jobs are kept in OUT/.checkpoints "
                   "until the files are written, so a sweep started again resumes")
    p.set_defaults(func=_run_sweep)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mrec_bench`` parser, one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="python -m mrec_bench", description=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_speed, _add_coldstart, _add_cost, _add_gpt_meta, _add_ranking, _add_nextfilm, _add_sweep):
        add(sub)
    _add_report(sub, "report", "coldstart")
    _add_report(sub, "ranking-report", "ranking")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; 0 on success, 2 (with a message on stderr) on a bad argument or missing input."""
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
