"""The item-GPT of chapter 7: a small GPT-2 whose tokens are films, trained to predict a user's next film.

In file order: the settings, the model, one batch (:func:`pad_batch`, :func:`next_item_loss`), training
(:func:`train_item_gpt`) and scoring; the data (vocabulary, user sequences, leave-last-out cases, training windows);
the baselines (popularity, co-occurrence); the evaluation (history mask, sampled negatives, :func:`evaluate_next_item`).

Conventions:

* Films are *indices* ``0..n_items-1`` into a vocabulary (``ItemSequences.item_ids`` maps them back to MovieLens ids). A
  sequence is a 1-D int64 array of indices in time order, oldest first.
* Inside the GPT, film index i is token i + 1; token 0 (:data:`PAD_TOKEN`) is padding, hidden by the attention mask and
  ignored by the loss (label -100). Scores returned to callers are over films only: shape ``[n, n_items]``.
* Sequences are right-padded, so positions start at 0 for every sequence, as in training.
* A list of GPTs is an *ensemble*: trained in lockstep, scored by the mean of their log-probabilities.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from . import metrics, train

if TYPE_CHECKING:  # transformers is imported when a GPT is made, not with this module
    from transformers import GPT2LMHeadModel

PAD_TOKEN = 0
IGNORE_INDEX = -100
VAL_K = 10  # validation cutoff: full-catalogue nDCG@10


@dataclass(frozen=True)
class ItemGPTSettings:
    """Chapter 7's settings in one place (chapter 8 and the benchmark import them): the vocabulary
    (films rated ``min_count`` times by training users), the GPT (context ``max_len`` films, width,
    blocks, heads, dropout), the warm start's co-occurrence window, AdamW without weight decay for at
    most ``epochs`` epochs with early stopping after ``patience``, the evaluation cases per held-out
    user (``n_last``) and the co-occurrence grid of :func:`tune_cooccurrence`."""

    min_count: int = 5
    max_len: int = 50
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 2
    dropout: float = 0.2
    warm_window: int = 5
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    patience: int = 2
    n_last: int = 10
    cooc_windows: tuple[int, ...] = (1, 2, 5, 10)
    cooc_lasts: tuple[int, ...] = (1, 2, 5, 10)


# ============================================================================ the model, one batch, one epoch
def make_item_gpt(n_items: int, settings: ItemGPTSettings = ItemGPTSettings(), seed: int = 0,
                  item_vectors: np.ndarray | None = None) -> GPT2LMHeadModel:
    """A small GPT-2 (``transformers.GPT2LMHeadModel``, on the CPU) with ``n_items + 1`` tokens.
    The output layer shares its weights with the token embeddings (GPT-2's weight tying), so every film has one vector
    used both to read it and to score it. ``seed`` seeds the initial weights (the global torch RNG is left as it was);
    ``item_vectors`` ([n_items, n_embd], e.g. from :func:`cooccurrence_embeddings`) replace the film embeddings, centred
    and rescaled to GPT-2's initial standard deviation (``initializer_range`` = 0.02)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = settings
    config = GPT2Config(vocab_size=n_items + 1, n_positions=s.max_len, n_embd=s.n_embd, n_layer=s.n_layer,
                        n_head=s.n_head, resid_pdrop=s.dropout, embd_pdrop=s.dropout, attn_pdrop=s.dropout,
                        bos_token_id=PAD_TOKEN, eos_token_id=PAD_TOKEN, pad_token_id=PAD_TOKEN, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    if item_vectors is not None:
        v = torch.as_tensor(np.asarray(item_vectors), dtype=torch.get_default_dtype())
        v = v - v.mean()
        with torch.no_grad():
            model.transformer.wte.weight[1:] = v * (config.initializer_range / v.std())
    return model


def pad_batch(sequences: Sequence[np.ndarray], max_len: int,
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the last ``max_len`` films of each sequence into ``(tokens, mask)`` on ``device``: int64 [n, L]
    (film index + 1, 0 = padding) and bool [n, L], ``L = min(max_len, longest sequence)``."""
    tail = [np.asarray(s, dtype=np.int64)[-max_len:] for s in sequences]
    width = max(1, max(len(s) for s in tail))
    tokens = np.full((len(tail), width), PAD_TOKEN, dtype=np.int64)
    mask = np.zeros((len(tail), width), dtype=bool)
    for r, s in enumerate(tail):
        tokens[r, : len(s)], mask[r, : len(s)] = s + 1, True
    return torch.from_numpy(tokens).to(device), torch.from_numpy(mask).to(device)


def next_item_loss(model: GPT2LMHeadModel, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per predicted film) of predicting each token of ``tokens [B, L]``
    (:func:`pad_batch`) from the ones before it: labels are the inputs shifted by one, padding -100."""
    logits = model(input_ids=tokens, attention_mask=mask.long()).logits  # [B, L, V]
    labels = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)  # [B, L-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def train_epoch(model: GPT2LMHeadModel, opt: torch.optim.Optimizer, windows: list[np.ndarray], batch_size: int,
                rng: np.random.Generator) -> float:
    """One pass over the windows in an order drawn from ``rng``; returns the mean cross-entropy per predicted film.
    Dropout draws from the global torch RNG (seed it for a reproducible epoch)."""
    device = next(model.parameters()).device
    model.train()
    order = rng.permutation(len(windows))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [windows[j] for j in order[start : start + batch_size]]
        tokens, mask = pad_batch(batch, model.config.n_positions, device)
        loss = next_item_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_targets = int(mask[:, 1:].sum())
        total += float(loss.detach()) * n_targets
        count += n_targets
    return total / max(count, 1)


@dataclass
class GPTTrainLog:
    """What :func:`train_item_gpt` did: mean training cross-entropy per epoch (nats per predicted
    film, mean over an ensemble), validation full-catalogue nDCG@10 per epoch (if any), the 1-based
    epoch whose weights are kept and wall-clock seconds."""

    losses: list[float] = field(default_factory=list)
    val_ndcg: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0


def train_item_gpt(model: GPT2LMHeadModel | list[GPT2LMHeadModel], sequences: ItemSequences | list[np.ndarray],
                   settings: ItemGPTSettings = ItemGPTSettings(), seed: int = 0,
                   val: tuple[list[np.ndarray], np.ndarray] | None = None, progress: bool = True) -> GPTTrainLog:
    """Train an item-GPT (or an ensemble, in place) on the windows of ``sequences``: :func:`train_epoch` per epoch,
    then, with ``val = (histories, targets)`` of validation users, their full-catalogue nDCG@10 and early stopping
    (``settings.patience``). Ensemble members train in lockstep, each with its own AdamW state and shuffling (seed
    ``seed + i``); validation scores the ensemble as a whole and every member is restored to its best epoch. ``val``
    only decides *which epoch* is kept: the trajectory is the same without it. ``seed`` also seeds the dropout masks
    (the global torch RNG is restored afterwards). Models are left in eval mode."""
    members = list(model) if isinstance(model, (list, tuple)) else [model]
    windows = training_windows(sequences, members[0].config.n_positions)
    log = GPTTrainLog()
    stopper = train.EarlyStopping(patience=settings.patience, mode="max") if val is not None else None
    kept = torch.nn.ModuleList(members)  # one state_dict for all members (kept and restored together)
    opts = [torch.optim.AdamW(m.parameters(), lr=settings.lr, weight_decay=0.0) for m in members]
    rngs = [np.random.default_rng(seed + i) for i in range(len(members))]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        for _ in train.progress(range(settings.epochs), desc="training item GPT", disable=not progress):
            losses = [train_epoch(m, o, windows, settings.batch_size, r) for m, o, r in zip(members, opts, rngs)]
            log.losses.append(float(np.mean(losses)))
            if stopper is not None:
                scores = score_next_items(members[0] if len(members) == 1 else members, val[0])
                res = evaluate_next_item(scores, val[0], val[1], k=VAL_K, n_negatives=None)
                log.val_ndcg.append(float(res["full_ndcg"].mean()))
                if stopper.step(log.val_ndcg[-1], kept):
                    break
    if stopper is not None:
        stopper.restore(kept)
    log.best_epoch = stopper.best_step + 1 if stopper is not None else len(log.losses)
    for m in members:
        m.eval()
    log.seconds = time.perf_counter() - start
    return log


@torch.no_grad()
def score_next_items(model: GPT2LMHeadModel | list[GPT2LMHeadModel], histories: Sequence[np.ndarray],
                     batch_size: int = 256) -> np.ndarray:
    """Next-film scores after each of n histories (at least one film each; the last ``max_len`` are
    read, in context, no gradient step): float64 [n, n_items], the logits after the last film, or for
    an ensemble the members' mean log-probability (the geometric mean of their distributions)."""
    if isinstance(model, (list, tuple)):
        logp = [torch.log_softmax(torch.from_numpy(score_next_items(m, histories, batch_size)), dim=1).numpy()
                for m in model]
        return sum(logp[1:], logp[0]) / len(logp)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty((len(histories), model.config.vocab_size - 1), dtype=np.float64)
    for b in range(0, len(histories), batch_size):
        tokens, mask = pad_batch(histories[b : b + batch_size], model.config.n_positions, device)
        logits = model(input_ids=tokens, attention_mask=mask.long()).logits  # [B, L, V]
        last = mask.sum(1) - 1
        out[b : b + len(last)] = logits[torch.arange(len(last), device=device), last, 1:].double().cpu().numpy()
    model.train(was_training)
    return out


# ============================================================================ the data: vocabulary, user sequences, evaluation cases, training windows
@dataclass
class ItemSequences:
    """Chronological film histories: ``users [n_users]`` int64, ``sequences`` (one int64 array of film
    indices per user, oldest first), ``item_ids [n_items]`` the sorted MovieLens id of each index."""

    users: np.ndarray
    sequences: list[np.ndarray]
    item_ids: np.ndarray

    @property
    def n_items(self) -> int:
        return int(len(self.item_ids))

    def subset(self, users: Sequence[int] | np.ndarray) -> ItemSequences:
        """The sequences of ``users`` (in the given order); KeyError for an unknown user."""
        users = np.asarray(users, dtype=np.int64).ravel()
        pos = {int(u): i for i, u in enumerate(self.users.tolist())}
        return ItemSequences(users, [self.sequences[pos[int(u)]] for u in users], self.item_ids)

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        n = np.array([len(s) for s in self.sequences], dtype=np.int64)
        med = int(np.median(n)) if len(n) else 0
        return f"ItemSequences({len(self)} users, {self.n_items} items, {int(n.sum())} events, median length {med})"


def build_item_vocab(ratings: pd.DataFrame, min_count: int = 5) -> np.ndarray:
    """Film ids with at least ``min_count`` ratings in ``ratings``, sorted ascending (int64 [n_items]). Build it from
    the *training* users only, so that held-out users cannot influence which films exist (SASRec-style preprocessing
    drops rare items for the same reason: a sequence model cannot learn a token it has seen a handful of times)."""
    counts = ratings["item_id"].value_counts()
    return np.sort(counts.index[counts.to_numpy() >= min_count].to_numpy().astype(np.int64))


def user_sequences(ratings: pd.DataFrame, item_ids: np.ndarray | None = None,
                   users: Sequence[int] | np.ndarray | None = None, seed: int = 0) -> ItemSequences:
    """Each user's films in time order, as indices into the sorted vocabulary ``item_ids`` (``None``: every film in
    ``ratings``; other films are dropped), for ``users`` in this order (``None``: all, sorted; a user without any known
    film gets an empty sequence). Same-second ratings (a user rating a page of films at once) are ordered by a key
    seeded with ``seed``, not by film id: ids follow the order films entered the catalogue, and a model could learn "the
    next id is larger". The row order of ``ratings`` does not matter."""
    missing = {"user_id", "item_id", "timestamp"} - set(ratings.columns)
    if missing:
        raise ValueError(f"ratings is missing the column(s) {sorted(missing)}; pass data.load_movielens(...).ratings.")
    df = ratings[["user_id", "item_id", "timestamp"]]
    vocab = np.unique(df["item_id"].to_numpy().astype(np.int64)) if item_ids is None else np.asarray(item_ids, dtype=np.int64)
    # canonical order first, then a random key per row in that order, then sort by (user, time, key)
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    key = np.random.default_rng(seed).random(len(df))
    df = df.assign(_key=key).sort_values(["user_id", "timestamp", "_key"], kind="stable")
    it = df["item_id"].to_numpy().astype(np.int64)
    pos = np.clip(np.searchsorted(vocab, it), 0, len(vocab) - 1)
    known = vocab[pos] == it
    u = df["user_id"].to_numpy().astype(np.int64)[known]
    idx = pos[known]
    want = np.unique(df["user_id"].to_numpy().astype(np.int64)) if users is None else np.asarray(users, dtype=np.int64)
    starts, ends = np.searchsorted(u, want, side="left"), np.searchsorted(u, want, side="right")
    return ItemSequences(want.copy(), [idx[s:e].copy() for s, e in zip(starts, ends)], vocab.copy())


def leave_last_out(sequences: ItemSequences | Sequence[np.ndarray], n_last: int = 1,
                   min_history: int = 1) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Leave-one-out cases: each of a user's last ``n_last`` positions t with at least ``min_history``
    films before it gives history ``s[:t]`` and target ``s[t]`` (``n_last=1``: the classic protocol).
    Returns ``(histories, targets, owner)``: history arrays, int64 targets [n_cases] and the position
    of each case's user in ``sequences`` [n_cases] (a user's cases consecutive, oldest first)."""
    seqs = _as_list(sequences)
    cases = [(i, t) for i, s in enumerate(seqs) for t in range(max(min_history, len(s) - n_last), len(s))]
    targets = np.array([seqs[i][t] for i, t in cases], dtype=np.int64)
    return [seqs[i][:t] for i, t in cases], targets, np.array([i for i, _ in cases], dtype=np.int64)


def training_windows(sequences: ItemSequences | Sequence[np.ndarray], max_len: int, min_len: int = 2) -> list[np.ndarray]:
    """Windows of ``min_len..max_len`` films, aligned to the end of each sequence and overlapping by
    one film: every transition ``s[t] -> s[t+1]`` is a target once, the most recent with full context."""
    out: list[np.ndarray] = []
    for s in _as_list(sequences):
        end = len(s)
        while end >= min_len:
            begin = max(0, end - max_len)
            out.append(s[begin:end])
            if begin == 0:
                break
            end = begin + 1
    return out


def _as_list(sequences: ItemSequences | Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    return sequences.sequences if isinstance(sequences, ItemSequences) else sequences


def per_user_mean(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Average the cases of each user: one number per user (users in sorted order of ``owner``)."""
    _, user_pos = np.unique(owner, return_inverse=True)
    return np.bincount(user_pos, weights=values) / np.bincount(user_pos)


# ============================================================================ baselines: popularity and co-occurrence
def popularity_scores(sequences: ItemSequences | Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """How often each film occurs in ``sequences`` (the training users): float64 [n_items]."""
    seqs = _as_list(sequences)
    flat = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def cooccurrence_counts(sequences: ItemSequences | Sequence[np.ndarray], n_items: int, window: int = 5) -> np.ndarray:
    """``C[i, j]`` = times film j comes at most ``window`` steps after film i: float32 [n_items, n_items]."""
    seqs = _as_list(sequences)
    flat = np.zeros(n_items * n_items, dtype=np.int64)
    for d in range(1, window + 1):
        long = [s for s in seqs if len(s) > d]
        if not long:
            break
        a, b = np.concatenate([s[:-d] for s in long]), np.concatenate([s[d:] for s in long])
        flat += np.bincount(a * n_items + b, minlength=n_items * n_items)
    return flat.reshape(n_items, n_items).astype(np.float32)


def cooccurrence_scores(counts: np.ndarray, histories: Sequence[np.ndarray], last: int | None = None,
                        popularity: np.ndarray | None = None) -> np.ndarray:
    """float64 [n, n_items]: ``score[u, j] = sum of counts[i, j]`` over the last ``last`` films i of
    history u, plus ``1e-6 * popularity[j] / max(popularity)`` if given (ties go to popular films)."""
    out = np.empty((len(histories), counts.shape[0]), dtype=np.float64)
    for r, h in enumerate(histories):
        out[r] = counts[h if last is None else h[-last:]].sum(axis=0, dtype=np.float64)
    if popularity is not None:
        p = np.asarray(popularity, dtype=np.float64)
        out += 1e-6 * p / max(p.max(), 1e-12)
    return out


def tune_cooccurrence(train_seq: ItemSequences, val_cases: tuple[list[np.ndarray], np.ndarray, np.ndarray],
                      settings: ItemGPTSettings = ItemGPTSettings()) -> tuple[pd.DataFrame, tuple[int, int]]:
    """Choose the co-occurrence window ``w`` and history length ``m`` on validation cases
    ``(histories, targets, owner)``: each pair of ``settings.cooc_windows`` x ``cooc_lasts`` is scored
    by full-catalogue nDCG@10 per user, then over users; ties go to the earlier pair. Returns the grid
    (``window w``, ``last m films``, ``val nDCG@10``) and the best ``(w, m)``."""
    hist, targets, owner = val_cases
    popularity = popularity_scores(train_seq, train_seq.n_items)
    rows = []
    for window in settings.cooc_windows:
        counts = cooccurrence_counts(train_seq, train_seq.n_items, window=window)
        for last in settings.cooc_lasts:
            scores = cooccurrence_scores(counts, hist, last=last, popularity=popularity)
            res = evaluate_next_item(scores, hist, targets, k=VAL_K, n_negatives=None)
            rows.append({"window w": window, "last m films": last, "val nDCG@10": per_user_mean(res["full_ndcg"], owner).mean()})
    grid = pd.DataFrame(rows)
    best = grid.loc[train.pick_best(grid.index, grid["val nDCG@10"].get)]
    return grid, (int(best["window w"]), int(best["last m films"]))


def cooccurrence_embeddings(counts: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Film vectors float64 [n_items, dim] for the GPT's warm start: a seeded randomised SVD of
    ``S = log(1 + C + C^T)``, film i gets ``U[i, :dim] * sqrt(s[:dim])``, so dot products approximate
    ``S`` (the count-based cousin of item2vec / word2vec)."""
    from sklearn.utils.extmath import randomized_svd

    c = np.asarray(counts, dtype=np.float64)
    u, sv, _ = randomized_svd(np.log1p(c + c.T), dim, n_iter=3, random_state=seed)
    return u * np.sqrt(sv)


# ============================================================================ evaluation
def history_mask(histories: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Boolean [n, n_items], True at the films of each history (to exclude them from a ranking)."""
    m = np.zeros((len(histories), n_items), dtype=bool)
    for r, h in enumerate(histories):
        m[r, h] = True
    return m


def sample_negatives(histories: Sequence[np.ndarray], targets: np.ndarray, n_items: int, n_negatives: int = 100,
                     seed: int = 0) -> np.ndarray:
    """int64 [n, n_negatives]: per case, distinct films drawn uniformly outside the history and the
    target (SASRec's sampled protocol, Kang & McAuley 2018), seeded per call."""
    rng = np.random.default_rng(seed)
    out = np.empty((len(histories), n_negatives), dtype=np.int64)
    for r, (h, y) in enumerate(zip(histories, np.asarray(targets, dtype=np.int64))):
        banned = np.zeros(n_items, dtype=bool)
        banned[h] = banned[y] = True
        out[r] = rng.choice(np.flatnonzero(~banned), size=n_negatives, replace=False)
    return out


def evaluate_next_item(scores: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray, k: int = 10,
                       n_negatives: int | None = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Leave-one-out metrics per case from ``scores [n, n_items]`` (higher = better).
    Full catalogue: every film but the history's is ranked; ``HR@k`` and ``nDCG@k = 1 / log2(rank + 1)``
    (:func:`mrec_utils.metrics.topk_metrics`). Sampled (unless ``n_negatives=None``): the target
    against :func:`sample_negatives`, ties counted halfway (:func:`mrec_utils.metrics.rank_of`).
    Returns float64 [n] arrays ``full_hr``, ``full_ndcg`` and ``sampled_hr``, ``sampled_ndcg``, ``sampled_rank``."""
    s = np.asarray(scores, dtype=np.float64)
    n, n_items = s.shape
    t = np.asarray(targets, dtype=np.int64)
    excl = history_mask(histories, n_items)
    if excl[np.arange(n), t].any():
        bad = int(np.flatnonzero(excl[np.arange(n), t])[0])
        raise ValueError(f"case {bad}: the target is also in the history (leakage); fix the split.")
    rel = np.zeros((n, n_items), dtype=bool)
    rel[np.arange(n), t] = True
    full = metrics.topk_metrics(s, rel, exclude=excl, k=k)
    out = {"full_hr": full["hr"], "full_ndcg": full["ndcg"]}
    if n_negatives is not None:
        neg = sample_negatives(histories, t, n_items, n_negatives, seed=seed)
        ranks = np.array([metrics.rank_of(s[r, t[r]], s[r, neg[r]], ties="average") for r in range(n)])
        out["sampled_rank"] = ranks
        out["sampled_hr"] = (ranks <= k).astype(np.float64)
        out["sampled_ndcg"] = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return out
