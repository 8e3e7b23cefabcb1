"""Chapter 7's next-film comparison as one function, for any release: the item-GPT against popularity and a
tuned co-occurrence model.

Chapter 7 splits the users as chapter 2's ``user-cold`` scenario does (:data:`SPLIT`), builds the vocabulary
from the training users, holds out each validation and test user's last ``n_last`` films as leave-last-out
cases, chooses co-occurrence's window and history length on the validation users, trains a warm-started
item-GPT with early stopping on them, and ranks the whole catalogue for every test case.
:func:`nextfilm_benchmark` composes the same :mod:`mrec_utils.gpt` functions in the same order with the
chapter's :class:`~mrec_utils.gpt.ItemGPTSettings` unchanged, so on ml-latest-small it gives the chapter's
numbers user by user, and on ml-100k it repeats the comparison with every setting frozen (chapter 12). The
choices each method makes on its own validation users (window, history, epoch) are part of the method and
are made again on each release.

Per-user rows (:data:`NEXTFILM_METRICS`): a test user's mean over their cases of the full-catalogue HR@10
and nDCG@10, and of the sampled ones (the target against 100 random films). :func:`nextfilm_report` pairs
the methods over the same users, as the chapter does.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from mrec_utils import data, gpt, tasks

from . import reports
from .ranking import check_methods

SPLIT: dict = {"scenario": "user-cold", "test_frac": 0.2, "val_frac": 0.1, "max_ratings": None}
"""Chapter 7's split of the users (:func:`mrec_utils.tasks.make_split`); its seed is the run's seed."""

WIDER_GRID: dict = {"cooc_windows": (20, 50), "cooc_lasts": (20,)}
"""Chapter 7's check of its co-occurrence choice: the grid extended by these values (recorded, not used)."""

NEXTFILM_METHODS: tuple[str, ...] = ("popularity", "cooccurrence", "item_gpt")
NEXTFILM_METRICS: dict = {"hr@10": "full_hr", "ndcg@10": "full_ndcg", "sampled_hr@10": "sampled_hr",
                          "sampled_ndcg@10": "sampled_ndcg"}
"""Per-user column -> key of :func:`mrec_utils.gpt.evaluate_next_item` (full catalogue unless ``sampled``)."""

COMPARISONS: tuple[tuple[str, str], ...] = (("item_gpt", "popularity"), ("item_gpt", "cooccurrence"),
                                            ("cooccurrence", "popularity"))
"""The differences ``a - b`` that chapter 7 reports (its glued verdicts ``ch07_gpt_pop``, ``ch07_gpt_cooc``, ``ch07_cooc_pop``)."""

K = 10  # HR@10 and nDCG@10
N_NEGATIVES = 100  # the sampled protocol


@dataclass
class NextFilmResult:
    """``per_user``: one row per (seed, method, test user); ``runs``: the settings, and per seed the split's
    sizes, what validation chose, each method's validation nDCG@10 and seconds."""

    per_user: pd.DataFrame
    runs: dict


def nextfilm_sequences(ml: data.MovieLens, seed: int = 0,
                       settings: gpt.ItemGPTSettings = gpt.ItemGPTSettings()) -> tuple[gpt.ItemSequences, ...]:
    """Chapter 7's data: the ``(train, validation, test)`` users' film sequences over the vocabulary of the
    films with ``settings.min_count`` training ratings (same-second ratings ordered with ``seed``)."""
    split = tasks.make_split(ml.ratings, SPLIT["scenario"], seed=seed, **{k: v for k, v in SPLIT.items() if k != "scenario"})
    vocab = gpt.build_item_vocab(split.train, min_count=settings.min_count)
    seqs = gpt.user_sequences(ml.ratings, vocab, seed=seed)
    return seqs.subset(split.train_users), seqs.subset(split.val_users), seqs.subset(split.test_users)


Scorer = Callable[[Sequence[np.ndarray]], np.ndarray]


def _cooccurrence(train_seq: gpt.ItemSequences, val: tuple, s: gpt.ItemGPTSettings, popularity: np.ndarray,
                  info: dict) -> Scorer:
    grid, (w, m) = gpt.tune_cooccurrence(train_seq, val, s)
    wider = dataclasses.replace(s, **{k: getattr(s, k) + v for k, v in WIDER_GRID.items()})
    _, wider_choice = gpt.tune_cooccurrence(train_seq, val, wider)
    edges = [name for name, v, g in (("w", w, s.cooc_windows), ("m", m, s.cooc_lasts)) if v in (min(g), max(g))]
    info.update(cooc_window=w, cooc_last=m, cooc_on_edge=edges, cooc_wider_choice=list(wider_choice),
                cooc_grid=grid.to_dict(orient="records"))
    counts = gpt.cooccurrence_counts(train_seq, train_seq.n_items, window=w)
    return lambda hist: gpt.cooccurrence_scores(counts, hist, last=m, popularity=popularity)


def _item_gpt(train_seq: gpt.ItemSequences, val: tuple, s: gpt.ItemGPTSettings, seed: int, device: str,
              progress: bool, info: dict) -> Scorer:
    n = train_seq.n_items
    warm = gpt.cooccurrence_embeddings(gpt.cooccurrence_counts(train_seq, n, window=s.warm_window), dim=s.n_embd, seed=seed)
    model = gpt.make_item_gpt(n, s, seed=seed, item_vectors=warm).to(device)
    log = gpt.train_item_gpt(model, train_seq, s, seed=seed, val=(val[0], val[1]), progress=progress)
    info.update(gpt_best_epoch=log.best_epoch, gpt_epochs_run=len(log.losses), gpt_losses=log.losses)
    return lambda hist: gpt.score_next_items(model, hist)


def _per_user(res: dict, users: np.ndarray, owner: np.ndarray) -> dict:
    pos, cases = np.unique(owner, return_counts=True)
    return {"user_id": users[pos], "cases": cases,
            **{name: gpt.per_user_mean(res[key], owner) for name, key in NEXTFILM_METRICS.items()}}


def nextfilm_seed(ml: data.MovieLens, seed: int, methods: Sequence[str], s: gpt.ItemGPTSettings, device: str = "cpu",
                  progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """One seed of :func:`nextfilm_benchmark`: (per-user rows, what this run chose and how long it took)."""
    train_seq, val_seq, test_seq = nextfilm_sequences(ml, seed, s)
    val = gpt.leave_last_out(val_seq, n_last=s.n_last)
    test_hist, test_targets, test_owner = gpt.leave_last_out(test_seq, n_last=s.n_last)
    popularity = gpt.popularity_scores(train_seq, train_seq.n_items)
    info = {"seed": seed, "vocabulary": train_seq.n_items, "users": {"train": len(train_seq), "validation": len(val_seq),
            "test": len(test_seq)}, "cases": {"validation": len(val[0]), "test": len(test_hist)}, "val ndcg@10": {}, "seconds": {}}
    fits = {"popularity": lambda: (lambda hist: np.tile(popularity, (len(hist), 1))),
            "cooccurrence": lambda: _cooccurrence(train_seq, val, s, popularity, info),
            "item_gpt": lambda: _item_gpt(train_seq, val, s, seed, device, progress, info)}
    rows = []
    for m in methods:
        t0 = time.perf_counter()
        score = fits[m]()
        info["seconds"][m] = time.perf_counter() - t0
        v = gpt.evaluate_next_item(score(val[0]), val[0], val[1], k=K, n_negatives=None)
        info["val ndcg@10"][m] = float(gpt.per_user_mean(v["full_ndcg"], val[2]).mean())
        res = gpt.evaluate_next_item(score(test_hist), test_hist, test_targets, k=K, n_negatives=N_NEGATIVES, seed=seed)
        rows.append(pd.DataFrame({"seed": seed, "method": m, **_per_user(res, test_seq.users, test_owner)}))
    return pd.concat(rows, ignore_index=True), info


def nextfilm_benchmark(dataset: str | data.MovieLens = "ml-latest-small", seeds: Sequence[int] = (0,),
                       methods: Sequence[str] | None = None, *, settings: gpt.ItemGPTSettings | None = None,
                       device: str = "cpu", progress: bool = False, data_dir: str | None = None) -> NextFilmResult:
    """Chapter 7's next-film comparison (module docstring) on ``dataset`` for each of ``seeds`` (the chapter:
    seed 0), with ``methods`` of :data:`NEXTFILM_METHODS` (default: all) and ``settings`` (default: the
    chapter's). Computes in the default dtype: float64, as the book and ``python -m mrec_bench`` set it."""
    methods = check_methods(methods, NEXTFILM_METHODS)
    seeds = [int(x) for x in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be a non-empty list of distinct ints >= 0, got {seeds!r}.")
    s = gpt.ItemGPTSettings() if settings is None else settings
    if not isinstance(s, gpt.ItemGPTSettings):
        raise TypeError(f"settings must be an ItemGPTSettings, got {type(s).__name__}.")
    ml = data.load_movielens(dataset, data_dir) if isinstance(dataset, str) else dataset
    out = [nextfilm_seed(ml, seed, methods, s, device, progress) for seed in seeds]
    per_user = pd.concat([pu for pu, _ in out], ignore_index=True).pipe(reports.sort_rows, NEXTFILM_METHODS)
    runs = {"dataset": ml.name, "seeds": seeds, "methods": methods, "settings": dataclasses.asdict(s), "split": SPLIT,
            "k": K, "n_negatives": N_NEGATIVES, "dtype": str(torch.get_default_dtype()), "threads": torch.get_num_threads(),
            "intervals": "paired percentile bootstrap, users resampled as clusters", "runs": [info for _, info in out]}
    return NextFilmResult(per_user.assign(dataset=ml.name)[["dataset", *per_user.columns]], runs)


def nextfilm_report(per_user: pd.DataFrame, metric_names: Sequence[str] = ("ndcg@10", "hr@10"), *, n_boot: int = 2000,
                    seed: int = 0) -> pd.DataFrame:
    """One row per (metric, comparison of :data:`COMPARISONS`): both means, the paired difference ``a - b`` and
    its 95% interval (:func:`mrec_bench.reports.paired`: users resampled as clusters; with one seed this is
    chapter 7's interval over users) and its verdict (higher is better)."""
    need = {"seed", "method", "user_id", *metric_names}
    if not isinstance(per_user, pd.DataFrame) or not need <= set(per_user.columns):
        raise ValueError(f"per_user must be a DataFrame with the columns {sorted(need)} (nextfilm_per_user.csv).")
    rows = []
    for metric in metric_names:
        for a, b in COMPARISONS:
            if not {a, b} <= set(per_user["method"]):
                continue
            ci = reports.paired(per_user, a, b, metric, n_boot=n_boot, seed=seed)
            means = per_user.groupby("method")[metric].mean()
            rows.append({"metric": metric, "a": a, "b": b, "a mean": means[a], "b mean": means[b], "difference": ci.estimate,
                         "low": ci.low, "high": ci.high, "p": ci.p_value, "users": ci.n_clusters,
                         "verdict": reports.verdict(ci, metric, a, b)})
    return pd.DataFrame(rows)
