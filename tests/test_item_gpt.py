"""Tests of mrec_utils.gpt, the item-GPT of chapter 7."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import gpt, metrics
from mrec_utils.gpt import ItemGPTSettings


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread is faster, and much faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ synthetic data with a planted rule


def interleaved_cycles(n_seq: int, length: int, n_items: int, seed: int) -> list[np.ndarray]:
    """Two interleaved cycles: s[t] = s[t-2] + 1 (mod n_items). The immediate predecessor says
    nothing about the next item (both chains start at random), the item two steps back says all."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_seq):
        a, b = rng.integers(0, n_items, size=2)
        s = np.empty(length, dtype=np.int64)
        s[0], s[1] = a, b
        for t in range(2, length):
            s[t] = (s[t - 2] + 1) % n_items
        out.append(s)
    return out


def test_item_gpt_learns_a_planted_rule_fast():
    n_items = 24
    train_seqs = interleaved_cycles(400, 16, n_items, seed=0)
    test_seqs = interleaved_cycles(100, 16, n_items, seed=1)
    model = gpt.make_item_gpt(n_items, ItemGPTSettings(max_len=16, n_embd=32, n_layer=2, n_head=2, dropout=0.0), seed=0)
    log = gpt.train_item_gpt(model, train_seqs, ItemGPTSettings(epochs=25, batch_size=32, lr=1e-2), seed=0, progress=False)
    assert log.losses[-1] < log.losses[0]
    # predict the last item of unseen sequences from the 15 before it
    hist, targets, owner = gpt.leave_last_out(test_seqs)
    assert len(hist) == 100 and (owner == np.arange(100)).all()
    scores = gpt.score_next_items(model, hist)
    assert scores.shape == (100, n_items) and scores.dtype == np.float64
    # HR@1 with nothing excluded (the target, s[t-2] + 1, may be in the history of a cycle)
    hr1 = float((scores.argmax(1) == targets).mean())
    assert hr1 > 0.95, hr1
    # an order-1 co-occurrence model cannot know the rule: the successor of s[t-1] is random
    counts = gpt.cooccurrence_counts(train_seqs, n_items, window=1)
    co = gpt.cooccurrence_scores(counts, hist, last=1)
    assert float((co.argmax(1) == targets).mean()) < 0.3


def test_item_gpt_runs_on_the_models_device_and_is_deterministic():
    seqs = interleaved_cycles(40, 10, 12, seed=0)
    a = gpt.make_item_gpt(12, ItemGPTSettings(max_len=10, n_embd=16, n_head=2), seed=3)
    b = gpt.make_item_gpt(12, ItemGPTSettings(max_len=10, n_embd=16, n_head=2), seed=3)
    for m in (a, b):
        gpt.train_item_gpt(m, seqs, ItemGPTSettings(epochs=2, batch_size=8), seed=5, progress=False)
    sa, sb = gpt.score_next_items(a, seqs), gpt.score_next_items(b, seqs)
    np.testing.assert_array_equal(sa, sb)
    c = gpt.make_item_gpt(12, ItemGPTSettings(max_len=10, n_embd=16, n_head=2), seed=4)
    assert not np.allclose(gpt.score_next_items(c, seqs), sa)


def test_score_uses_only_the_last_max_len_items_and_ignores_padding():
    model = gpt.make_item_gpt(30, ItemGPTSettings(max_len=8, n_embd=16, n_head=2, dropout=0.0), seed=0)
    long = np.arange(20) % 30
    short = np.array([3, 4])
    both = gpt.score_next_items(model, [long, short])
    alone_long = gpt.score_next_items(model, [long[-8:]])
    alone_short = gpt.score_next_items(model, [short])
    np.testing.assert_allclose(both[0], alone_long[0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone_short[0], atol=1e-5)  # padding changes nothing


def test_next_item_loss_matches_a_plain_loop():
    torch.manual_seed(0)
    model = gpt.make_item_gpt(10, ItemGPTSettings(max_len=6, n_embd=16, n_head=2, dropout=0.0), seed=1)
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6])]
    tokens, mask = gpt.pad_batch(seqs, 6)
    loss = gpt.next_item_loss(model, tokens, mask)
    terms = []
    for s in seqs:
        tok = torch.tensor(s + 1)[None]
        logp = torch.log_softmax(model(input_ids=tok).logits[0], -1)
        terms += [-logp[t, s[t + 1] + 1] for t in range(len(s) - 1)]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)


# ------------------------------------------------------------------ sequences and splits


def _ratings() -> pd.DataFrame:
    ts = pd.to_datetime([5, 1, 3, 3, 3, 2, 9, 1, 4], unit="s", utc=True)
    return pd.DataFrame({
        "user_id": [1, 1, 1, 1, 1, 2, 2, 3, 3],
        "item_id": [10, 20, 30, 40, 50, 10, 60, 20, 70],
        "rating": np.ones(9, dtype=np.float64),
        "timestamp": ts,
    })


def test_user_sequences_are_chronological_and_independent_of_row_order():
    r = _ratings()
    seq = gpt.user_sequences(r, seed=0)
    assert seq.users.tolist() == [1, 2, 3]
    ids = [seq.item_ids[s].tolist() for s in seq.sequences]
    assert ids[0][0] == 20 and ids[0][-1] == 10  # times 1 ... 5
    assert sorted(ids[0][1:4]) == [30, 40, 50]  # the three ratings of second 3, in some order
    shuffled = gpt.user_sequences(r.sample(frac=1, random_state=7), seed=0)
    for a, b in zip(seq.sequences, shuffled.sequences):
        np.testing.assert_array_equal(a, b)
    # ties are broken by the seed, not by item id, for at least one seed
    orders = {tuple(gpt.user_sequences(r, seed=s).sequences[0][1:4]) for s in range(20)}
    assert len(orders) > 1


def test_user_sequences_drop_items_outside_the_vocabulary():
    r = _ratings()
    vocab = gpt.build_item_vocab(r, min_count=2)
    assert vocab.tolist() == [10, 20]
    seq = gpt.user_sequences(r, vocab, users=[3, 1])
    assert seq.users.tolist() == [3, 1]
    assert [seq.item_ids[s].tolist() for s in seq.sequences] == [[20], [20, 10]]
    assert len(gpt.user_sequences(r, vocab, users=[99]).sequences[0]) == 0  # a user without ratings: empty


def test_leave_last_out_has_no_leakage_and_splits_users_cleanly():
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(50)[: rng.integers(2, 30)] for _ in range(40)]
    hist, targets, owner = gpt.leave_last_out(seqs, n_last=5)
    for h, t, o in zip(hist, targets, owner):
        s = seqs[o]
        assert t not in h  # MovieLens has one rating per user-item pair, so no repeats
        pos = len(h)
        np.testing.assert_array_equal(h, s[:pos])  # the history is exactly the past
        assert s[pos] == t
    counts = np.bincount(owner, minlength=len(seqs))
    assert (counts == np.minimum(5, np.array([len(s) for s in seqs]) - 1)).all()
    one_h, one_t, one_o = gpt.leave_last_out(seqs)
    assert (one_t == np.array([s[-1] for s in seqs])).all()
    assert gpt.leave_last_out([np.array([1])])[0] == []  # one film: no case


def test_train_and_test_users_are_disjoint_on_a_user_cold_split():
    from mrec_utils import tasks

    rng = np.random.default_rng(0)
    n = 60 * 25
    r = pd.DataFrame({
        "user_id": np.repeat(np.arange(60), 25),
        "item_id": np.concatenate([rng.permutation(80)[:25] for _ in range(60)]),
        "rating": np.ones(n, dtype=np.float64),
        "timestamp": pd.to_datetime(rng.integers(0, 10**6, n), unit="s", utc=True),
    })
    split = tasks.make_split(r, "user-cold", seed=0, max_ratings=None)
    vocab = gpt.build_item_vocab(split.train, min_count=1)
    seq = gpt.user_sequences(r, vocab)
    tr, te = seq.subset(split.train_users), seq.subset(split.test_users)
    assert not set(tr.users.tolist()) & set(te.users.tolist())
    assert len(te) == len(split.test_users) > 0


# ------------------------------------------------------------------ baselines and evaluation


def test_cooccurrence_counts_equal_a_plain_loop():
    rng = np.random.default_rng(1)
    n_items = 7
    seqs = [rng.integers(0, n_items, size=rng.integers(1, 12)) for _ in range(15)]
    for window in (1, 3):
        ref = np.zeros((n_items, n_items))
        for s in seqs:
            for a in range(len(s)):
                for b in range(a + 1, min(len(s), a + window + 1)):
                    ref[s[a], s[b]] += 1
        np.testing.assert_array_equal(gpt.cooccurrence_counts(seqs, n_items, window=window), ref)
    counts = gpt.cooccurrence_counts(seqs, n_items, window=2)
    hist = [np.array([0, 3, 5]), np.array([2])]
    sc = gpt.cooccurrence_scores(counts, hist, last=2)
    np.testing.assert_allclose(sc[0], counts[3] + counts[5])
    np.testing.assert_allclose(sc[1], counts[2])
    np.testing.assert_allclose(gpt.cooccurrence_scores(counts, hist)[0], counts[[0, 3, 5]].sum(0))
    pop = gpt.popularity_scores(seqs, n_items)
    assert pop.sum() == sum(len(s) for s in seqs)
    tie = gpt.cooccurrence_scores(np.zeros((n_items, n_items)), hist, popularity=pop)
    assert tie[0].argmax() == pop.argmax()


def test_sampled_negatives_exclude_history_and_target():
    rng = np.random.default_rng(2)
    n_items = 300
    hist = [rng.permutation(n_items)[: rng.integers(1, 150)] for _ in range(30)]
    targets = np.array([rng.choice(np.setdiff1d(np.arange(n_items), h)) for h in hist])
    neg = gpt.sample_negatives(hist, targets, n_items, n_negatives=100, seed=0)
    assert neg.shape == (30, 100)
    for h, t, ng in zip(hist, targets, neg):
        assert len(set(ng.tolist())) == 100
        assert not set(ng.tolist()) & set(h.tolist())
        assert t not in ng
    np.testing.assert_array_equal(neg, gpt.sample_negatives(hist, targets, n_items, 100, seed=0))
    assert not np.array_equal(neg, gpt.sample_negatives(hist, targets, n_items, 100, seed=1))


def test_evaluate_next_item_matches_hand_computation():
    n_items = 6
    scores = np.array([[0.9, 0.8, 0.1, 0.5, 0.3, 0.2],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    hist = [np.array([0]), np.array([5, 4])]
    targets = np.array([3, 0])
    res = gpt.evaluate_next_item(scores, hist, targets, k=2, n_negatives=3, seed=0)
    # user 0: item 0 excluded -> ranking 1, 3, 4, 5, 2 -> target 3 at rank 2
    assert res["full_hr"][0] == 1.0 and res["full_ndcg"][0] == pytest.approx(1 / np.log2(3))
    # user 1: items 5, 4 excluded -> ranking 3, 2, 1, 0 -> target 0 at rank 4
    assert res["full_hr"][1] == 0.0 and res["full_ndcg"][1] == 0.0
    neg = gpt.sample_negatives(hist, targets, n_items, 3, seed=0)
    for r in range(2):
        rank = metrics.rank_of(scores[r, targets[r]], scores[r, neg[r]])
        assert res["sampled_rank"][r] == rank
        assert res["sampled_hr"][r] == float(rank <= 2)


def test_evaluate_rejects_a_target_in_the_history():
    with pytest.raises(ValueError, match="leakage"):
        gpt.evaluate_next_item(np.zeros((1, 5)), [np.array([1, 2])], [2])


def test_user_sequences_need_the_rating_columns():
    with pytest.raises(ValueError, match="timestamp"):
        gpt.user_sequences(_ratings().drop(columns="timestamp"))


def test_training_windows_cover_every_transition_once():
    seqs = [np.arange(23), np.arange(5), np.arange(1)]
    wins = gpt.training_windows(seqs, max_len=6)
    assert all(2 <= len(w) <= 6 for w in wins)
    pairs = [(int(w[t]), int(w[t + 1])) for w in wins for t in range(len(w) - 1)]
    expected = [(int(s[t]), int(s[t + 1])) for s in seqs for t in range(len(s) - 1)]
    assert sorted(pairs) == sorted(expected)


def test_cooccurrence_embeddings_give_the_best_low_rank_approximation():
    rng = np.random.default_rng(3)
    n_items, dim = 30, 5
    seqs = [rng.integers(0, n_items, size=20) for _ in range(40)]
    counts = gpt.cooccurrence_counts(seqs, n_items, window=3)
    vec = gpt.cooccurrence_embeddings(counts, dim, seed=0)
    assert vec.shape == (n_items, dim) and vec.dtype == np.float64
    sym = np.log1p(counts + counts.T)
    u, s, _ = np.linalg.svd(sym)
    exact = (u[:, :dim] * s[:dim]) @ u[:, :dim].T
    np.testing.assert_allclose(vec @ vec.T, exact, atol=1e-2 * np.abs(exact).max())
    np.testing.assert_array_equal(vec, gpt.cooccurrence_embeddings(counts, dim, seed=0))


def test_make_item_gpt_warm_start_sets_item_embeddings_only():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(12, 16)).astype(np.float64) * 5 + 1
    cold = gpt.make_item_gpt(12, ItemGPTSettings(max_len=8, n_embd=16, n_head=2), seed=0)
    warm = gpt.make_item_gpt(12, ItemGPTSettings(max_len=8, n_embd=16, n_head=2), seed=0, item_vectors=vec)
    w = warm.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(w[0], cold.transformer.wte.weight.detach().numpy()[0])  # padding row untouched
    centred = vec - vec.mean()
    np.testing.assert_allclose(w[1:], centred * (0.02 / centred.std(ddof=1)), rtol=1e-4, atol=1e-7)
    assert warm.lm_head.weight.data_ptr() == warm.transformer.wte.weight.data_ptr()  # still tied


# ------------------------------------------------------------------ early stopping and ensembles


def _adversarial_val(n_items: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Validation cases whose 'target' breaks the planted rule (s[t-2] + 3 instead of + 1), so a
    model that learns the rule gets *worse* on them: the best validation epoch is an early one."""
    hist, targets = [], []
    for s in interleaved_cycles(60, 10, n_items, seed=seed):
        h, y = s[:9], (s[7] + 3) % n_items
        if y not in set(h.tolist()):
            hist.append(h)
            targets.append(y)
    return hist, np.array(targets)


def test_early_stopping_restores_the_best_epoch_and_val_only_chooses_it():
    n_items = 40
    train_seqs = interleaved_cycles(200, 10, n_items, seed=0)
    val = _adversarial_val(n_items, seed=5)
    settings = ItemGPTSettings(max_len=10, n_embd=16, n_head=2, dropout=0.0, epochs=12, batch_size=32, lr=1e-2, patience=2)
    model = gpt.make_item_gpt(n_items, settings, seed=0)
    log = gpt.train_item_gpt(model, train_seqs, settings, seed=0, val=val, progress=False)
    n_run = len(log.losses)
    assert len(log.val_ndcg) == n_run
    assert log.best_epoch == int(np.argmax(log.val_ndcg)) + 1
    assert log.best_epoch < n_run <= 12 and n_run == log.best_epoch + 2  # stopped after `patience` bad epochs
    # the returned weights are the best epoch's: they reproduce its validation nDCG exactly ...
    res = gpt.evaluate_next_item(gpt.score_next_items(model, val[0]), val[0], val[1], n_negatives=None)
    assert float(res["full_ndcg"].mean()) == pytest.approx(log.val_ndcg[log.best_epoch - 1], abs=1e-12)
    # ... and not the last epoch's. The same training without validation data follows the same
    # trajectory (identical losses): the validation users only choose the epoch.
    plain = gpt.make_item_gpt(n_items, settings, seed=0)
    plain_log = gpt.train_item_gpt(plain, train_seqs, replace(settings, epochs=n_run), seed=0, progress=False)
    assert plain_log.losses == log.losses
    res_last = gpt.evaluate_next_item(gpt.score_next_items(plain, val[0]), val[0], val[1], n_negatives=None)
    assert float(res_last["full_ndcg"].mean()) == pytest.approx(log.val_ndcg[-1], abs=1e-12)
    assert float(res_last["full_ndcg"].mean()) < log.val_ndcg[log.best_epoch - 1]


def test_ensemble_scores_are_the_mean_of_member_log_probabilities():
    a = gpt.make_item_gpt(15, ItemGPTSettings(max_len=8, n_embd=16, n_head=2), seed=0)
    b = gpt.make_item_gpt(15, ItemGPTSettings(max_len=8, n_embd=16, n_head=2), seed=1)
    hist = [np.array([1, 2, 3]), np.array([7]), np.arange(12) % 15]
    ens = gpt.score_next_items([a, b], hist)
    assert ens.shape == (3, 15) and ens.dtype == np.float64
    by_hand = []
    for m in (a, b):
        m.eval()  # a fresh GPT2LMHeadModel is in training mode (dropout on)
        with torch.no_grad():
            for r, h in enumerate(hist):
                logits = m(input_ids=torch.tensor(h[-8:] + 1)[None]).logits[0, -1, 1:]
                by_hand.append(torch.log_softmax(logits, -1).numpy())
    by_hand = np.array(by_hand).reshape(2, 3, 15).mean(0)
    np.testing.assert_allclose(ens, by_hand, atol=1e-5)
    # an ensemble of one ranks exactly like the model (log-softmax is a per-row shift)
    one, alone = gpt.score_next_items([a], hist), gpt.score_next_items(a, hist)
    np.testing.assert_allclose(one - one[:, :1], alone - alone[:, :1], atol=1e-5)


def test_ensemble_training_in_lockstep():
    n_items = 40
    train_seqs = interleaved_cycles(200, 10, n_items, seed=0)
    val = _adversarial_val(n_items, seed=5)
    settings = ItemGPTSettings(max_len=10, n_embd=16, n_head=2, dropout=0.0, epochs=8, batch_size=32, lr=1e-2, patience=2)
    # a list of one model trains exactly like the model itself
    with_dropout = replace(settings, dropout=0.1, epochs=2)  # dropout on: the dropout masks must match too
    single, listed = gpt.make_item_gpt(n_items, with_dropout), gpt.make_item_gpt(n_items, with_dropout)
    gpt.train_item_gpt(single, train_seqs, with_dropout, seed=3, progress=False)
    gpt.train_item_gpt([listed], train_seqs, with_dropout, seed=3, progress=False)
    np.testing.assert_array_equal(gpt.score_next_items(single, val[0]), gpt.score_next_items(listed, val[0]))
    # two members: early stopping keeps the ensemble's best epoch for both members
    pair = [gpt.make_item_gpt(n_items, settings, seed=s) for s in (0, 1)]
    log = gpt.train_item_gpt(pair, train_seqs, settings, seed=0, val=val, progress=False)
    assert log.best_epoch < len(log.losses)
    res = gpt.evaluate_next_item(gpt.score_next_items(pair, val[0]), val[0], val[1], n_negatives=None)
    assert float(res["full_ndcg"].mean()) == pytest.approx(log.val_ndcg[log.best_epoch - 1], abs=1e-12)
    assert not np.allclose(gpt.score_next_items(pair[0], val[0]), gpt.score_next_items(pair[1], val[0]))


# ------------------------------------------------------------------ the pieces the chapters show


def test_train_item_gpt_is_train_epoch_per_epoch():
    """Without validation users, train_item_gpt is AdamW + one train_epoch per epoch with the documented seeds."""
    seqs = interleaved_cycles(60, 12, 20, seed=0)
    settings = ItemGPTSettings(max_len=8, n_embd=16, n_head=2, dropout=0.1, epochs=2, batch_size=16, lr=1e-2)
    packaged, by_hand = gpt.make_item_gpt(20, settings, seed=1), gpt.make_item_gpt(20, settings, seed=1)
    log = gpt.train_item_gpt(packaged, seqs, settings, seed=4, progress=False)
    opt = torch.optim.AdamW(by_hand.parameters(), lr=settings.lr, weight_decay=0.0)
    rng = np.random.default_rng(4)
    windows = gpt.training_windows(seqs, settings.max_len)
    with torch.random.fork_rng():
        torch.manual_seed(4)
        losses = [gpt.train_epoch(by_hand, opt, windows, settings.batch_size, rng) for _ in range(settings.epochs)]
    assert log.losses == losses and log.best_epoch == 2
    for a, b in zip(packaged.parameters(), by_hand.parameters()):
        assert torch.equal(a, b)


def test_tune_cooccurrence_and_per_user_mean_match_plain_code():
    rng = np.random.default_rng(5)
    n_items = 30
    seqs = gpt.ItemSequences(np.arange(40), [rng.integers(0, n_items, size=rng.integers(3, 25)) for _ in range(40)],
                             np.arange(n_items))
    val = gpt.leave_last_out([rng.permutation(n_items)[:12] for _ in range(15)], n_last=3)
    owner = val[2]
    by_user = pd.Series(np.arange(len(owner), dtype=float)).groupby(owner).mean().to_numpy()
    np.testing.assert_allclose(gpt.per_user_mean(np.arange(len(owner), dtype=float), owner), by_user)
    settings = ItemGPTSettings(cooc_windows=(1, 3), cooc_lasts=(1, 4))
    grid, best = gpt.tune_cooccurrence(seqs, val, settings)
    pop = gpt.popularity_scores(seqs, n_items)
    want = {}
    for w in (1, 3):
        for m in (1, 4):
            s = gpt.cooccurrence_scores(gpt.cooccurrence_counts(seqs, n_items, w), val[0], last=m, popularity=pop)
            ndcg = gpt.evaluate_next_item(s, val[0], val[1], n_negatives=None)["full_ndcg"]
            want[(w, m)] = pd.Series(ndcg).groupby(owner).mean().mean()
    np.testing.assert_allclose(grid["val nDCG@10"].to_numpy(), list(want.values()), atol=1e-12)
    assert want[best] == max(want.values()) and best == next(k for k, v in want.items() if v == max(want.values()))
