"""The small recommender networks of the book.

Sections (each self-contained; chapters import what they need):

- **GPT over item sequences** (chapter 7): items as tokens, a tiny ``transformers`` GPT-2 trained
  for next-item prediction (no pretrained weights; item embeddings optionally warm-started from
  co-occurrence counts), seed ensembles of such GPTs (trained in lockstep, scored by their averaged
  log-probabilities), leave-one-out and in-context evaluation helpers, and the popularity and
  item-to-item co-occurrence baselines it is compared with.
- **MeLU-style rating model** (chapter 5): item (and user) attribute embeddings, concatenated,
  then an MLP decision head; :func:`melu_adapt_spec` says what per-user adaptation changes.
- **Matrix factorisation with fold-in** (chapter 5): biased MF by alternating least squares and
  the closed-form ridge fold-in of a new user from a few ratings.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

# ==============================================================================================
# GPT over item sequences (chapter 7)
# ==============================================================================================
#
# Conventions of this section
# ---------------------------
# * Items are *indices* 0..n_items-1 into a vocabulary (``ItemSequences.item_ids`` maps them back
#   to MovieLens ids). A sequence is a 1-D int64 array of indices in time order, oldest first.
# * Inside the GPT, item index i is token i + 1; token 0 (:data:`PAD_TOKEN`) is padding, which is
#   hidden by the attention mask and ignored by the loss (label -100). Scores returned to callers
#   are over items only: shape [n, n_items].
# * Sequences are right-padded, so positions start at 0 for every sequence, as in training.

PAD_TOKEN = 0
IGNORE_INDEX = -100


@dataclass
class ItemSequences:
    """Chronological item histories of a set of users.

    Attributes:
        users: [n_users] int64 user ids, in the order of ``sequences``.
        sequences: ``n_users`` int64 arrays of item indices (oldest first).
        item_ids: [n_items] int64 MovieLens item id of each item index (sorted ascending).
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

    def subset(self, users: Any) -> "ItemSequences":
        """The sequences of ``users`` (in the given order); raises KeyError for unknown users."""
        users = np.asarray(users, dtype=np.int64).ravel()
        pos = {int(u): i for i, u in enumerate(self.users.tolist())}
        missing = [int(u) for u in users if int(u) not in pos]
        if missing:
            raise KeyError(f"users not in these sequences: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
        return ItemSequences(users, [self.sequences[pos[int(u)]] for u in users], self.item_ids)

    def __len__(self) -> int:
        return len(self.sequences)

    def __repr__(self) -> str:
        n = self.lengths()
        med = int(np.median(n)) if len(n) else 0
        return f"ItemSequences({len(self)} users, {self.n_items} items, {int(n.sum())} events, median length {med})"


def _check_ratings_frame(ratings: Any, cols: Sequence[str] = ("user_id", "item_id", "timestamp")) -> pd.DataFrame:
    if not isinstance(ratings, pd.DataFrame):
        raise TypeError(f"ratings must be a pandas DataFrame (as load_movielens returns), got {type(ratings).__name__}.")
    missing = [c for c in cols if c not in ratings.columns]
    if missing:
        raise ValueError(f"ratings is missing the column(s) {missing}; it needs {list(cols)}.")
    return ratings


def _check_pos_int(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


def build_item_vocab(ratings: pd.DataFrame, min_count: int = 5) -> np.ndarray:
    """Item ids with at least ``min_count`` ratings in ``ratings``, sorted ascending.

    Build it from the *training* users only, so that held-out users cannot influence which items
    exist (SASRec-style preprocessing drops rare items for the same reason: a sequence model
    cannot learn a token it has seen a handful of times).

    Returns:
        int64 array [n_items].
    """
    _check_ratings_frame(ratings, ("item_id",))
    min_count = _check_pos_int("min_count", min_count)
    counts = ratings["item_id"].value_counts()
    ids = np.sort(counts.index[counts.to_numpy() >= min_count].to_numpy().astype(np.int64))
    if ids.size == 0:
        raise ValueError(f"no item has at least min_count={min_count} ratings; lower min_count.")
    return ids


def user_sequences(
    ratings: pd.DataFrame, item_ids: Any = None, users: Any = None, seed: int = 0
) -> ItemSequences:
    """Each user's items in time order, as item indices into the vocabulary ``item_ids``.

    MovieLens stores many ratings with the same second (a user rating a page of films at once).
    Ties are broken by a seeded random key, not by item id: ids follow the order in which films
    entered the catalogue, and a model could otherwise learn the artificial rule "the next id is
    larger". The result does not depend on the row order of ``ratings``.

    Args:
        ratings: frame with ``user_id``, ``item_id``, ``timestamp`` (one row per user-item pair).
        item_ids: the vocabulary (e.g. :func:`build_item_vocab` of the training users); ratings of
            other items are dropped. ``None``: every item in ``ratings``.
        users: keep these users, in this order (``None``: every user, sorted by id). A user
            without any in-vocabulary rating gets an empty sequence.
        seed: seeds the tie-breaking.

    Returns:
        :class:`ItemSequences`.
    """
    _check_ratings_frame(ratings)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    df = ratings[["user_id", "item_id", "timestamp"]]
    if item_ids is None:
        vocab = np.unique(df["item_id"].to_numpy().astype(np.int64))
    else:
        vocab = np.asarray(item_ids, dtype=np.int64).ravel()
        if vocab.size == 0:
            raise ValueError("item_ids is empty.")
        if np.any(np.diff(vocab) <= 0):
            raise ValueError("item_ids must be sorted ascending without duplicates (np.unique gives that).")
    # canonical order first, then a random key per row in that order, then sort by (user, time, key)
    df = df.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    key = np.random.default_rng(seed).random(len(df))
    df = df.assign(_key=key).sort_values(["user_id", "timestamp", "_key"], kind="stable")
    it = df["item_id"].to_numpy().astype(np.int64)
    pos = np.clip(np.searchsorted(vocab, it), 0, len(vocab) - 1)
    known = vocab[pos] == it
    u = df["user_id"].to_numpy().astype(np.int64)[known]
    idx = pos[known]
    all_users = np.unique(df["user_id"].to_numpy().astype(np.int64))
    want = all_users if users is None else np.asarray(users, dtype=np.int64).ravel()
    if users is not None:
        unknown = np.setdiff1d(want, all_users)
        if unknown.size:
            raise ValueError(f"users not in ratings: {unknown[:10].tolist()}")
    starts = np.searchsorted(u, want, side="left")
    ends = np.searchsorted(u, want, side="right")
    seqs = [idx[s:e].copy() for s, e in zip(starts, ends)]
    return ItemSequences(want.copy(), seqs, vocab.copy())


def _as_sequences(sequences: Any, n_items: int | None, what: str, min_len: int = 0) -> list[np.ndarray]:
    """Validate a list of 1-D int sequences of item indices."""
    if isinstance(sequences, ItemSequences):
        sequences = sequences.sequences
    if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Sequence):
        raise TypeError(f"{what} must be a list of 1-D integer arrays (item indices), got {type(sequences).__name__}.")
    out = []
    for i, s in enumerate(sequences):
        a = np.asarray(s)
        if a.ndim != 1:
            raise ValueError(f"{what}[{i}] must be 1-D, got shape {a.shape}.")
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{what}[{i}] must hold integer item indices, got dtype {a.dtype}.")
        a = a.astype(np.int64, copy=False)
        if a.size < min_len:
            raise ValueError(f"{what}[{i}] has {a.size} items; at least {min_len} needed.")
        if a.size and (a.min() < 0 or (n_items is not None and a.max() >= n_items)):
            raise ValueError(f"{what}[{i}] holds item indices outside [0, {n_items}); map ids with user_sequences first.")
        out.append(a)
    return out


def leave_last_out(
    sequences: Any, n_last: int = 1, min_history: int = 1
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Leave-one-out cases per user: predict an item from everything the user did before it.

    With ``n_last=1`` this is the classic protocol: the last item is the target and all earlier
    items are the history. With ``n_last=m`` each of the last m positions t gives one case
    (history ``s[:t]``, target ``s[t]``): m times more test events from the same users, still with
    no future item in any history.

    Args:
        sequences: list of item-index arrays (or :class:`ItemSequences`).
        n_last: number of final positions per user that become targets.
        min_history: a case needs at least this many history items (shorter ones are skipped).

    Returns:
        ``(histories, targets, owner)``: list of history arrays, [n_cases] int64 targets, and
        [n_cases] int64 position of each case's user in ``sequences`` (cases of one user are
        consecutive, oldest target first).
    """
    seqs = _as_sequences(sequences, None, "sequences")
    n_last = _check_pos_int("n_last", n_last)
    min_history = _check_pos_int("min_history", min_history)
    hist: list[np.ndarray] = []
    targets: list[int] = []
    owner: list[int] = []
    for i, s in enumerate(seqs):
        for t in range(max(min_history, len(s) - n_last), len(s)):
            hist.append(s[:t])
            targets.append(int(s[t]))
            owner.append(i)
    if not hist:
        raise ValueError(f"no sequence has at least {min_history + 1} items.")
    return hist, np.array(targets, dtype=np.int64), np.array(owner, dtype=np.int64)


def make_item_gpt(
    n_items: int,
    max_len: int = 50,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 2,
    dropout: float = 0.2,
    seed: int = 0,
    item_vectors: Any = None,
):
    """A small GPT-2 (``transformers.GPT2LMHeadModel``) whose tokens are items.

    Vocabulary: ``n_items + 1`` tokens (0 = padding, item index i = token i + 1). The output layer
    shares its weights with the token embeddings (GPT-2's weight tying), so every item has one
    ``n_embd``-dimensional vector used both to read it and to score it.

    Args:
        n_items: catalogue size.
        max_len: context length (the model sees at most the last ``max_len`` items).
        n_embd, n_layer, n_head: width, depth and attention heads (``n_embd % n_head == 0``).
        dropout: used for embeddings, residual branches and attention weights.
        seed: seeds the initial weights (the global torch RNG is left as it was).
        item_vectors: optional [n_items, n_embd] initial item embeddings (e.g. from
            :func:`cooccurrence_embeddings`), rescaled to GPT-2's initial standard deviation
            (``initializer_range`` = 0.02); ``None`` keeps the random initialisation.

    Returns:
        ``GPT2LMHeadModel`` on the CPU (move it with ``.to(device)``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    n_items = _check_pos_int("n_items", n_items)
    for name, v in (("max_len", max_len), ("n_embd", n_embd), ("n_layer", n_layer), ("n_head", n_head)):
        _check_pos_int(name, v)
    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}.")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    config = GPT2Config(
        vocab_size=n_items + 1,
        n_positions=max_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=PAD_TOKEN,
        eos_token_id=PAD_TOKEN,
        pad_token_id=PAD_TOKEN,
        use_cache=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    if item_vectors is not None:
        v = torch.as_tensor(np.asarray(item_vectors), dtype=torch.get_default_dtype())
        if v.shape != (n_items, n_embd):
            raise ValueError(f"item_vectors must have shape [n_items, n_embd] = [{n_items}, {n_embd}], got {tuple(v.shape)}.")
        if not torch.isfinite(v).all() or float(v.std()) == 0:
            raise ValueError("item_vectors must be finite and not constant.")
        v = v - v.mean()
        with torch.no_grad():
            model.transformer.wte.weight[1:] = v * (config.initializer_range / v.std())
    return model


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _context_len(model: Any) -> int:
    return int(model.config.n_positions)


def pad_batch(sequences: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad item-index sequences into GPT tokens, keeping the last ``max_len`` items of each.

    Returns:
        ``(tokens, mask)``: int64 [n, L] with item index + 1 (0 = padding) and bool [n, L]
        (True on real items), where ``L = min(max_len, longest sequence)``.
    """
    max_len = _check_pos_int("max_len", max_len)
    if len(sequences) == 0:
        raise ValueError("no sequences to pad.")
    tail = [np.asarray(s, dtype=np.int64)[-max_len:] for s in sequences]
    width = max(1, max(len(s) for s in tail))
    tokens = np.full((len(tail), width), PAD_TOKEN, dtype=np.int64)
    mask = np.zeros((len(tail), width), dtype=bool)
    for r, s in enumerate(tail):
        tokens[r, : len(s)] = s + 1
        mask[r, : len(s)] = True
    return torch.from_numpy(tokens), torch.from_numpy(mask)


def training_windows(sequences: Any, max_len: int, min_len: int = 2) -> list[np.ndarray]:
    """Cut sequences into windows of at most ``max_len`` items for next-item training.

    Consecutive windows overlap by one item, so every transition ``s[t] -> s[t+1]`` is a training
    target exactly once; windows are aligned to the *end* of each sequence, so the most recent
    transitions get full context and a short remainder (if any) is the oldest part.

    Returns:
        list of int64 arrays, each of length ``min_len..max_len``.
    """
    seqs = _as_sequences(sequences, None, "sequences")
    max_len = _check_pos_int("max_len", max_len, low=2)
    min_len = _check_pos_int("min_len", min_len, low=2)
    out: list[np.ndarray] = []
    for s in seqs:
        end = len(s)
        while end >= min_len:
            start = max(0, end - max_len)
            out.append(s[start:end])
            if start == 0:
                break
            end = start + 1
    return out


def next_item_loss(model: Any, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting each item from the items before it (one batch).

    Position t's output is compared with the token at t + 1 (the labels are the inputs shifted by
    one); targets that are padding get the label -100 and are ignored.

    Args:
        model: an item GPT.
        tokens: int64 [B, L] from :func:`pad_batch` (on the model's device).
        mask: bool [B, L], True on real items.

    Returns:
        scalar tensor (nats per predicted item).
    """
    logits = model(input_ids=tokens, attention_mask=mask.long()).logits  # [B, L, V]
    labels = tokens[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)  # [B, L-1]
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )


@dataclass
class GPTTrainLog:
    """What :func:`train_item_gpt` did.

    Attributes:
        losses: mean training cross-entropy per epoch (nats per predicted item).
        val_ndcg: validation full-catalogue nDCG@k per epoch (empty without validation data).
        best_epoch: 1-based epoch whose weights the model holds at the end (last epoch without
            validation data).
        seconds: wall-clock training time.
        n_windows, n_targets: training windows and predicted items per epoch.
    """

    losses: list[float] = field(default_factory=list)
    val_ndcg: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    n_windows: int = 0
    n_targets: int = 0


def _as_gpt_members(model: Any, what: str = "model") -> list[torch.nn.Module]:
    """One item GPT or a non-empty list/tuple of them (an ensemble) -> list of members, same vocabulary."""
    members = list(model) if isinstance(model, (list, tuple)) else [model]
    if not members:
        raise ValueError(f"{what} is an empty list; pass an item GPT or a list of them (make_item_gpt).")
    for m in members:
        if not isinstance(m, torch.nn.Module) or not hasattr(m, "config"):
            raise TypeError(f"{what} must be a transformers GPT2LMHeadModel (make_item_gpt) or a list of them.")
    sizes = {int(m.config.vocab_size) for m in members}
    if len(sizes) != 1:
        raise ValueError(f"the members of an ensemble must share one vocabulary; got vocab sizes {sorted(sizes)}.")
    if len({id(m) for m in members}) != len(members):
        raise ValueError("the same model object appears twice in the ensemble; build each member with make_item_gpt.")
    return members


def _train_epoch(model: Any, opt: torch.optim.Optimizer, windows: list[np.ndarray], batch_size: int,
                 gen: np.random.Generator) -> float:
    """One pass over the shuffled windows; returns the mean cross-entropy per predicted item."""
    dev = _model_device(model)
    model.train()
    order = gen.permutation(len(windows))
    total, count = 0.0, 0
    for b in range(0, len(order), batch_size):
        batch = [windows[j] for j in order[b : b + batch_size]]
        tokens, mask = pad_batch(batch, _context_len(model))
        tokens, mask = tokens.to(dev), mask.to(dev)
        loss = next_item_loss(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n_t = int(mask[:, 1:].sum())
        total += float(loss.detach()) * n_t
        count += n_t
    return total / max(count, 1)


def train_item_gpt(
    model: Any,
    sequences: Any,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    val: tuple[Sequence[np.ndarray], Any] | None = None,
    patience: int | None = None,
    k: int = 10,
    progress: bool = True,
) -> GPTTrainLog:
    """Train an item GPT (or an ensemble of them) for next-item prediction (causal LM loss over item tokens).

    Each sequence is cut into windows (:func:`training_windows`); a batch of windows is right-
    padded, the attention mask hides the padding, and padded positions get the label -100 so the
    cross-entropy ignores them. ``GPT2LMHeadModel`` shifts the labels itself: position t is
    trained to predict the item at t + 1 from items 0..t (causal self-attention).

    An *ensemble* (a list of models, e.g. from different ``make_item_gpt`` seeds) is trained in
    lockstep: every epoch each member makes one pass over the windows, with its own AdamW state
    and its own shuffling (member i uses the seed ``seed + i``); validation scores the ensemble as
    a whole (:func:`score_next_items` averages the members' log-probabilities), and early stopping
    restores every member to the ensemble's best epoch. A list of one model trains exactly like
    the model itself. The validation data only decide *which epoch* is kept: the training
    trajectory is the same with or without ``val``.

    Args:
        model: from :func:`make_item_gpt`, or a list of such models with the same vocabulary
            (trained in place, left in eval mode).
        sequences: training users' item-index sequences (list or :class:`ItemSequences`).
        epochs, batch_size, lr, weight_decay: AdamW settings; windows are reshuffled every epoch
            with a generator seeded by ``seed``.
        device: ``None`` keeps the model where it is; otherwise the model is moved there.
        val: optional ``(histories, targets)`` of validation users; after every epoch the
            full-catalogue nDCG@k is measured and the best epoch's weights are restored at the end.
        patience: stop after this many epochs without validation improvement (needs ``val``).
        k: cutoff of the validation nDCG.
        progress: show a progress bar over epochs (off with ``MREC_NO_PROGRESS=1``).

    Returns:
        :class:`GPTTrainLog` (``losses`` are averaged over the members of an ensemble).
    """
    from .train import EarlyStopping
    from .train import progress as _progress

    if not isinstance(model, (list, tuple)) and (not isinstance(model, torch.nn.Module) or not hasattr(model, "config")):
        raise TypeError("model must be a transformers GPT2LMHeadModel, e.g. from make_item_gpt(n_items).")
    members = _as_gpt_members(model)
    n_items = int(members[0].config.vocab_size) - 1
    seqs = _as_sequences(sequences, n_items, "sequences")
    epochs = _check_pos_int("epochs", epochs)
    batch_size = _check_pos_int("batch_size", batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if patience is not None:
        patience = _check_pos_int("patience", patience)
        if val is None:
            raise ValueError("patience needs validation data: pass val=(histories, targets).")
    if device is not None:
        from .train import get_device

        for m in members:
            m.to(get_device(device))
    context = {_context_len(m) for m in members}
    if len(context) != 1:
        raise ValueError(f"the members of an ensemble must share one context length (max_len); got {sorted(context)}.")
    windows = training_windows(seqs, context.pop())
    if not windows:
        raise ValueError("no training sequence has at least 2 items; nothing to learn from.")
    log = GPTTrainLog(n_windows=len(windows), n_targets=int(sum(len(w) - 1 for w in windows)))
    stopper = None
    if val is not None:
        val_hist, val_targets = val
        val_hist = _as_sequences(val_hist, n_items, "val histories", min_len=1)
        val_targets = np.asarray(val_targets, dtype=np.int64).ravel()
        if len(val_targets) != len(val_hist):
            raise ValueError(f"val has {len(val_hist)} histories but {len(val_targets)} targets.")
        stopper = EarlyStopping(patience=patience or epochs + 1, mode="max")
    scored = members[0] if len(members) == 1 else members
    kept = torch.nn.ModuleList(members)  # one state_dict for all members (kept and restored together)

    opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=weight_decay) for m in members]
    gens = [np.random.default_rng(seed + i) for i in range(len(members))]
    torch_gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # dropout masks
    start = time.perf_counter()
    bar_kw: dict[str, Any] = {"desc": "training item GPT" + (f" x{len(members)}" if len(members) > 1 else "")}
    if not progress:
        bar_kw["disable"] = True
    bar = _progress(range(epochs), **bar_kw)
    try:
        for epoch in bar:
            losses = [_train_epoch(m, o, windows, batch_size, g) for m, o, g in zip(members, opts, gens)]
            log.losses.append(float(np.mean(losses)))
            if stopper is not None:
                scores = score_next_items(scored, val_hist)
                res = evaluate_next_item(scores, val_hist, val_targets, k=k, n_negatives=None)
                log.val_ndcg.append(float(res["full_ndcg"].mean()))
                if stopper.step(log.val_ndcg[-1], kept):
                    break
    finally:
        torch.random.set_rng_state(torch_gen_state)
        if hasattr(bar, "close"):
            bar.close()
    if stopper is not None:
        stopper.restore(kept)
        log.best_epoch = stopper.best_step + 1
    else:
        log.best_epoch = len(log.losses)
    for m in members:
        m.eval()
    log.seconds = time.perf_counter() - start
    return log


@torch.no_grad()
def score_next_items(model: Any, histories: Any, batch_size: int = 256) -> np.ndarray:
    """Next-item scores after each history, over the whole catalogue.

    The model reads the last ``max_len`` items of each history (no gradient step: whatever the
    history says about the user is used *in context*).

    Args:
        model: an item GPT (:func:`make_item_gpt`), on any device; or a list of item GPTs with
            the same vocabulary (an ensemble), whose scores are the members' averaged
            log-probabilities ``mean_m log softmax(logits_m)`` over the items.
        histories: n item-index sequences, each with at least one item.
        batch_size: histories per forward pass.

    Returns:
        float64 array [n, n_items]: for one model the logit of every item at the position after
        the last item; for an ensemble the mean log-probability (same ranking as the geometric
        mean of the members' next-item distributions).
    """
    if isinstance(model, (list, tuple)):
        members = _as_gpt_members(model)
        total = None
        for m in members:
            s = torch.log_softmax(torch.from_numpy(score_next_items(m, histories, batch_size)), dim=1).numpy()
            total = s if total is None else total + s
        return total / len(members)
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError("model must be an item GPT from make_item_gpt (or a list of them).")
    n_items = int(model.config.vocab_size) - 1
    hist = _as_sequences(histories, n_items, "histories", min_len=1)
    if not hist:
        raise ValueError("histories is empty.")
    batch_size = _check_pos_int("batch_size", batch_size)
    was_training = model.training
    model.eval()
    dev = _model_device(model)
    out = np.empty((len(hist), n_items), dtype=np.float64)
    try:
        for b in range(0, len(hist), batch_size):
            tokens, mask = pad_batch(hist[b : b + batch_size], _context_len(model))
            tokens, mask = tokens.to(dev), mask.to(dev)
            logits = model(input_ids=tokens, attention_mask=mask.long()).logits  # [B, L, V]
            last = mask.sum(1) - 1
            rows = logits[torch.arange(len(last), device=dev), last]  # [B, V]
            out[b : b + len(last)] = rows[:, 1:].double().cpu().numpy()
    finally:
        if was_training:
            model.train()
    return out


def popularity_scores(sequences: Any, n_items: int) -> np.ndarray:
    """How often each item occurs in ``sequences`` (the training users): float64 [n_items]."""
    n_items = _check_pos_int("n_items", n_items)
    seqs = _as_sequences(sequences, n_items, "sequences")
    flat = np.concatenate(seqs) if seqs else np.zeros(0, np.int64)
    return np.bincount(flat, minlength=n_items).astype(np.float64)


def cooccurrence_counts(sequences: Any, n_items: int, window: int = 5) -> np.ndarray:
    """Item-to-item "follows" counts: ``C[i, j]`` = times item j comes at most ``window`` steps after item i.

    Args:
        sequences: training users' item-index sequences.
        n_items: catalogue size.
        window: look-ahead in positions (1 = only the immediate successor).

    Returns:
        float32 array [n_items, n_items] (dense; fine for a few thousand items).
    """
    n_items = _check_pos_int("n_items", n_items)
    window = _check_pos_int("window", window)
    seqs = _as_sequences(sequences, n_items, "sequences")
    flat = np.zeros(n_items * n_items, dtype=np.int64)
    for d in range(1, window + 1):
        src = [s[:-d] for s in seqs if len(s) > d]
        if not src:
            break
        a = np.concatenate(src)
        b = np.concatenate([s[d:] for s in seqs if len(s) > d])
        flat += np.bincount(a * n_items + b, minlength=n_items * n_items)
    return flat.reshape(n_items, n_items).astype(np.float32)


def cooccurrence_scores(
    counts: Any, histories: Any, last: int | None = None, popularity: Any = None
) -> np.ndarray:
    """Score every item by the sum of its co-occurrence counts with the items of each history.

    ``score[u, j] = sum over i in the last `last` items of history u of counts[i, j]``, plus
    ``1e-6 * popularity[j] / max(popularity)`` when ``popularity`` is given (breaks the many ties
    among items that never followed the history, in favour of popular ones).

    Args:
        counts: [n_items, n_items] from :func:`cooccurrence_counts`.
        histories: n item-index sequences (at least one item each).
        last: use only the last ``last`` items of each history (``None``: all of them).
        popularity: optional [n_items] tie-breaker.

    Returns:
        float64 array [n, n_items].
    """
    c = np.asarray(counts)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"counts must be a square [n_items, n_items] matrix, got shape {c.shape}.")
    n_items = c.shape[0]
    hist = _as_sequences(histories, n_items, "histories", min_len=1)
    if last is not None:
        last = _check_pos_int("last", last)
    out = np.empty((len(hist), n_items), dtype=np.float64)
    for r, h in enumerate(hist):
        h = h if last is None else h[-last:]
        out[r] = c[h].sum(axis=0, dtype=np.float64)
    if popularity is not None:
        p = np.asarray(popularity, dtype=np.float64).ravel()
        if p.shape != (n_items,):
            raise ValueError(f"popularity must have shape [{n_items}], got {p.shape}.")
        out += 1e-6 * p / max(p.max(), 1e-12)
    return out


def cooccurrence_embeddings(counts: Any, dim: int, seed: int = 0) -> np.ndarray:
    """Item vectors from a low-rank factorisation of the co-occurrence counts (a warm start for the GPT).

    The counts are symmetrised and damped, ``S = log(1 + C + C^T)``, and factorised with a seeded
    randomised SVD; item i gets ``U[i, :dim] * sqrt(s[:dim])``, so dot products of vectors
    approximate ``S``: items that often occur near each other get similar vectors. This is the
    count-based cousin of item2vec / word2vec.

    Args:
        counts: [n_items, n_items] from :func:`cooccurrence_counts`.
        dim: vector size (``< n_items``), e.g. the GPT's ``n_embd``.
        seed: seeds the randomised SVD.

    Returns:
        float64 array [n_items, dim].
    """
    from sklearn.utils.extmath import randomized_svd

    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"counts must be a square [n_items, n_items] matrix, got shape {c.shape}.")
    if not np.isfinite(c).all() or (c < 0).any():
        raise ValueError("counts must be finite and non-negative.")
    dim = _check_pos_int("dim", dim)
    if dim >= c.shape[0]:
        raise ValueError(f"dim={dim} must be smaller than n_items={c.shape[0]}.")
    sym = np.log1p(c + c.T)
    u, sv, _ = randomized_svd(sym, dim, n_iter=3, random_state=seed)
    return u * np.sqrt(sv)


def history_mask(histories: Any, n_items: int) -> np.ndarray:
    """Boolean [n, n_items], True at the items of each history (to exclude them from a ranking)."""
    n_items = _check_pos_int("n_items", n_items)
    hist = _as_sequences(histories, n_items, "histories")
    m = np.zeros((len(hist), n_items), dtype=bool)
    for r, h in enumerate(hist):
        m[r, h] = True
    return m


def sample_negatives(histories: Any, targets: Any, n_items: int, n_negatives: int = 100, seed: int = 0) -> np.ndarray:
    """For each user, ``n_negatives`` distinct random items that are neither in the history nor the target.

    The sampled protocol of SASRec (Kang & McAuley 2018): the target is ranked against these
    negatives only. Sampling is uniform over the allowed items, seeded per call.

    Returns:
        int64 array [n, n_negatives].
    """
    n_items = _check_pos_int("n_items", n_items)
    n_negatives = _check_pos_int("n_negatives", n_negatives)
    hist = _as_sequences(histories, n_items, "histories")
    t = np.asarray(targets, dtype=np.int64).ravel()
    if len(t) != len(hist):
        raise ValueError(f"{len(hist)} histories but {len(t)} targets.")
    rng = np.random.default_rng(seed)
    out = np.empty((len(hist), n_negatives), dtype=np.int64)
    for r, (h, y) in enumerate(zip(hist, t)):
        if not 0 <= y < n_items:
            raise ValueError(f"target {y} of user {r} is not an item index in [0, {n_items}).")
        banned = np.zeros(n_items, dtype=bool)
        banned[h] = True
        banned[y] = True
        allowed = np.flatnonzero(~banned)
        if len(allowed) < n_negatives:
            raise ValueError(
                f"user {r}: only {len(allowed)} items are outside the history and target; "
                f"cannot sample {n_negatives} negatives (lower n_negatives)."
            )
        out[r] = rng.choice(allowed, size=n_negatives, replace=False)
    return out


def evaluate_next_item(
    scores: Any,
    histories: Any,
    targets: Any,
    k: int = 10,
    n_negatives: int | None = 100,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Leave-one-out metrics per user, full catalogue and (optionally) the sampled protocol.

    Full catalogue: every item is ranked except those in the user's history (they are excluded,
    not counted as misses); ``HR@k`` is 1 when the target is in the top k and ``nDCG@k`` is
    ``1 / log2(rank + 1)`` (one relevant item), via :func:`mrec_utils.metrics.topk_metrics`.

    Sampled: the target is ranked against ``n_negatives`` random items outside the history
    (:func:`sample_negatives` with ``seed``); the rank comes from :func:`mrec_utils.metrics.rank_of`
    with tied scores counted halfway.

    Args:
        scores: [n, n_items] scores of any model (higher = better).
        histories: the n histories (their items are excluded).
        targets: [n] target item indices.
        k: cutoff.
        n_negatives: ``None`` skips the sampled protocol.

    Returns:
        dict of float64 arrays [n]: ``full_hr``, ``full_ndcg`` and, with sampling, ``sampled_hr``,
        ``sampled_ndcg``, ``sampled_rank``.
    """
    from . import metrics

    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [n_users, n_items], got shape {s.shape}.")
    n, n_items = s.shape
    hist = _as_sequences(histories, n_items, "histories")
    t = np.asarray(targets, dtype=np.int64).ravel()
    if len(hist) != n or len(t) != n:
        raise ValueError(f"scores has {n} rows but there are {len(hist)} histories and {len(t)} targets.")
    if t.size and (t.min() < 0 or t.max() >= n_items):
        raise ValueError(f"targets must be item indices in [0, {n_items}).")
    excl = history_mask(hist, n_items)
    if excl[np.arange(n), t].any():
        bad = int(np.flatnonzero(excl[np.arange(n), t])[0])
        raise ValueError(f"user {bad}: the target is also in the history (leakage); fix the split.")
    rel = np.zeros((n, n_items), dtype=bool)
    rel[np.arange(n), t] = True
    full = metrics.topk_metrics(s, rel, exclude=excl, k=k)
    out = {"full_hr": full["hr"], "full_ndcg": full["ndcg"]}
    if n_negatives is not None:
        neg = sample_negatives(hist, t, n_items, n_negatives, seed=seed)
        ranks = np.array([metrics.rank_of(s[r, t[r]], s[r, neg[r]], ties="average") for r in range(n)])
        out["sampled_rank"] = ranks
        out["sampled_hr"] = (ranks <= k).astype(np.float64)
        out["sampled_ndcg"] = np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)
    return out


# ==============================================================================================
# MeLU-style rating model (chapter 5)
# ==============================================================================================
#
# Lee et al. (2019), "MeLU: Meta-Learned User Preference Estimator for Cold-Start
# Recommendation": item (and user) attributes are embedded, the embeddings concatenated, and a
# small MLP (the "decision-making layers") predicts the rating. Per-user adaptation ("local
# update") changes the decision layers; MAML changes every parameter. Here the attributes are
# the ones every MovieLens release has (genres, release year) plus an optional item-id
# embedding for warm items and optional user attributes (ml-100k / ml-1m).
#
# Input layout: one int64 tensor ``x [..., 2 + n_user_fields]`` per example:
#   x[..., 0]  catalogue index of the item (looks up its genres and release-year bucket),
#   x[..., 1]  row of the item-id table (the last row = "unknown / new item"; ignored when the
#              model has no id table),
#   x[..., 2:] user attribute codes, one column per field (0 = unknown).
# Every column accepts 0, so padded rows zeroed by ``mrec_utils.meta`` are valid input.


def _check_count(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
    return int(value)


class MeLURatingModel(torch.nn.Module):
    """Embeddings of item (and user) attributes -> concatenation -> MLP -> rating.

    Args:
        genre_matrix: [n_catalogue, n_genres] 0/1 genre indicators per catalogue item (a buffer).
            The genre embedding of an item is the mean of its genres' vectors (zero if none).
        year_bucket: [n_catalogue] int64 release-year bucket of each item (a buffer).
        n_year_buckets: number of year buckets (rows of the year table).
        n_item_rows: rows of the item-id table (warm items + 1 unknown row); 0 = no id embedding.
        user_cardinalities: number of codes of each user attribute (code 0 = unknown); () = none.
        emb_dim: size of every embedding.
        hidden: widths of the decision layers (ReLU after each).
        offset: added to the output (e.g. the training mean rating) so that a fresh model starts
            near the right scale.

    Parameter groups (names start with): ``genre_emb``, ``year_emb``, ``item_emb``,
    ``user_emb``: the embeddings; ``decision``: the hidden layers; ``out``: the last linear layer.
    ``forward(x [..., C]) -> [...]`` predicted ratings; ``features(x) -> [..., hidden[-1]]`` the
    last hidden layer (used as the embedding of a prototypical head).
    """

    def __init__(
        self,
        genre_matrix: Any,
        year_bucket: Any,
        n_year_buckets: int,
        n_item_rows: int = 0,
        user_cardinalities: Sequence[int] = (),
        emb_dim: int = 16,
        hidden: Sequence[int] = (64, 32),
        offset: float = 0.0,
    ):
        super().__init__()
        g = torch.as_tensor(np.asarray(genre_matrix), dtype=torch.get_default_dtype())
        yb = torch.as_tensor(np.asarray(year_bucket), dtype=torch.long)
        if g.ndim != 2 or g.shape[0] == 0:
            raise ValueError(f"genre_matrix must be [n_catalogue, n_genres], got shape {tuple(g.shape)}.")
        if yb.shape != (g.shape[0],):
            raise ValueError(f"year_bucket must be [n_catalogue={g.shape[0]}], got shape {tuple(yb.shape)}.")
        n_year_buckets = _check_count("n_year_buckets", n_year_buckets)
        if int(yb.min()) < 0 or int(yb.max()) >= n_year_buckets:
            raise ValueError(f"year_bucket values must lie in [0, n_year_buckets={n_year_buckets}).")
        n_item_rows = _check_count("n_item_rows", n_item_rows, low=0)
        if n_item_rows == 1:
            raise ValueError("n_item_rows must be 0 (no id embedding) or >= 2 (warm items + the unknown row).")
        cards = tuple(_check_count("user_cardinalities entry", c, low=2) for c in user_cardinalities)
        emb_dim = _check_count("emb_dim", emb_dim)
        hidden = tuple(_check_count("hidden width", h) for h in hidden)
        if not hidden:
            raise ValueError("hidden must list at least one layer width, e.g. (64, 32).")
        # genres normalised by their count: the linear map then averages the genre vectors
        self.register_buffer("genres", g / g.sum(1, keepdim=True).clamp_min(1.0))
        self.register_buffer("year_bucket", yb)
        self.register_buffer("offset", torch.tensor(float(offset)))
        self.n_item_rows = n_item_rows
        self.user_cardinalities = cards
        self.genre_emb = torch.nn.Linear(g.shape[1], emb_dim, bias=False)
        self.year_emb = torch.nn.Embedding(n_year_buckets, emb_dim)
        self.item_emb = torch.nn.Embedding(n_item_rows, emb_dim) if n_item_rows else None
        self.user_emb = torch.nn.ModuleList(torch.nn.Embedding(c, emb_dim) for c in cards)
        n_fields = 2 + (1 if n_item_rows else 0) + len(cards)
        layers: list[torch.nn.Module] = []
        width = n_fields * emb_dim
        for h in hidden:
            layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
            width = h
        self.decision = torch.nn.Sequential(*layers)
        self.out = torch.nn.Linear(width, 1)
        for emb in [self.year_emb, *([self.item_emb] if self.item_emb is not None else []), *self.user_emb]:
            torch.nn.init.normal_(emb.weight, std=0.1)

    @property
    def n_columns(self) -> int:
        """Columns C of the input ``x [..., C]``: item, id row, one per user attribute."""
        return 2 + len(self.user_cardinalities)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated embeddings ``[..., n_fields * emb_dim]`` of ``x [..., C]`` (int64)."""
        if x.shape[-1] != self.n_columns:
            raise ValueError(f"x must have {self.n_columns} columns (item, id row, user fields), got {x.shape[-1]}.")
        item = x[..., 0]
        parts = [self.genre_emb(self.genres[item]), self.year_emb(self.year_bucket[item])]
        if self.item_emb is not None:
            parts.append(self.item_emb(x[..., 1]))
        parts += [emb(x[..., 2 + j]) for j, emb in enumerate(self.user_emb)]
        return torch.cat(parts, dim=-1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden layer ``[..., hidden[-1]]``."""
        return self.decision(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted ratings ``[...]`` for ``x [..., C]``."""
        return self.out(self.features(x)).squeeze(-1) + self.offset


MELU_ADAPT: dict[str, str] = {
    "every": "every parameter, the item-id table included (Reptile, whose outer update moves only these)",
    "all": "every parameter except the item-id table (MAML)",
    "head": "the decision layers and the output layer (MeLU's local update; ANIL with the embeddings as body)",
    "out": "the output layer only",
}
"""Adaptation flags of :func:`melu_adapt_spec` and what each adapts per user."""


def melu_adapt_spec(adapt: str) -> Any:
    """The ``adapt=`` argument of :func:`mrec_utils.meta.split_params` for a :class:`MeLURatingModel`.

    ``"all"`` adapts every parameter *except the item-id table*. An inner SGD step changes only
    the id rows of the support items, and a user's query (and the ranked catalogue, which excludes
    the support) never contains a support item; so with one inner step adapting the table changes
    no evaluated prediction, and with more steps it only changes the support loss. Leaving it out
    saves a per-user copy of the whole table. ``"every"``: all parameters, the table included
    (Reptile needs it: its outer update only moves the adapted parameters, so a table left out
    would never be trained). ``"head"``: decision + output layers (MeLU). ``"out"``: the output layer.
    """
    if adapt == "every":
        return lambda name: True
    if adapt == "all":
        return lambda name: not name.startswith("item_emb")
    if adapt == "head":
        return ["decision", "out"]
    if adapt == "out":
        return ["out"]
    raise ValueError(f"unknown adapt flag {adapt!r}; choose one of {list(MELU_ADAPT)}.")


# ==============================================================================================
# Matrix factorisation with fold-in (chapter 5)
# ==============================================================================================
#
# Biased MF (Koren, Bell & Volinsky 2009): r_ui ~ mu + b_u + b_i + p_u . q_i, fitted by
# alternating least squares (each half-step is a ridge regression per row, solved in closed
# form). A new user is *folded in* by the same ridge regression on their support ratings with
# the items fixed: x_i = [q_i, 1], target r - mu - b_i, solution w = (X'X + reg I)^-1 X' t,
# i.e. (p_u, b_u) = (w[:-1], w[-1]).


@dataclass
class BiasedMF:
    """A fitted biased matrix factorisation (tensors on one device, float64).

    Attributes:
        mu: global mean rating.
        item_factors: [n_items, dim]; item_bias: [n_items]; user_factors: [n_users, dim];
        user_bias: [n_users]. An item without training ratings has zero factors and bias.
        reg: the ridge penalty used for every row (factors and bias alike).
    """

    mu: float
    item_factors: torch.Tensor
    item_bias: torch.Tensor
    user_factors: torch.Tensor
    user_bias: torch.Tensor
    reg: float

    def predict(self, users: Any, items: Any) -> torch.Tensor:
        """Ratings for aligned index arrays ``users [n]``, ``items [n]`` -> [n]."""
        dev = self.item_bias.device
        u = users.to(dev).long() if isinstance(users, torch.Tensor) else torch.as_tensor(np.asarray(users), dtype=torch.long, device=dev)
        i = items.to(dev).long() if isinstance(items, torch.Tensor) else torch.as_tensor(np.asarray(items), dtype=torch.long, device=dev)
        return self.mu + self.user_bias[u] + self.item_bias[i] + (self.user_factors[u] * self.item_factors[i]).sum(-1)


def _check_reg(reg: Any) -> float:
    if isinstance(reg, bool) or not isinstance(reg, (int, float, np.floating)) or not float(reg) > 0:
        raise ValueError(f"reg must be a positive number (the ridge penalty), got {reg!r}.")
    return float(reg)


def ridge_rows(rows: torch.Tensor, cols: torch.Tensor, table: torch.Tensor, target: torch.Tensor,
               n_rows: int, reg: float) -> torch.Tensor:
    """One ridge regression per row: ``w_r = (X_r'X_r + reg I)^-1 X_r' t_r``.

    Observation ``j`` belongs to row ``rows[j]`` (e.g. a user) and its features are the table row
    ``table[cols[j]]`` (e.g. ``[q_i, 1]`` of the rated item). The normal equations are built
    with one sparse product, ``A = S (x x')`` and ``b = S_t x`` over the *table* rows, so the
    cost grows with the number of observations times ``p``, not ``p^2``.

    Args:
        rows: [n] int64 row of each observation, in ``[0, n_rows)``.
        cols: [n] int64 table row of each observation.
        table: [m, p] features.
        target: [n] targets.
        n_rows: number of regressions R.
        reg: ridge penalty > 0 (every system is solvable; a row without observations gets 0).

    Returns:
        [R, p] solutions (``table``'s dtype and device).
    """
    reg = _check_reg(reg)
    if table.ndim != 2 or rows.ndim != 1 or rows.shape != cols.shape or target.shape != rows.shape:
        raise ValueError(f"need rows [n], cols [n], table [m, p], target [n]; got {tuple(rows.shape)}, "
                         f"{tuple(cols.shape)}, {tuple(table.shape)}, {tuple(target.shape)}.")
    m, p = table.shape
    idx = torch.stack([rows, cols])
    ones = torch.ones(len(rows), dtype=table.dtype, device=table.device)
    count = torch.sparse_coo_tensor(idx, ones, (n_rows, m), check_invariants=False).coalesce()
    weighted = torch.sparse_coo_tensor(idx, target.to(table.dtype), (n_rows, m), check_invariants=False).coalesce()
    outer = (table[:, :, None] * table[:, None, :]).reshape(m, p * p)
    a = torch.sparse.mm(count, outer).reshape(n_rows, p, p)
    a = a + reg * torch.eye(p, dtype=table.dtype, device=table.device)
    b = torch.sparse.mm(weighted, table)
    chol = torch.linalg.cholesky(a)  # a is symmetric positive definite because reg > 0
    return torch.cholesky_solve(b[:, :, None], chol)[:, :, 0]


def fit_biased_mf(
    users: Any, items: Any, ratings: Any, n_users: int, n_items: int, *,
    dim: int = 16, reg: float = 5.0, iters: int = 10, seed: int = 0, device: Any = None,
) -> BiasedMF:
    """Biased MF by alternating least squares (closed-form ridge per user, then per item).

    Args:
        users, items: [n] int64 indices in ``[0, n_users)``, ``[0, n_items)``.
        ratings: [n] ratings.
        dim: number of latent factors; reg: ridge penalty of every row; iters: ALS sweeps.
        seed: seeds the initial item factors (normal, std 0.1); device: where to compute (CPU default).

    Returns:
        :class:`BiasedMF` (float64).
    """
    dim = _check_count("dim", dim)
    iters = _check_count("iters", iters)
    reg = _check_reg(reg)
    n_users = _check_count("n_users", n_users)
    n_items = _check_count("n_items", n_items)
    dev = torch.device("cpu") if device is None else torch.device(device)
    u = torch.as_tensor(np.asarray(users), dtype=torch.long, device=dev)
    i = torch.as_tensor(np.asarray(items), dtype=torch.long, device=dev)
    r = torch.tensor(np.asarray(ratings, dtype=np.float64), device=dev)
    if not (u.shape == i.shape == r.shape and u.ndim == 1 and len(u) > 0):
        raise ValueError("users, items and ratings must be non-empty 1-D arrays of the same length.")
    if int(u.min()) < 0 or int(u.max()) >= n_users or int(i.min()) < 0 or int(i.max()) >= n_items:
        raise ValueError("user / item indices out of range [0, n_users) / [0, n_items).")
    if not torch.isfinite(r).all():
        raise ValueError("ratings must be finite.")
    mu = float(r.mean())
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    q = (0.1 * torch.randn(n_items, dim, generator=gen, dtype=torch.float64)).to(dev)
    bi = torch.zeros(n_items, dtype=torch.float64, device=dev)
    with_one = lambda f: torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype, device=f.device)], 1)  # noqa: E731
    for _ in range(iters):
        w = ridge_rows(u, i, with_one(q), r - mu - bi[i], n_users, reg)  # users, items fixed
        p, bu = w[:, :-1], w[:, -1]
        w = ridge_rows(i, u, with_one(p), r - mu - bu[u], n_items, reg)  # items, users fixed
        q, bi = w[:, :-1], w[:, -1]
    return BiasedMF(mu, q, bi, p, bu, reg)


def fold_in(mf: BiasedMF, items: Any, ratings: Any, mask: Any = None, reg: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold new users into a fitted :class:`BiasedMF`: ridge regression on their support ratings.

    ``(p_u, b_u) = argmin sum_j (r_j - mu - b_ij - b_u - p_u . q_ij)^2 + reg (|p_u|^2 + b_u^2)``,
    solved in closed form; the item factors stay fixed.

    Args:
        items: [S] or [T, S] item indices of the support ratings (padding anywhere, see mask).
        ratings: same shape, the support ratings.
        mask: same shape, True for real ratings (None = all real).
        reg: ridge penalty (default: the one the MF was fitted with).

    Returns:
        ``(user_factors [T, dim] or [dim], user_bias [T] or [])``.
    """
    reg = mf.reg if reg is None else _check_reg(reg)
    dev = mf.item_bias.device

    def as_tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:  # tensors stay on their device until moved
        return a.to(device=dev, dtype=dtype) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a), dtype=dtype, device=dev)

    it = as_tensor(items, torch.long)
    rt = as_tensor(ratings, torch.float64)
    single = it.ndim == 1
    if single:
        it, rt = it[None], rt[None]
    if it.ndim != 2 or rt.shape != it.shape:
        raise ValueError(f"items and ratings must both be [S] or [T, S], got {tuple(it.shape)} and {tuple(rt.shape)}.")
    m = torch.ones_like(it, dtype=torch.bool) if mask is None else as_tensor(mask, torch.bool)
    if single and m.ndim == 1:
        m = m[None]
    if m.shape != it.shape:
        raise ValueError(f"mask must have the shape of items {tuple(it.shape)}, got {tuple(m.shape)}.")
    rows = torch.arange(it.shape[0], device=dev)[:, None].expand_as(it)[m]
    sel = it[m]
    if sel.numel() and (int(sel.min()) < 0 or int(sel.max()) >= len(mf.item_bias)):
        raise ValueError(f"item indices must lie in [0, {len(mf.item_bias)}).")
    table = torch.cat([mf.item_factors, torch.ones(len(mf.item_bias), 1, dtype=mf.item_factors.dtype, device=dev)], 1)
    w = ridge_rows(rows, sel, table, rt[m] - mf.mu - mf.item_bias[sel], it.shape[0], reg)
    p, b = w[:, :-1], w[:, -1]
    return (p[0], b[0]) if single else (p, b)
