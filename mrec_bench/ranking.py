"""Chapters 5, 7 and 9 on chapter 5's episodes: every method ranks every test user's query films.

The methods predict different things (star ratings, the next film, like or dislike), but all of them
can order an episode's query films. Per seed, :func:`mrec_utils.coldstart.prepare_data` draws the split
and the episodes exactly as the cold-start comparison does; then

* chapter 5's rating models (:data:`mrec_utils.coldstart.METHODS`) score a film by its predicted rating;
* chapter 7's id-based models (:mod:`mrec_utils.gpt`) know films as tokens of a vocabulary of films with
  ``gpt.min_count`` training ratings: ``popularity``, ``cooccurrence`` with the support films and the
  ``item_gpt``'s next-film logit after reading the support films in time order (no gradient step). A film
  outside the vocabulary scores below every known film; a support film outside it is left out of the
  prompt; with an empty prompt every query film ties;
* chapter 9's like-heads (:func:`mrec_utils.heads.fit_heads`) read frozen language-model embeddings
  of each film's text, so a film nobody rated has features too.

Metrics (:func:`ranking_metrics`): in-query nDCG@3 with graded gains and like/dislike AUC.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from mrec_utils import coldstart, data, gpt, lm, metrics, train
from mrec_utils import heads as gm

from .speed import sync

RANKING_METHODS: dict[str, str] = {
    **{m: f"ch. 5: {d.about}" for m, d in coldstart.METHODS.items()},
    "popularity": "ch. 7: how many training users rated the film",
    "cooccurrence": "ch. 7: co-occurrence counts with the last m support films",
    "item_gpt": "ch. 7: item-GPT next-film logit after reading the support films (in context)",
    "head_global": "ch. 9: one like-head on LM text features for everybody",
    "head_logreg": "ch. 9: per-user logistic regression on LM features, from scratch",
    "head_finetune": "ch. 9: the global head fine-tuned on the support",
    "head_maml": "ch. 9: MAML head",
    "head_fomaml": "ch. 9: first-order MAML head",
    "head_anil": "ch. 9: ANIL head (only the last layer adapted)",
    "head_reptile": "ch. 9: Reptile head",
    "head_proto": "ch. 9: prototypical network on LM features",
    "head_residual": "ch. 9: Meta-SGD residual head (global head + per-user linear term)",
}
"""Methods of :func:`ranking_benchmark`, in the order of the book's tables."""

ITEM_MODELS = ("popularity", "cooccurrence", "item_gpt")
RANKING_CHAPTER: dict[str, int] = {m: 5 if m in coldstart.METHODS else 7 if m in ITEM_MODELS else 9 for m in RANKING_METHODS}
"""The chapter of each method (5, 7 or 9)."""

RANKING_METRICS: tuple[str, ...] = ("ndcg@3", "auc")
"""Per-user metrics of :func:`ranking_metrics`."""


@dataclass(frozen=True)
class RankingSettings:
    """The settings of :func:`ranking_benchmark`: the chapters' own settings objects, plus the text features.

    ``coldstart``: chapter 5's :class:`~mrec_utils.coldstart.ColdStartSettings` (episodes and rating models);
    ``gpt``: chapter 7's :class:`~mrec_utils.gpt.ItemGPTSettings` (at most 10 epochs here instead of 20:
    with patience 2 both stop within the first few; co-occurrence's window and history grids reach 50 and
    20, because the chapter's grids ended at 10, a frequent choice); ``heads``: chapter 9's
    :class:`~mrec_utils.heads.HeadSettings`, as they are. The heads' features: the LM (``lm``, None = the offline
    default), its first ``layers`` blocks, ``components`` PCA dimensions, trained on the films with
    ``min_item_count`` training ratings. A rating >= ``like_threshold`` is a like for the AUC (the heads' own
    like is :data:`mrec_utils.heads.LIKE`, 4.0 too).
    """

    coldstart: coldstart.ColdStartSettings = field(default_factory=coldstart.ColdStartSettings)
    gpt: gpt.ItemGPTSettings = field(default_factory=lambda: gpt.ItemGPTSettings(
        epochs=10, cooc_windows=(1, 2, 5, 10, 20, 50), cooc_lasts=(1, 2, 5, 10, 20)))
    heads: gm.HeadSettings = field(default_factory=gm.HeadSettings)
    lm: str | None = None
    layers: int = 8
    components: int = 64
    min_item_count: int = 25
    like_threshold: float = 4.0


@dataclass
class MethodRun:
    """One fitted method of one seed: ``score()`` -> [T, Q] scores of the test episodes' query films,
    the seconds it took to fit, its learned numbers and the numbers it adapts per user (None: counted
    in chapter 5's cost table)."""

    score: Callable[[], np.ndarray]
    train_s: float
    parameters: int | None = None
    adapted: int | None = None


def ranking_metrics(scores: np.ndarray, ratings: np.ndarray, mask: np.ndarray, like_threshold: float = 4.0) -> pd.DataFrame:
    """Per-episode ranking quality of the query films.

    Args:
        scores: [T, Q] (higher = ranked first), finite on real slots; ratings: [T, Q]; mask: [T, Q] bool.

    Returns:
        one row per episode: ``ndcg@3`` (gains ``2**r - 1``, tied scores averaged), ``auc`` (like = rating
        >= ``like_threshold``; ties count 1/2; NaN when the query holds one class only), ``n_like``, ``n_query``.
    """
    s, y, m = (np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a) for a in (scores, ratings, mask))
    s, y, m = s.astype(np.float64), y.astype(np.float64), m.astype(bool)
    if s.ndim != 2 or s.shape != y.shape or s.shape != m.shape:
        raise ValueError(f"scores, ratings and mask must have one shape [T, Q], got {s.shape}, {y.shape}, {m.shape}.")
    if not np.isfinite(s[m]).all():
        raise ValueError("scores contain NaN or inf on real query films.")
    like = (y >= like_threshold) & m
    return pd.DataFrame({"ndcg@3": metrics.ndcg_at_k_batch(np.where(m, y, 0), np.where(m, s, 0), 3, ties="average", mask=m),
                         "auc": metrics.auc_batch(like, np.where(m, s, 0), mask=m), "n_like": like.sum(1), "n_query": m.sum(1)})


# ------------------------------------------------------------------------------------------------ chapter 7


def lowest_for_unknown(full: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Gather ``full [T, n_items]`` at ``idx [T, Q]``; unknown films (idx < 0) score below every known one."""
    q = np.take_along_axis(full, np.clip(idx, 0, None), axis=1).astype(np.float64)
    return np.where(idx >= 0, q, full.min(axis=1, keepdims=True).astype(np.float64) - 1.0)


def encode(vocab: pd.Index, episodes: Sequence) -> tuple[list[np.ndarray], np.ndarray]:
    """Support films as vocabulary indices in time order (unknown ones dropped), query films [T, Q] (-1 = unknown)."""
    prompts = [(lambda r: r[r >= 0])(vocab.get_indexer(e.support_items)) for e in episodes]
    q = np.full((len(episodes), max(len(e.query_items) for e in episodes)), -1, dtype=np.int64)
    for t, e in enumerate(episodes):
        q[t, : len(e.query_items)] = vocab.get_indexer(e.query_items)
    return prompts, q


def _scores_with_prompts(prompts: list[np.ndarray], q: np.ndarray, full_of: Callable[[list[np.ndarray]], np.ndarray],
                         empty: np.ndarray) -> np.ndarray:
    """Catalogue scores from ``full_of(non-empty prompts)``; an empty prompt gets the row ``empty``."""
    full = np.tile(empty, (len(prompts), 1))
    rows = [i for i, p in enumerate(prompts) if len(p)]
    if rows:
        full[rows] = full_of([prompts[i] for i in rows])
    return lowest_for_unknown(full, q)


def item_model_runs(d: coldstart.ColdStartData, s: gpt.ItemGPTSettings, methods: Sequence[str],
                    progress: bool = False) -> tuple[dict[str, MethodRun], dict]:
    """Chapter 7's popularity, co-occurrence and item-GPT on one seed's split (``d``), as :class:`MethodRun` s.

    Co-occurrence's window and history length are chosen by the validation episodes' in-query nDCG@3; the
    GPT (warm-started from co-occurrence embeddings) stops early on the validation episodes' known query
    films. When no evaluation episode has a known support and query film, nothing is trained (all tie).
    """
    vocab = gpt.build_item_vocab(d.train, min_count=s.min_count)
    index, n = pd.Index(vocab), len(vocab)
    seqs = gpt.user_sequences(d.train, vocab, seed=d.seed)
    pop = gpt.popularity_scores(seqs, n)
    val_p, val_q = encode(index, d.val_episodes)
    tst_p, tst_q = encode(index, d.test_episodes)
    useful = any(len(p) and (q >= 0).any() for p, q in zip(val_p + tst_p, list(val_q) + list(tst_q)))
    info = {"vocabulary": n, "test users with an empty prompt": int(sum(len(p) == 0 for p in tst_p)),
            "test query films unknown to the GPT": float((tst_q < 0)[d.test.mask_query.cpu().numpy()].mean())}
    runs = {"popularity": MethodRun(lambda: lowest_for_unknown(np.tile(pop, (len(tst_p), 1)), tst_q), 0.0, n, 0)}
    tie = MethodRun(lambda: np.zeros(tst_q.shape), 0.0, 0, 0)  # nothing to rank with
    tie_break = 1e-6 * pop / max(pop.max(), 1e-12)

    def cooc(counts: np.ndarray, last: int, prompts: list[np.ndarray], q: np.ndarray) -> np.ndarray:
        return _scores_with_prompts(prompts, q, lambda ps: gpt.cooccurrence_scores(counts, ps, last=last, popularity=pop), tie_break)

    if "cooccurrence" in methods:
        runs["cooccurrence"] = tie
        if useful:
            t0 = time.perf_counter()
            y, m = d.val.y_query.cpu().numpy(), d.val.mask_query.cpu().numpy()
            counts = {w: gpt.cooccurrence_counts(seqs, n, window=w) for w in s.cooc_windows}
            val = {(w, last): float(np.nanmean(ranking_metrics(cooc(counts[w], last, val_p, val_q), y, m)["ndcg@3"]))
                   for w in s.cooc_windows for last in s.cooc_lasts}
            w, last = train.pick_best(val, val.get)
            info.update(cooc_window=w, cooc_last=last)
            runs["cooccurrence"] = MethodRun(lambda: cooc(counts[w], last, tst_p, tst_q), time.perf_counter() - t0,
                                             int(np.count_nonzero(counts[w])), 0)
    if "item_gpt" in methods:
        runs["item_gpt"] = tie
        if useful:
            t0 = time.perf_counter()
            warm = gpt.cooccurrence_embeddings(gpt.cooccurrence_counts(seqs, n, window=s.warm_window), dim=s.n_embd, seed=d.seed)
            model = gpt.make_item_gpt(n, s, seed=d.seed, item_vectors=warm).to(d.device)
            # validation cases: each known query film of a validation episode, after its known support films
            cases = [(p, int(t)) for p, q in zip(val_p, val_q) if len(p) for t in q if t >= 0]
            val = ([c[0] for c in cases], np.array([c[1] for c in cases], dtype=np.int64)) if cases else None
            log = gpt.train_item_gpt(model, seqs, s, seed=d.seed, val=val, progress=progress)
            info.update(gpt_best_epoch=log.best_epoch, gpt_epochs_run=len(log.losses))
            empty = np.array([len(p) == 0 for p in tst_p])

            def gpt_scores() -> np.ndarray:
                out = _scores_with_prompts(tst_p, tst_q, lambda ps: gpt.score_next_items(model, ps), np.zeros(n))
                out[empty] = 0.0  # an empty prompt: every query film ties
                return out
            runs["item_gpt"] = MethodRun(gpt_scores, time.perf_counter() - t0, sum(p.numel() for p in model.parameters()), 0)
    return runs, info


# ------------------------------------------------------------------------------------------------ chapter 9


def _head_size(name: str, fitted: gm.FittedHeads, n_features: int) -> tuple[int, int]:
    """(learned numbers, numbers adapted per user) of one head; the frozen LM is counted apart."""
    if name == "logreg":
        return 0, n_features + 1
    if name == "proto":
        return sum(p.numel() for p in fitted.heads["proto"].body.parameters()), 0
    model = fitted.heads.get(name, fitted.heads["global"])
    n = sum(p.numel() for p in model.parameters())
    if name == "global":
        return n, 0
    if name == "anil":
        return n, sum(p.numel() for p in model.head.parameters())
    if name == "residual":  # the frozen global head, the per-user start and one step size per adapted number
        ad = sum(getattr(model, a).numel() for a in model.ADAPT)
        return sum(p.numel() for p in model.base.parameters()) + ad + sum(v.numel() for v in fitted.choices["residual_lrs"].values()), ad
    return n, n


def head_runs(d: coldstart.ColdStartData, ml: data.MovieLens, llm: lm.LoadedLM, s: RankingSettings,
              methods: Sequence[str]) -> tuple[dict[str, MethodRun], dict]:
    """Chapter 9's like-heads on one seed's split, as :class:`MethodRun` s (keys ``head_<method>``).

    The film texts (:func:`mrec_utils.data.item_text`: title, year and genres, no user-written tags, as in
    chapters 8-11) of the head catalogue (films with ``s.min_item_count`` training ratings) and of every
    episode film are embedded (cached on disk); the PCA is fitted on the catalogue only, so a film's
    features do not depend on which episodes were drawn.
    """
    counts = d.train.item_id.value_counts()
    catalogue = np.sort(counts.index[counts.to_numpy() >= s.min_item_count].to_numpy().astype(np.int64))
    eps = list(d.val_episodes) + list(d.test_episodes)
    need = np.unique(np.concatenate([catalogue] + [e.support_items for e in eps] + [e.query_items for e in eps]).astype(np.int64))
    texts = data.item_text(ml.items).reindex(need)  # tags come from users, evaluated ones too
    if texts.isna().any():
        raise ValueError(f"films without text: {need[texts.isna().to_numpy()][:5].tolist()}")
    t0 = time.perf_counter()
    raw = lm.embed_texts(texts.tolist(), llm, layers=s.layers, pooling="mean", normalize=True, progress=False)
    info = {"head catalogue": int(len(catalogue)), "texts embedded": int(len(need)), "embed_seconds": time.perf_counter() - t0,
            "frozen LM parameters": int(sum(p.numel() for p in llm.model.parameters()))}
    feats = gm.lm_item_features(raw, n_components=s.components, fit_rows=np.searchsorted(need, catalogue))
    pools = gm.rating_pools(d.train[d.train.item_id.isin(catalogue)], need)
    val = gm.like_tasks(d.val_episodes, feats, need, device=d.device)  # a like is a rating >= heads.LIKE
    names = [m.removeprefix("head_") for m in methods]
    fitted = gm.fit_heads(pools, torch.as_tensor(feats, device=d.device), [val], names, s.heads, seed=d.seed)
    info.update({k: (list(v) if k == "finetune" else v) for k, v in fitted.choices.items()
                 if k in ("logreg_l2", "finetune", "residual_learn_init")})
    sec = fitted.seconds
    test = lambda: gm.like_tasks(d.test_episodes, feats, need, device=d.device)  # noqa: E731
    runs = {}
    for name in names:  # the meta-learners and fine-tuning start from the global head: their cost includes it
        own = sec.get(f"{name} (choice)", sec.get(name, 0.0))
        fit_s = own if name in ("global", "logreg", "proto") else sec["global"] + own
        runs[f"head_{name}"] = MethodRun((lambda f: lambda: f(test()))(fitted.scorers[name]), fit_s,
                                         *_head_size(name, fitted, feats.shape[1]))
    return runs, info


# ------------------------------------------------------------------------------------------------ one seed, several seeds


def score_runs(runs: dict[str, MethodRun], d: coldstart.ColdStartData, seed: int, like_threshold: float) -> tuple[pd.DataFrame, list[dict]]:
    """Score every run on the test episodes: per-user metrics and one cost row per method (adaptation timed)."""
    et = d.test
    y, mask = et.y_query.cpu().numpy(), et.mask_query.cpu().numpy()
    rows, cost = [], []
    for m, r in runs.items():
        sync(d.device)
        t0 = time.perf_counter()
        s = r.score()
        sync(d.device)
        secs = time.perf_counter() - t0
        s = np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s, dtype=np.float64)
        ev = ranking_metrics(s, y, mask, like_threshold)
        ev.insert(0, "user_id", d.test_users)
        for col, v in (("chapter", RANKING_CHAPTER[m]), ("method", m), ("seed", seed)):
            ev.insert(0, col, v)
        rows.append(ev)
        cost.append({"seed": seed, "method": m, "train s": float(r.train_s), "adapt ms / user": 1e3 * secs / len(et),
                     "parameters": r.parameters, "adapted / user": r.adapted})
    return pd.concat(rows, ignore_index=True), cost


def chapter5_runs(d: coldstart.ColdStartData, methods: Sequence[str], fitted: dict | None = None) -> dict[str, MethodRun]:
    """Chapter 5's rating models as :class:`MethodRun` s (fitted here unless ``fitted[method]`` is given)."""
    lo, hi = d.rating_range
    out = {}
    for m in methods:
        f = (fitted or {}).get(m)
        if f is None:
            train.seed_everything(d.seed)
            f = coldstart.METHODS[m].fit(d)
        out[m] = MethodRun((lambda f_: lambda: np.clip(f_.predict(d.test, d.test_users, False)[0], lo, hi))(f), f.seconds)
    return out


def ranking_seed(ml: data.MovieLens, d: coldstart.ColdStartData, methods: Sequence[str], s: RankingSettings,
                 llm: lm.LoadedLM | None = None, fitted: dict | None = None, progress: bool = False) -> tuple[pd.DataFrame, list, dict]:
    """Every method of ``methods`` on one seed's data ``d``: (per-user metrics, cost rows, what was chosen)."""
    runs = chapter5_runs(d, [m for m in methods if RANKING_CHAPTER[m] == 5], fitted)
    info: dict = {}
    if any(RANKING_CHAPTER[m] == 7 for m in methods):
        r7, i7 = item_model_runs(d, s.gpt, [m for m in methods if RANKING_CHAPTER[m] == 7], progress)
        runs.update({m: r7[m] for m in methods if m in r7})
        info.update(i7)
    if any(RANKING_CHAPTER[m] == 9 for m in methods):
        llm = lm.load_causal_lm(s.lm, device=d.device) if llm is None else llm
        r9, i9 = head_runs(d, ml, llm, s, [m for m in methods if RANKING_CHAPTER[m] == 9])
        runs.update(r9)
        info.update(i9)
    per_user, cost = score_runs({m: runs[m] for m in methods}, d, d.seed, s.like_threshold)
    return per_user, cost, info


@dataclass
class RankingResult:
    """Output of :func:`ranking_benchmark`: ``per_user`` (seed, method, chapter, user_id, ndcg@3, auc, n_like,
    n_query), ``cost`` (seed, method, train s, adapt ms / user, parameters, adapted / user), ``info`` (per seed,
    what validation chose and how much of the episodes each model knows) and ``settings``."""

    per_user: pd.DataFrame
    cost: pd.DataFrame
    info: dict
    settings: dict


def check_methods(methods: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """``methods`` (default: all of ``known``) in the order of ``known``; a clear error for unknown or repeated ones."""
    methods = list(known) if methods is None else methods
    if isinstance(methods, str) or not methods or any(m not in known for m in methods):
        raise ValueError(f"methods must be a non-empty list of {', '.join(known)}; got {methods!r}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods contains duplicates: {methods!r}.")
    return [m for m in known if m in set(methods)]


def ranking_benchmark(dataset: str | data.MovieLens = "ml-latest-small", scenario: str = "user-cold", shots: int = 10,
                      seeds: Sequence[int] = (0,), methods: Sequence[str] | None = None, *, settings: RankingSettings | None = None,
                      llm: lm.LoadedLM | None = None, progress: bool = False, **split_kwargs) -> RankingResult:
    """Chapters 5, 7 and 9 ranking the query films of chapter 5's episodes (module docstring), over ``seeds``.

    Args:
        dataset: a release name (:func:`mrec_utils.data.load_movielens`) or a loaded MovieLens.
        scenario, shots, seeds: as for :func:`mrec_utils.coldstart.run_coldstart` (``shots`` an int).
        methods: keys of :data:`RANKING_METHODS` (default: all).
        llm: a loaded LM (default: ``settings.lm`` loaded when a chapter-9 method runs).
        split_kwargs: passed to :func:`mrec_utils.tasks.make_split`.
    """
    methods = check_methods(methods, RANKING_METHODS)
    if scenario not in coldstart.SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(coldstart.SCENARIOS)}.")
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an int >= 1 (the support size k), got {shots!r}.")
    seeds = [int(x) for x in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be a non-empty list of distinct ints >= 0, got {seeds!r}.")
    s = RankingSettings() if settings is None else settings
    if not isinstance(s, RankingSettings):
        raise TypeError(f"settings must be a RankingSettings, got {type(s).__name__}.")
    ml = data.load_movielens(dataset) if isinstance(dataset, str) else dataset
    rows, cost, info = [], [], {}
    for seed in seeds:
        d = coldstart.prepare_data(ml, scenario, int(shots), seed, s.coldstart, **split_kwargs)
        pu, c, info[seed] = ranking_seed(ml, d, methods, s, llm, progress=progress)
        rows.append(pu)
        cost += c
    settings_doc = dict(dataset=ml.name, scenario=scenario, shots=int(shots), seeds=seeds, methods=methods,
                        settings=dataclasses.asdict(s), split_kwargs=split_kwargs)
    return RankingResult(pd.concat(rows, ignore_index=True), pd.DataFrame(cost), info, settings_doc)
