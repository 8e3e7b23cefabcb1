"""Tests of mrec_utils.metaemb (chapter 10): MetaEmb's generator, events, loss, warm-up and metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrec_utils import gpt as item_gpt
from mrec_utils import metaemb as ME


@pytest.fixture
def gpt():
    model = item_gpt.make_item_gpt(12, item_gpt.ItemGPTSettings(max_len=8, n_embd=16, n_layer=1, n_head=2, dropout=0.0), seed=0)
    return model.eval()


def test_generator_starts_every_new_item_at_the_origin():
    g = ME.EmbeddingGenerator(8, 16, hidden=6)
    out = g(torch.randn(5, 8))
    assert out.shape == (5, 16) and torch.all(out == 0)


def test_metaemb_loss_gradient_flows_through_the_warm_up_step():
    torch.manual_seed(0)
    g = ME.EmbeddingGenerator(4, 3, hidden=5)
    torch.nn.init.normal_(g.net[2].weight, std=0.5)
    x = torch.randn(2, 4)
    h_a, h_b = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    z_a, z_b = torch.randn(2, 3), torch.randn(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    a, b = ME.EventBatch(h_a, z_a, m), ME.EventBatch(h_b, z_b, m)
    kw = dict(warm_lr=0.7, alpha=0.2)
    loss, la, lb = ME.metaemb_loss(g, x, a, b, **kw)
    # value: alpha * L_a + (1 - alpha) * L_b with L_b after one manual gradient step
    e0 = g(x).detach().requires_grad_(True)
    ce = lambda e, h, z: (torch.logaddexp((h * e[:, None]).sum(-1), z) - (h * e[:, None]).sum(-1)).mean(1)  # noqa: E731
    (ge,) = torch.autograd.grad(ce(e0, h_a, z_a).sum(), e0)
    want_b = ce(e0 - 0.7 * ge, h_b, z_b).mean()
    assert float(lb) == pytest.approx(float(want_b.detach()), rel=1e-12)
    assert float(loss.detach()) == pytest.approx(0.2 * float(la) + 0.8 * float(want_b.detach()), rel=1e-12)
    # gradient w.r.t. the generator: second order matches finite differences, first order differs
    w = g.net[2].weight
    (g2,) = torch.autograd.grad(loss, w)
    (g1,) = torch.autograd.grad(ME.metaemb_loss(g, x, a, b, first_order=True, **kw)[0], w)
    fd = torch.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        with torch.no_grad():
            w[idx] += 1e-6
        up = float(ME.metaemb_loss(g, x, a, b, **kw)[0].detach())
        with torch.no_grad():
            w[idx] -= 2e-6
        down = float(ME.metaemb_loss(g, x, a, b, **kw)[0].detach())
        with torch.no_grad():
            w[idx] += 1e-6
        fd[idx] = (up - down) / 2e-6
    torch.testing.assert_close(g2, fd, rtol=1e-6, atol=1e-8)
    assert (g2 - g1).abs().max() > 1e-4


def test_item_events_and_log_z_rest(gpt):
    # vocabulary V = 14 items: 12 GPT items (V 0..11 -> GPT 0..11) and 2 targets (V 12, 13)
    is_target = np.zeros(14, dtype=bool)
    is_target[[12, 13]] = True
    index_map = np.r_[np.arange(12), [0, 1]]
    seqs = item_gpt.ItemSequences(np.arange(2), [np.array([0, 12, 3, 4, 5, 13, 6]), np.array([7, 8, 9, 12])], np.arange(14))
    ev = ME.item_events(gpt, seqs, is_target, index_map, min_history=3)
    assert ev.item.tolist() == [1, 0] and ev.user.tolist() == [0, 1]  # first 12 is skipped: history too short
    h0 = gpt.transformer(input_ids=torch.tensor([[1, 4, 5, 6]])).last_hidden_state[0, -1]  # history 0, 3, 4, 5
    torch.testing.assert_close(ev.hidden[0], h0.detach())
    table = gpt.transformer.wte.weight[1:].detach()
    torch.testing.assert_close(ev.log_z_rest[0], torch.logsumexp(h0.detach() @ table.T, 0))
    # warm items treated as new: leave the own row out
    ev2 = ME.item_events(gpt, seqs, np.arange(14) == 5, index_map, exclude_own=True)
    s = ev2.hidden[0] @ table.T
    torch.testing.assert_close(ev2.log_z_rest[0], torch.logsumexp(torch.cat([s[:5], s[6:]]), 0), rtol=1e-10, atol=1e-10)


def test_warm_up_and_new_item_metrics():
    torch.manual_seed(0)
    h = torch.randn(6, 4)
    ev = ME.ItemEvents(h, torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6), np.arange(6))
    idx = ev.of_items(3, 2, first=True)
    assert idx.tolist() == [[0, 1], [2, 3], [4, 5]]
    e0 = torch.zeros(3, 4)
    e1 = ME.warm_up_embeddings(e0, ev.batch(idx), steps=1, lr=1.0)
    # d/de mean_j CE at e = 0: CE = log(1 + exp(0)) - h.e -> grad = (sigmoid(0) - 1) h = -h/2
    want = torch.stack([h[[0, 1]].mean(0), h[[2, 3]].mean(0), h[[4, 5]].mean(0)]) / 2
    torch.testing.assert_close(e1, want)
    assert torch.equal(ME.warm_up_embeddings(e0, ev.batch(idx), steps=0, lr=1.0), e0)
    df = ME.new_item_metrics(ev, torch.eye(3, 4), k=1, warm_table=torch.zeros(2, 4))
    assert set(df.columns) >= {"hr@1_new", "ndcg@1_new", "hr@1_all", "ndcg@1_all"} and len(df) == 6


def test_negative_events_give_the_full_softmax_change():
    # One new row e competes in other events' softmax: their CE grows by softplus(h.e - log Z_all).
    torch.manual_seed(0)
    table = torch.randn(5, 3)                                       # warm rows
    h_pos, h_neg = torch.randn(1, 4, 3), torch.randn(1, 6, 3)
    t_neg = torch.randint(0, 5, (6,))
    e = torch.randn(1, 3)
    z_rest = torch.logsumexp(h_pos[0] @ table.T, 1)[None]           # the new row is not in the table
    z_all = torch.logsumexp(h_neg[0] @ table.T, 1)[None]
    mask = torch.ones(1, 4, dtype=torch.bool)
    got = ME.event_loss(e, ME.EventBatch(h_pos, z_rest, mask, (h_neg, z_all)), neg_weight=1.0)
    full = torch.cat([table, e])                                    # brute force: softmax over 6 rows
    pos = torch.nn.functional.cross_entropy(h_pos[0] @ full.T, torch.full((4,), 5)).mean()
    neg_new = torch.nn.functional.cross_entropy(h_neg[0] @ full.T, t_neg, reduction="none")
    neg_old = torch.nn.functional.cross_entropy(h_neg[0] @ table.T, t_neg, reduction="none")
    torch.testing.assert_close(got[0], pos + (neg_new - neg_old).mean())
    # without negatives a huge row along the common direction of the hidden states drives the
    # positive loss to ~0 (hidden states of a trained GPT share such a direction) ...
    h_pos = torch.tensor([[1.0, 0.5, 0.0]]) + 0.1 * torch.randn(1, 4, 3)
    z_rest = torch.logsumexp(h_pos[0] @ table.T, 1)[None]
    big = 100 * h_pos[0].mean(0, keepdim=True)
    assert ME.event_loss(big, ME.EventBatch(h_pos, z_rest, mask))[0] < 1e-3
    # ... and the negatives forbid it
    assert ME.event_loss(big, ME.EventBatch(h_pos, z_rest, mask, (h_pos, z_rest)), 1.0)[0] > 1.0


def test_train_metaemb_moves_the_generator_and_is_reproducible():
    torch.manual_seed(0)
    ev = ME.ItemEvents(torch.randn(40, 4), torch.arange(40) % 5, torch.randn(40), np.arange(40), torch.randn(40))
    feats = torch.randn(5, 3)
    s = ME.MetaEmbSettings(hidden=6, steps=4, n_items=3, per_item=2, n_neg=3)
    g1, g2 = ME.EmbeddingGenerator(3, 4, hidden=6, seed=1), ME.EmbeddingGenerator(3, 4, hidden=6, seed=1)
    log = ME.train_metaemb(g1, feats, ev, s, warm_lr=0.1, neg_weight=2.0, seed=7)
    ME.train_metaemb(g2, feats, ev, s, warm_lr=0.1, neg_weight=2.0, seed=7)
    assert len(log.losses) == 4 and g1(feats).abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(g1.parameters(), g2.parameters()))
