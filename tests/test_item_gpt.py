"""Tests of the item-GPT section of mrec_utils.models (chapter 7)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import metrics, models


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
    model = models.make_item_gpt(n_items, max_len=16, n_embd=32, n_layer=2, n_head=2, dropout=0.0, seed=0)
    log = models.train_item_gpt(model, train_seqs, epochs=25, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert log.losses[-1] < log.losses[0]
    # predict the last item of unseen sequences from the 15 before it
    hist, targets, owner = models.leave_last_out(test_seqs)
    assert len(hist) == 100 and (owner == np.arange(100)).all()
    scores = models.score_next_items(model, hist)
    assert scores.shape == (100, n_items) and scores.dtype == np.float64
    # HR@1 with nothing excluded (the target, s[t-2] + 1, may be in the history of a cycle)
    hr1 = float((scores.argmax(1) == targets).mean())
    assert hr1 > 0.95, hr1
    # an order-1 co-occurrence model cannot know the rule: the successor of s[t-1] is random
    counts = models.cooccurrence_counts(train_seqs, n_items, window=1)
    co = models.cooccurrence_scores(counts, hist, last=1)
    assert float((co.argmax(1) == targets).mean()) < 0.3


def test_item_gpt_runs_on_the_models_device_and_is_deterministic():
    seqs = interleaved_cycles(40, 10, 12, seed=0)
    a = models.make_item_gpt(12, max_len=10, n_embd=16, n_head=2, seed=3)
    b = models.make_item_gpt(12, max_len=10, n_embd=16, n_head=2, seed=3)
    for m in (a, b):
        models.train_item_gpt(m, seqs, epochs=2, batch_size=8, seed=5, progress=False)
    sa, sb = models.score_next_items(a, seqs), models.score_next_items(b, seqs)
    np.testing.assert_array_equal(sa, sb)
    c = models.make_item_gpt(12, max_len=10, n_embd=16, n_head=2, seed=4)
    assert not np.allclose(models.score_next_items(c, seqs), sa)


def test_score_uses_only_the_last_max_len_items_and_ignores_padding():
    model = models.make_item_gpt(30, max_len=8, n_embd=16, n_head=2, dropout=0.0, seed=0)
    long = np.arange(20) % 30
    short = np.array([3, 4])
    both = models.score_next_items(model, [long, short])
    alone_long = models.score_next_items(model, [long[-8:]])
    alone_short = models.score_next_items(model, [short])
    np.testing.assert_allclose(both[0], alone_long[0], atol=1e-5)
    np.testing.assert_allclose(both[1], alone_short[0], atol=1e-5)  # padding changes nothing


def test_next_item_loss_matches_a_plain_loop():
    torch.manual_seed(0)
    model = models.make_item_gpt(10, max_len=6, n_embd=16, n_head=2, dropout=0.0, seed=1)
    seqs = [np.array([1, 2, 3, 4]), np.array([5, 6])]
    tokens, mask = models.pad_batch(seqs, 6)
    loss = models.next_item_loss(model, tokens, mask)
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
    seq = models.user_sequences(r, seed=0)
    assert seq.users.tolist() == [1, 2, 3]
    ids = [seq.item_ids[s].tolist() for s in seq.sequences]
    assert ids[0][0] == 20 and ids[0][-1] == 10  # times 1 ... 5
    assert sorted(ids[0][1:4]) == [30, 40, 50]  # the three ratings of second 3, in some order
    shuffled = models.user_sequences(r.sample(frac=1, random_state=7), seed=0)
    for a, b in zip(seq.sequences, shuffled.sequences):
        np.testing.assert_array_equal(a, b)
    # ties are broken by the seed, not by item id, for at least one seed
    orders = {tuple(models.user_sequences(r, seed=s).sequences[0][1:4]) for s in range(20)}
    assert len(orders) > 1


def test_user_sequences_drop_items_outside_the_vocabulary():
    r = _ratings()
    vocab = models.build_item_vocab(r, min_count=2)
    assert vocab.tolist() == [10, 20]
    seq = models.user_sequences(r, vocab, users=[3, 1])
    assert seq.users.tolist() == [3, 1]
    assert [seq.item_ids[s].tolist() for s in seq.sequences] == [[20], [20, 10]]
    with pytest.raises(ValueError, match="users not in ratings"):
        models.user_sequences(r, vocab, users=[99])
    with pytest.raises(ValueError, match="sorted"):
        models.user_sequences(r, item_ids=[20, 10])
    with pytest.raises(ValueError, match="timestamp"):
        models.user_sequences(r.drop(columns="timestamp"))


def test_leave_last_out_has_no_leakage_and_splits_users_cleanly():
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(50)[: rng.integers(2, 30)] for _ in range(40)]
    hist, targets, owner = models.leave_last_out(seqs, n_last=5)
    for h, t, o in zip(hist, targets, owner):
        s = seqs[o]
        assert t not in h  # MovieLens has one rating per user-item pair, so no repeats
        pos = len(h)
        np.testing.assert_array_equal(h, s[:pos])  # the history is exactly the past
        assert s[pos] == t
    counts = np.bincount(owner, minlength=len(seqs))
    assert (counts == np.minimum(5, np.array([len(s) for s in seqs]) - 1)).all()
    one_h, one_t, one_o = models.leave_last_out(seqs)
    assert (one_t == np.array([s[-1] for s in seqs])).all()
    with pytest.raises(ValueError, match="at least 2 items"):
        models.leave_last_out([np.array([1])])


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
    vocab = models.build_item_vocab(split.train, min_count=1)
    seq = models.user_sequences(r, vocab)
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
        np.testing.assert_array_equal(models.cooccurrence_counts(seqs, n_items, window=window), ref)
    counts = models.cooccurrence_counts(seqs, n_items, window=2)
    hist = [np.array([0, 3, 5]), np.array([2])]
    sc = models.cooccurrence_scores(counts, hist, last=2)
    np.testing.assert_allclose(sc[0], counts[3] + counts[5])
    np.testing.assert_allclose(sc[1], counts[2])
    np.testing.assert_allclose(models.cooccurrence_scores(counts, hist)[0], counts[[0, 3, 5]].sum(0))
    pop = models.popularity_scores(seqs, n_items)
    assert pop.sum() == sum(len(s) for s in seqs)
    tie = models.cooccurrence_scores(np.zeros((n_items, n_items)), hist, popularity=pop)
    assert tie[0].argmax() == pop.argmax()


def test_sampled_negatives_exclude_history_and_target():
    rng = np.random.default_rng(2)
    n_items = 300
    hist = [rng.permutation(n_items)[: rng.integers(1, 150)] for _ in range(30)]
    targets = np.array([rng.choice(np.setdiff1d(np.arange(n_items), h)) for h in hist])
    neg = models.sample_negatives(hist, targets, n_items, n_negatives=100, seed=0)
    assert neg.shape == (30, 100)
    for h, t, ng in zip(hist, targets, neg):
        assert len(set(ng.tolist())) == 100
        assert not set(ng.tolist()) & set(h.tolist())
        assert t not in ng
    np.testing.assert_array_equal(neg, models.sample_negatives(hist, targets, n_items, 100, seed=0))
    assert not np.array_equal(neg, models.sample_negatives(hist, targets, n_items, 100, seed=1))
    with pytest.raises(ValueError, match="cannot sample"):
        models.sample_negatives([np.arange(250)], [260], n_items, n_negatives=100)


def test_evaluate_next_item_matches_hand_computation():
    n_items = 6
    scores = np.array([[0.9, 0.8, 0.1, 0.5, 0.3, 0.2],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    hist = [np.array([0]), np.array([5, 4])]
    targets = np.array([3, 0])
    res = models.evaluate_next_item(scores, hist, targets, k=2, n_negatives=3, seed=0)
    # user 0: item 0 excluded -> ranking 1, 3, 4, 5, 2 -> target 3 at rank 2
    assert res["full_hr"][0] == 1.0 and res["full_ndcg"][0] == pytest.approx(1 / np.log2(3))
    # user 1: items 5, 4 excluded -> ranking 3, 2, 1, 0 -> target 0 at rank 4
    assert res["full_hr"][1] == 0.0 and res["full_ndcg"][1] == 0.0
    neg = models.sample_negatives(hist, targets, n_items, 3, seed=0)
    for r in range(2):
        rank = metrics.rank_of(scores[r, targets[r]], scores[r, neg[r]])
        assert res["sampled_rank"][r] == rank
        assert res["sampled_hr"][r] == float(rank <= 2)


def test_evaluate_rejects_leaky_or_malformed_input():
    scores = np.zeros((1, 5))
    with pytest.raises(ValueError, match="leakage"):
        models.evaluate_next_item(scores, [np.array([1, 2])], [2])
    with pytest.raises(ValueError, match="rows"):
        models.evaluate_next_item(scores, [np.array([1]), np.array([2])], [3, 4])
    with pytest.raises(ValueError, match="outside"):
        models.evaluate_next_item(scores, [np.array([9])], [3])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible"):
        models.make_item_gpt(10, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_items"):
        models.make_item_gpt(0)
    model = models.make_item_gpt(10, max_len=8, n_embd=16, n_head=2)
    with pytest.raises(ValueError, match="outside"):
        models.score_next_items(model, [np.array([10])])
    with pytest.raises(ValueError, match="at least 1"):
        models.score_next_items(model, [np.array([], dtype=np.int64)])
    with pytest.raises(TypeError, match="integer"):
        models.score_next_items(model, [np.array([1.5])])
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        models.train_item_gpt(torch.nn.Linear(2, 2), [np.array([1, 2])])
    with pytest.raises(ValueError, match="patience needs"):
        models.train_item_gpt(model, [np.array([1, 2])], patience=2)
    with pytest.raises(ValueError, match="nothing to learn"):
        models.train_item_gpt(model, [np.array([1])], progress=False)
    with pytest.raises(TypeError, match="DataFrame"):
        models.user_sequences({"user_id": [1]})
    with pytest.raises(ValueError, match="min_count"):
        models.build_item_vocab(_ratings(), min_count=100)


def test_training_windows_cover_every_transition_once():
    seqs = [np.arange(23), np.arange(5), np.arange(1)]
    wins = models.training_windows(seqs, max_len=6)
    assert all(2 <= len(w) <= 6 for w in wins)
    pairs = [(int(w[t]), int(w[t + 1])) for w in wins for t in range(len(w) - 1)]
    expected = [(int(s[t]), int(s[t + 1])) for s in seqs for t in range(len(s) - 1)]
    assert sorted(pairs) == sorted(expected)


def test_cooccurrence_embeddings_give_the_best_low_rank_approximation():
    rng = np.random.default_rng(3)
    n_items, dim = 30, 5
    seqs = [rng.integers(0, n_items, size=20) for _ in range(40)]
    counts = models.cooccurrence_counts(seqs, n_items, window=3)
    vec = models.cooccurrence_embeddings(counts, dim, seed=0)
    assert vec.shape == (n_items, dim) and vec.dtype == np.float64
    sym = np.log1p(counts + counts.T)
    u, s, _ = np.linalg.svd(sym)
    exact = (u[:, :dim] * s[:dim]) @ u[:, :dim].T
    np.testing.assert_allclose(vec @ vec.T, exact, atol=1e-2 * np.abs(exact).max())
    np.testing.assert_array_equal(vec, models.cooccurrence_embeddings(counts, dim, seed=0))
    with pytest.raises(ValueError, match="smaller than n_items"):
        models.cooccurrence_embeddings(counts, n_items)
    with pytest.raises(ValueError, match="square"):
        models.cooccurrence_embeddings(counts[:3], 2)


def test_make_item_gpt_warm_start_sets_item_embeddings_only():
    rng = np.random.default_rng(0)
    vec = rng.normal(size=(12, 16)).astype(np.float64) * 5 + 1
    cold = models.make_item_gpt(12, max_len=8, n_embd=16, n_head=2, seed=0)
    warm = models.make_item_gpt(12, max_len=8, n_embd=16, n_head=2, seed=0, item_vectors=vec)
    w = warm.transformer.wte.weight.detach().numpy()
    np.testing.assert_array_equal(w[0], cold.transformer.wte.weight.detach().numpy()[0])  # padding row untouched
    centred = vec - vec.mean()
    np.testing.assert_allclose(w[1:], centred * (0.02 / centred.std(ddof=1)), rtol=1e-4, atol=1e-7)
    assert warm.lm_head.weight.data_ptr() == warm.transformer.wte.weight.data_ptr()  # still tied
    with pytest.raises(ValueError, match="shape"):
        models.make_item_gpt(12, max_len=8, n_embd=16, n_head=2, item_vectors=vec[:, :8])


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
    kw = dict(max_len=10, n_embd=16, n_head=2, dropout=0.0, seed=0)
    model = models.make_item_gpt(n_items, **kw)
    log = models.train_item_gpt(model, train_seqs, epochs=12, batch_size=32, lr=1e-2, seed=0,
                                val=val, patience=2, progress=False)
    n_run = len(log.losses)
    assert len(log.val_ndcg) == n_run
    assert log.best_epoch == int(np.argmax(log.val_ndcg)) + 1
    assert log.best_epoch < n_run <= 12 and n_run == log.best_epoch + 2  # stopped after `patience` bad epochs
    # the returned weights are the best epoch's: they reproduce its validation nDCG exactly ...
    res = models.evaluate_next_item(models.score_next_items(model, val[0]), val[0], val[1], n_negatives=None)
    assert float(res["full_ndcg"].mean()) == pytest.approx(log.val_ndcg[log.best_epoch - 1], abs=1e-12)
    # ... and not the last epoch's. The same training without validation data follows the same
    # trajectory (identical losses): the validation users only choose the epoch.
    plain = models.make_item_gpt(n_items, **kw)
    plain_log = models.train_item_gpt(plain, train_seqs, epochs=n_run, batch_size=32, lr=1e-2, seed=0, progress=False)
    assert plain_log.losses == log.losses
    res_last = models.evaluate_next_item(models.score_next_items(plain, val[0]), val[0], val[1], n_negatives=None)
    assert float(res_last["full_ndcg"].mean()) == pytest.approx(log.val_ndcg[-1], abs=1e-12)
    assert float(res_last["full_ndcg"].mean()) < log.val_ndcg[log.best_epoch - 1]


def test_ensemble_scores_are_the_mean_of_member_log_probabilities():
    a = models.make_item_gpt(15, max_len=8, n_embd=16, n_head=2, seed=0)
    b = models.make_item_gpt(15, max_len=8, n_embd=16, n_head=2, seed=1)
    hist = [np.array([1, 2, 3]), np.array([7]), np.arange(12) % 15]
    ens = models.score_next_items([a, b], hist)
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
    one, alone = models.score_next_items([a], hist), models.score_next_items(a, hist)
    np.testing.assert_allclose(one - one[:, :1], alone - alone[:, :1], atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        models.score_next_items([], hist)
    with pytest.raises(ValueError, match="twice"):
        models.score_next_items([a, a], hist)
    with pytest.raises(ValueError, match="vocabulary"):
        models.score_next_items([a, models.make_item_gpt(16, max_len=8, n_embd=16, n_head=2)], hist)


def test_ensemble_training_in_lockstep():
    n_items = 40
    train_seqs = interleaved_cycles(200, 10, n_items, seed=0)
    val = _adversarial_val(n_items, seed=5)
    kw = dict(max_len=10, n_embd=16, n_head=2, dropout=0.0, seed=0)
    # a list of one model trains exactly like the model itself
    kw_drop = {**kw, "dropout": 0.1}  # dropout on: the dropout masks must match too
    single, listed = models.make_item_gpt(n_items, **kw_drop), models.make_item_gpt(n_items, **kw_drop)
    models.train_item_gpt(single, train_seqs, epochs=2, batch_size=32, lr=1e-2, seed=3, progress=False)
    models.train_item_gpt([listed], train_seqs, epochs=2, batch_size=32, lr=1e-2, seed=3, progress=False)
    np.testing.assert_array_equal(models.score_next_items(single, val[0]), models.score_next_items(listed, val[0]))
    # two members: early stopping keeps the ensemble's best epoch for both members
    pair = [models.make_item_gpt(n_items, **{**kw, "seed": s}) for s in (0, 1)]
    log = models.train_item_gpt(pair, train_seqs, epochs=8, batch_size=32, lr=1e-2, seed=0,
                                val=val, patience=2, progress=False)
    assert log.best_epoch < len(log.losses)
    res = models.evaluate_next_item(models.score_next_items(pair, val[0]), val[0], val[1], n_negatives=None)
    assert float(res["full_ndcg"].mean()) == pytest.approx(log.val_ndcg[log.best_epoch - 1], abs=1e-12)
    assert not np.allclose(models.score_next_items(pair[0], val[0]), models.score_next_items(pair[1], val[0]))
    with pytest.raises(ValueError, match="context length"):
        models.train_item_gpt([pair[0], models.make_item_gpt(n_items, max_len=9, n_embd=16, n_head=2)], train_seqs,
                              epochs=1, progress=False)
