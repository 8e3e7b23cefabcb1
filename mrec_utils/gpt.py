"""The item-GPT of chapter 7: a small GPT-2 whose tokens are films, trained to predict a user's next film.

Read it in this order: :class:`ItemGPTSettings` (the chapter's settings), :func:`make_item_gpt` (the
model), :func:`pad_batch` and :func:`next_item_loss` (one batch), :func:`train_epoch` (one pass over the
data), :func:`train_item_gpt` (epochs with early stopping on validation users) and
:func:`score_next_items`. Then the data (vocabulary, user sequences, leave-last-out cases, training
windows), the baselines the GPT is compared with (popularity, co-occurrence) and the evaluation
(history mask, sampled negatives, :func:`evaluate_next_item`).

Conventions:

* Films are *indices* ``0..n_items-1`` into a vocabulary (``ItemSequences.item_ids`` maps them back
  to MovieLens ids). A sequence is a 1-D int64 array of indices in time order, oldest first.
* Inside the GPT, film index i is token i + 1; token 0 (:data:`PAD_TOKEN`) is padding, hidden by the
  attention mask and ignored by the loss (label -100). Scores returned to callers are over films
  only: shape ``[n, n_items]``.
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

if TYPE_CHECKING:  # transformers is imported when a GPT is made, not with this module
    from transformers import GPT2LMHeadModel

PAD_TOKEN = 0
IGNORE_INDEX = -100
VAL_K = 10  # validation cutoff: full-catalogue nDCG@10


@dataclass(frozen=True)
class ItemGPTSettings:
    """Chapter 7's settings in one place (chapter 8 and the benchmark import them).

    Attributes:
        min_count: a film is a token when the training users rated it at least this often.
        max_len, n_embd, n_layer, n_head, dropout: the GPT (context in films, width, blocks,
            attention heads, dropout of embeddings, residual branches and attention weights).
        warm_window: co-occurrence window of the warm start (:func:`cooccurrence_embeddings`).
        epochs, batch_size, lr: AdamW (no weight decay) for at most ``epochs`` epochs.
        patience: stop after this many epochs without validation progress (when validation users are given).
        n_last: evaluation cases per held-out user (each of their last ``n_last`` films).
        cooc_windows, cooc_lasts: the co-occurrence grid tuned on validation users (:func:`tune_cooccurrence`).
    """

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


# ------------------------------------------------------------------------------------------------
# the model, one batch, one epoch
# ------------------------------------------------------------------------------------------------


def make_item_gpt(n_items: int, settings: ItemGPTSettings = ItemGPTSettings(), seed: int = 0,
                  item_vectors: np.ndarray | None = None) -> GPT2LMHeadModel:
    """A small GPT-2 (``transformers.GPT2LMHeadModel``) whose tokens are films.

    Vocabulary: ``n_items + 1`` tokens (0 = padding, film index i = token i + 1). The output layer
    shares its weights with the token embeddings (GPT-2's weight tying), so every film has one
    vector used both to read it and to score it.

    Args:
        n_items: catalogue size.
        settings: the size fields (``max_len``, ``n_embd``, ``n_layer``, ``n_head``, ``dropout``).
        seed: seeds the initial weights (the global torch RNG is left as it was).
        item_vectors: optional [n_items, n_embd] initial film embeddings (e.g. from
            :func:`cooccurrence_embeddings`), centred and rescaled to GPT-2's initial standard
            deviation (``initializer_range`` = 0.02); ``None`` keeps the random initialisation.

    Returns:
        the model on the CPU (move it with ``.to(device)``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    s = settings
    config = GPT2Config(
        vocab_size=n_items + 1, n_positions=s.max_len, n_embd=s.n_embd, n_layer=s.n_layer, n_head=s.n_head,
        resid_pdrop=s.dropout, embd_pdrop=s.dropout, attn_pdrop=s.dropout,
        bos_token_id=PAD_TOKEN, eos_token_id=PAD_TOKEN, pad_token_id=PAD_TOKEN, use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    if item_vectors is not None:
        v = torch.as_tensor(np.asarray(item_vectors), dtype=torch.get_default_dtype())
        v = v - v.mean()
        with torch.no_grad():
            model.transformer.wte.weight[1:] = v * (config.initializer_range / v.std())
    return model


def pad_batch(sequences: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad film-index sequences into GPT tokens, keeping the last ``max_len`` films of each.

    Returns:
        ``(tokens, mask)``: int64 [n, L] with film index + 1 (0 = padding) and bool [n, L]
        (True on real films), where ``L = min(max_len, longest sequence)``.
    """
    tail = [np.asarray(s, dtype=np.int64)[-max_len:] for s in sequences]
    width = max(1, max(len(s) for s in tail))
    tokens = np.full((len(tail), width), PAD_TOKEN, dtype=np.int64)
    mask = np.zeros((len(tail), width), dtype=bool)
    for r, s in enumerate(tail):
        tokens[r, : len(s)] = s + 1
        mask[r, : len(s)] = True
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def next_item_loss(model: GPT2LMHeadModel, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each film from the films before it (one batch).

    Position t's output is compared with the token at t + 1 (the labels are the inputs shifted by
    one); targets that are padding get the label -100 and are ignored.

    Args:
        tokens: int64 [B, L] from :func:`pad_batch` (on the model's device); mask: bool [B, L].

    Returns:
        scalar tensor (nats per predicted film).
    """
    logits = model(input_ids=tokens, attention_mask=mask.long()).logits  # [B, L, V]
    labels = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)  # [B, L-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


def train_epoch(model: GPT2LMHeadModel, opt: torch.optim.Optimizer, windows: list[np.ndarray], batch_size: int,
                rng: np.random.Generator) -> float:
    """One pass over the windows in an order drawn from ``rng``; returns the mean cross-entropy per predicted film.

    Dropout draws from the global torch RNG (seed it for a reproducible epoch).
    """
    device = next(model.parameters()).device
    model.train()
    order = rng.permutation(len(windows))
    total, count = 0.0, 0
    for start in range(0, len(order), batch_size):
        batch = [windows[j] for j in order[start : start + batch_size]]
        tokens, mask = pad_batch(batch, model.config.n_positions)
        tokens, mask = tokens.to(device), mask.to(device)
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
    """What :func:`train_item_gpt` did.

    Attributes:
        losses: mean training cross-entropy per epoch (nats per predicted film; mean over an ensemble).
        val_ndcg: validation full-catalogue nDCG@10 per epoch (empty without validation data).
        best_epoch: 1-based epoch whose weights the model holds at the end (the last without validation data).
        seconds: wall-clock training time.
        n_windows, n_targets: training windows and predicted films per epoch.
    """

    losses: list[float] = field(default_factory=list)
    val_ndcg: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    n_windows: int = 0
    n_targets: int = 0


def train_item_gpt(
    model: GPT2LMHeadModel | list[GPT2LMHeadModel],
    sequences: ItemSequences | list[np.ndarray],
    settings: ItemGPTSettings = ItemGPTSettings(),
    seed: int = 0,
    val: tuple[list[np.ndarray], np.ndarray] | None = None,
    progress: bool = True,
) -> GPTTrainLog:
    """Train an item-GPT (or an ensemble) for next-film prediction: :func:`train_epoch` per epoch,
    then, with validation users, their full-catalogue nDCG@10 and early stopping.

    Each sequence is cut into windows (:func:`training_windows`). An ensemble (a list of GPTs) is
    trained in lockstep: each epoch each member makes one pass with its own AdamW state and its own
    shuffling (member i uses the seed ``seed + i``); validation scores the ensemble as a whole and
    early stopping restores every member to the ensemble's best epoch. The validation data only
    decide *which epoch* is kept: the training trajectory is the same with or without ``val``.

    Args:
        model: from :func:`make_item_gpt`, or a list of them (trained in place, left in eval mode).
        sequences: the training users' film-index sequences.
        settings: ``epochs``, ``batch_size``, ``lr`` and ``patience`` (the latter used only with ``val``).
        seed: seeds the shuffling and the dropout masks (the global torch RNG is restored afterwards).
        val: optional ``(histories, targets)`` of validation users.
        progress: show a progress bar over epochs (off with ``MREC_NO_PROGRESS=1``).
    """
    from .train import EarlyStopping
    from .train import progress as progress_bar

    members = list(model) if isinstance(model, (list, tuple)) else [model]
    windows = training_windows(sequences, members[0].config.n_positions)
    log = GPTTrainLog(n_windows=len(windows), n_targets=int(sum(len(w) - 1 for w in windows)))
    stopper = EarlyStopping(patience=settings.patience, mode="max") if val is not None else None
    kept = torch.nn.ModuleList(members)  # one state_dict for all members (kept and restored together)
    opts = [torch.optim.AdamW(m.parameters(), lr=settings.lr, weight_decay=0.0) for m in members]
    rngs = [np.random.default_rng(seed + i) for i in range(len(members))]
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout masks
        for _ in progress_bar(range(settings.epochs), desc="training item GPT", disable=not progress):
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
    """Next-film scores after each history, over the whole catalogue.

    The model reads the last ``max_len`` films of each history (no gradient step: whatever the
    history says about the user is used *in context*).

    Args:
        model: an item-GPT on any device, or a list of them (an ensemble).
        histories: n film-index sequences, each with at least one film.

    Returns:
        float64 [n, n_items]: for one model the logit of every film at the position after the last
        film; for an ensemble the mean log-probability over the members (the ranking of the
        geometric mean of their next-film distributions).
    """
    if isinstance(model, (list, tuple)):
        logp = [torch.log_softmax(torch.from_numpy(score_next_items(m, histories, batch_size)), dim=1).numpy()
                for m in model]
        return sum(logp[1:], logp[0]) / len(logp)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty((len(histories), model.config.vocab_size - 1), dtype=np.float64)
    for b in range(0, len(histories), batch_size):
        tokens, mask = pad_batch(histories[b : b + batch_size], model.config.n_positions)
        tokens, mask = tokens.to(device), mask.to(device)
        logits = model(input_ids=tokens, attention_mask=mask.long()).logits  # [B, L, V]
        last = mask.sum(1) - 1
        out[b : b + len(last)] = logits[torch.arange(len(last), device=device), last, 1:].double().cpu().numpy()
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------
# the data: vocabulary, user sequences, evaluation cases, training windows
# ------------------------------------------------------------------------------------------------


@dataclass
class ItemSequences:
    """Chronological film histories of a set of users.

    Attributes:
        users: [n_users] int64 user ids, in the order of ``sequences``.
        sequences: ``n_users`` int64 arrays of film indices (oldest first).
        item_ids: [n_items] int64 MovieLens id of each film index (sorted ascending).
    """

    users: np.ndarray
    sequences: list[np.ndarray]
    item_ids: np.ndarray

    @property
    def n_items(self) -> int:
        return int(len(self.item_ids))

    def lengths(self) -> np.ndarray:
        """[n_users] int64 sequence lengths."""
        return np.array([len(s) for s in self.sequences], dtype=np.int64)

    def subset(self, users: Sequence[int] | np.ndarray) -> ItemSequences:
        """The sequences of ``users`` (in the given order); KeyError for an unknown user."""
        users = np.asarray(users, dtype=np.int64).ravel()
        pos = {int(u): i for i, u in enumerate(self.users.tolist())}
        return ItemSequences(users, [self.sequences[pos[int(u)]] for u in users], self.item_ids)

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        n = self.lengths()
        med = int(np.median(n)) if len(n) else 0
        return f"ItemSequences({len(self)} users, {self.n_items} items, {int(n.sum())} events, median length {med})"


def build_item_vocab(ratings: pd.DataFrame, min_count: int = 5) -> np.ndarray:
    """Film ids with at least ``min_count`` ratings in ``ratings``, sorted ascending (int64 [n_items]).

    Build it from the *training* users only, so that held-out users cannot influence which films
    exist (SASRec-style preprocessing drops rare items for the same reason: a sequence model
    cannot learn a token it has seen a handful of times).
    """
    counts = ratings["item_id"].value_counts()
    return np.sort(counts.index[counts.to_numpy() >= min_count].to_numpy().astype(np.int64))


def user_sequences(ratings: pd.DataFrame, item_ids: np.ndarray | None = None,
                   users: Sequence[int] | np.ndarray | None = None, seed: int = 0) -> ItemSequences:
    """Each user's films in time order, as film indices into the vocabulary ``item_ids``.

    MovieLens stores many ratings with the same second (a user rating a page of films at once).
    Ties are broken by a seeded random key, not by film id: ids follow the order in which films
    entered the catalogue, and a model could otherwise learn the artificial rule "the next id is
    larger". The result does not depend on the row order of ``ratings``.

    Args:
        ratings: frame with ``user_id``, ``item_id``, ``timestamp`` (one row per user-film pair).
        item_ids: the vocabulary, sorted ascending (e.g. :func:`build_item_vocab` of the training
            users); ratings of other films are dropped. ``None``: every film in ``ratings``.
        users: keep these users, in this order (``None``: every user, sorted by id). A user
            without any in-vocabulary rating gets an empty sequence.
        seed: seeds the tie-breaking.
    """
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
    """Leave-one-out cases per user: predict a film from everything the user rated before it.

    With ``n_last=1`` this is the classic protocol: the last film is the target and all earlier
    films are the history. With ``n_last=m`` each of the last m positions t gives one case
    (history ``s[:t]``, target ``s[t]``): m times more test events from the same users, still with
    no future film in any history. A case needs at least ``min_history`` history films.

    Returns:
        ``(histories, targets, owner)``: list of history arrays, [n_cases] int64 targets, and
        [n_cases] int64 position of each case's user in ``sequences`` (cases of one user are
        consecutive, oldest target first).
    """
    seqs = _as_list(sequences)
    hist, targets, owner = [], [], []
    for i, s in enumerate(seqs):
        for t in range(max(min_history, len(s) - n_last), len(s)):
            hist.append(s[:t])
            targets.append(int(s[t]))
            owner.append(i)
    return hist, np.array(targets, dtype=np.int64), np.array(owner, dtype=np.int64)


def training_windows(sequences: ItemSequences | Sequence[np.ndarray], max_len: int, min_len: int = 2) -> list[np.ndarray]:
    """Cut sequences into windows of ``min_len..max_len`` films for next-film training.

    Consecutive windows overlap by one film, so every transition ``s[t] -> s[t+1]`` is a training
    target exactly once; windows are aligned to the *end* of each sequence, so the most recent
    transitions get full context and a short remainder (if any) is the oldest part.
    """
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


# ------------------------------------------------------------------------------------------------
# baselines: popularity and co-occurrence
# ------------------------------------------------------------------------------------------------


def popularity_scores(sequences: ItemSequences | Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """How often each film occurs in ``sequences`` (the training users): float64 [n_items]."""
    seqs = _as_list(sequences)
    flat = np.concatenate(seqs) if len(seqs) else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def cooccurrence_counts(sequences: ItemSequences | Sequence[np.ndarray], n_items: int, window: int = 5) -> np.ndarray:
    """Film-to-film "follows" counts: ``C[i, j]`` = times film j comes at most ``window`` steps after film i.

    Returns:
        float32 [n_items, n_items] (dense; fine for a few thousand films).
    """
    seqs = _as_list(sequences)
    flat = np.zeros(n_items * n_items, dtype=np.int64)
    for d in range(1, window + 1):
        src = [s[:-d] for s in seqs if len(s) > d]
        if not src:
            break
        a = np.concatenate(src)
        b = np.concatenate([s[d:] for s in seqs if len(s) > d])
        flat += np.bincount(a * n_items + b, minlength=n_items * n_items)
    return flat.reshape(n_items, n_items).astype(np.float32)


def cooccurrence_scores(counts: np.ndarray, histories: Sequence[np.ndarray], last: int | None = None,
                        popularity: np.ndarray | None = None) -> np.ndarray:
    """Score every film by the sum of its co-occurrence counts with the films of each history.

    ``score[u, j] = sum over i in the last `last` films of history u of counts[i, j]``, plus
    ``1e-6 * popularity[j] / max(popularity)`` when ``popularity`` is given (breaks the many ties
    among films that never followed the history, in favour of popular ones).

    Returns:
        float64 [n, n_items].
    """
    out = np.empty((len(histories), counts.shape[0]), dtype=np.float64)
    for r, h in enumerate(histories):
        h = h if last is None else h[-last:]
        out[r] = counts[h].sum(axis=0, dtype=np.float64)
    if popularity is not None:
        p = np.asarray(popularity, dtype=np.float64)
        out += 1e-6 * p / max(p.max(), 1e-12)
    return out


def tune_cooccurrence(train_seq: ItemSequences, val_cases: tuple[list[np.ndarray], np.ndarray, np.ndarray],
                      settings: ItemGPTSettings = ItemGPTSettings()) -> tuple[pd.DataFrame, tuple[int, int]]:
    """Choose the co-occurrence window ``w`` and history length ``m`` on validation users.

    Every pair of ``settings.cooc_windows`` x ``settings.cooc_lasts`` scores the validation cases
    ``(histories, targets, owner)`` (with the popularity tie-breaker); a pair's value is the
    full-catalogue nDCG@10 averaged per user, then over users. Ties go to the earlier pair
    (:func:`mrec_utils.train.pick_best`).

    Returns:
        ``(grid, (w, m))``: one row per pair (``window w``, ``last m films``, ``val nDCG@10``) and the best pair.
    """
    from .train import pick_best

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
    best = grid.loc[pick_best(grid.index, grid["val nDCG@10"].get)]
    return grid, (int(best["window w"]), int(best["last m films"]))


def cooccurrence_embeddings(counts: np.ndarray, dim: int, seed: int = 0) -> np.ndarray:
    """Film vectors from a low-rank factorisation of the co-occurrence counts (the GPT's warm start).

    The counts are symmetrised and damped, ``S = log(1 + C + C^T)``, and factorised with a seeded
    randomised SVD; film i gets ``U[i, :dim] * sqrt(s[:dim])``, so dot products of vectors
    approximate ``S``: films that often occur near each other get similar vectors. This is the
    count-based cousin of item2vec / word2vec.

    Returns:
        float64 [n_items, dim] (``dim < n_items``).
    """
    from sklearn.utils.extmath import randomized_svd

    c = np.asarray(counts, dtype=np.float64)
    u, sv, _ = randomized_svd(np.log1p(c + c.T), dim, n_iter=3, random_state=seed)
    return u * np.sqrt(sv)


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------


def history_mask(histories: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Boolean [n, n_items], True at the films of each history (to exclude them from a ranking)."""
    m = np.zeros((len(histories), n_items), dtype=bool)
    for r, h in enumerate(histories):
        m[r, h] = True
    return m


def sample_negatives(histories: Sequence[np.ndarray], targets: np.ndarray, n_items: int, n_negatives: int = 100,
                     seed: int = 0) -> np.ndarray:
    """For each case, ``n_negatives`` distinct random films that are neither in the history nor the target.

    The sampled protocol of SASRec (Kang & McAuley 2018): the target is ranked against these
    negatives only. Sampling is uniform over the allowed films, seeded per call.

    Returns:
        int64 [n, n_negatives].
    """
    rng = np.random.default_rng(seed)
    out = np.empty((len(histories), n_negatives), dtype=np.int64)
    for r, (h, y) in enumerate(zip(histories, np.asarray(targets, dtype=np.int64))):
        banned = np.zeros(n_items, dtype=bool)
        banned[h] = True
        banned[y] = True
        out[r] = rng.choice(np.flatnonzero(~banned), size=n_negatives, replace=False)
    return out


def evaluate_next_item(scores: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray, k: int = 10,
                       n_negatives: int | None = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Leave-one-out metrics per case, full catalogue and (optionally) the sampled protocol.

    Full catalogue: every film is ranked except those in the case's history (they are excluded,
    not counted as misses); ``HR@k`` is 1 when the target is in the top k and ``nDCG@k`` is
    ``1 / log2(rank + 1)`` (one relevant film), via :func:`mrec_utils.metrics.topk_metrics`.
    Sampled: the target is ranked against ``n_negatives`` random films outside the history
    (:func:`sample_negatives` with ``seed``), tied scores counted halfway
    (:func:`mrec_utils.metrics.rank_of`); ``None`` skips it.

    Args:
        scores: [n, n_items] scores of any model (higher = better).

    Returns:
        dict of float64 [n]: ``full_hr``, ``full_ndcg`` and, with sampling, ``sampled_hr``,
        ``sampled_ndcg``, ``sampled_rank``.
    """
    from . import metrics

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
