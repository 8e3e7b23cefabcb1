"""Tests of mrec_utils.gpt_meta (chapter 8): heads on LM features, GPT user vectors, MetaEmb."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import gpt_meta as gm
from mrec_utils import gpt as item_gpt
from mrec_utils import meta
from mrec_utils.tasks import Episode


# ----------------------------------------------------------------------------- helpers


def _episodes(n_users=5, n_items=30, k=6, q=8, seed=0):
    rng = np.random.default_rng(seed)
    eps = []
    for u in range(n_users):
        items = rng.choice(n_items, size=k + q, replace=False).astype(np.int64) + 100
        r = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], size=k + q).astype(np.float64)
        r[0], r[1], r[k], r[k + 1] = 5.0, 1.0, 5.0, 2.0  # both classes in support and query
        z = np.zeros(k + q)
        eps.append(Episode(u, items[:k], r[:k], z[:k], items[k:], r[k:], z[k:]))
    return eps


def _features(n_items=30, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_items, d)).astype(np.float64), np.arange(n_items, dtype=np.int64) + 100


@pytest.fixture
def gpt():
    model = item_gpt.make_item_gpt(12, item_gpt.ItemGPTSettings(max_len=8, n_embd=16, n_layer=1, n_head=2, dropout=0.0), seed=0)
    model.eval()
    return gm.use_eager_attention(model)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- part 1


def test_lm_item_features_centred_scaled_and_validated():
    e = np.random.default_rng(0).normal(size=(40, 10)) + 5.0
    f = gm.lm_item_features(e, n_components=4)
    assert f.shape == (40, 4) and f.dtype == np.float64
    np.testing.assert_allclose(f.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose((f.astype(np.float64) ** 2).sum(1).mean(), 4.0, rtol=1e-4)
    # principal axes: the first component has the largest variance
    assert f[:, 0].var() >= f[:, 1].var() >= f[:, 3].var()
    np.testing.assert_array_equal(f, gm.lm_item_features(e, n_components=4))
    with pytest.raises(ValueError, match="n_components"):
        gm.lm_item_features(e, n_components=11)
    with pytest.raises(ValueError, match="NaN"):
        gm.lm_item_features(np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match="2-D"):
        gm.lm_item_features(np.ones(5))


def test_like_tasks_shapes_labels_and_bad_items():
    feats, ids = _features()
    eps = _episodes()
    t = gm.like_tasks(eps, feats, ids)
    assert t.x_support.shape == (5, 6, 8) and t.x_query.shape == (5, 8, 8)
    np.testing.assert_array_equal(t.y_support.numpy(), (np.stack([e.support_ratings for e in eps]) >= 4).astype(np.float64))
    np.testing.assert_allclose(t.x_query[2, 3].numpy(), feats[eps[2].query_items[3] - 100])
    assert t.mask_support.all() and len(t) == 5
    bad = _episodes(1)
    bad[0].support_items[0] = 9999
    with pytest.raises(ValueError, match="without features"):
        gm.like_tasks(bad, feats, ids)
    with pytest.raises(ValueError, match="empty"):
        gm.like_tasks([], feats, ids)


def test_sample_like_batch_respects_pools_and_masks():
    feats, ids = _features()
    df = pd.DataFrame({"user_id": np.repeat([1, 2, 3], 10), "item_id": np.tile(ids[:10], 3),
                       "rating": np.tile(np.arange(10) % 5 + 1.0, 3)})
    pools = gm.rating_pools(df, ids)
    b = gm.sample_like_batch(pools, torch.from_numpy(feats), 6, (4, 16), 5, np.random.default_rng(0))
    s = b.mask_support.sum(1).numpy()
    q = b.mask_query.sum(1).numpy()
    assert set(s.tolist()) <= {4, 9} and (q >= 1).all() and (s + q <= 10).all()
    assert b.x_support.shape == (6, 16, 8)
    assert torch.all(b.y_support[~b.mask_support] == 0)


def test_logreg_scratch_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    feats, ids = _features()
    t = gm.like_tasks(_episodes(3), feats, ids)
    got = gm.logreg_scratch(t, l2=0.7, iters=30)
    for i in range(3):
        clf = LogisticRegression(C=1 / 0.7, tol=1e-10, max_iter=10_000).fit(t.x_support[i].numpy(), t.y_support[i].numpy())
        np.testing.assert_allclose(got[i].numpy(), clf.decision_function(t.x_query[i].numpy()), rtol=1e-3, atol=1e-3)


def test_adapt_and_score_matches_a_plain_loop():
    feats, ids = _features()
    t = gm.like_tasks(_episodes(4), feats, ids)
    model = gm.UserHead(8, d_proj=5, seed=1)
    torch.testing.assert_close(gm.adapt_and_score(model, t, steps=0), model(t.x_query).detach())
    got = gm.adapt_and_score(model, t, adapt=["head"], steps=2, inner_lr=0.5)
    params, frozen = meta.split_params(model, ["head"])
    for i in range(4):
        p = meta.inner_adapt(model, params, frozen, t.x_support[i], t.y_support[i], loss_fn=meta.bce_loss_per_example, steps=2, inner_lr=0.5)
        torch.testing.assert_close(got[i], meta.functional_forward(model, p, frozen, t.x_query[i]).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, model(t.x_query).detach())


@pytest.mark.parametrize("method", ["maml", "fomaml", "anil", "reptile"])
def test_meta_train_head_changes_what_it_should(method):
    feats, ids = _features()
    df = pd.DataFrame({"user_id": np.repeat(np.arange(6), 12), "item_id": np.tile(ids[:12], 6),
                       "rating": np.random.default_rng(0).choice([1.0, 5.0], size=72)})
    pools = gm.rating_pools(df, ids)
    model = gm.UserHead(8, d_proj=4, seed=0)
    before = _state(model)
    gm.meta_train_head(model, pools, torch.from_numpy(feats), method, meta_steps=3, n_tasks=4, k_choices=(3, 5), n_query=4)
    after = model.state_dict()
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["body.0.weight"], after["body.0.weight"])  # ANIL's body is meta-learned too


def test_protonet_scores_match_hand_computation():
    feats, ids = _features()
    t = gm.like_tasks(_episodes(2), feats, ids)
    model = gm.UserHead(8, d_proj=3, seed=0)
    s = gm.protonet_scores(model, t)
    f_s, f_q = model.features(t.x_support[0]).detach(), model.features(t.x_query[0]).detach()
    like = f_s[t.y_support[0] == 1].mean(0)
    dis = f_s[t.y_support[0] == 0].mean(0)
    want = -((f_q - like) ** 2).sum(1) + ((f_q - dis) ** 2).sum(1)
    torch.testing.assert_close(s[0], want, rtol=1e-5, atol=1e-5)


def test_evaluate_like_auc_matches_sklearn_and_handles_one_class():
    from sklearn.metrics import roc_auc_score

    feats, ids = _features()
    eps = _episodes(2)
    eps[1].query_ratings[:] = 5.0  # one class only
    t = gm.like_tasks(eps, feats, ids)
    s = torch.randn(t.y_query.shape, generator=torch.Generator().manual_seed(0))
    df = gm.evaluate_like(s, t)
    assert df["auc"].iloc[0] == pytest.approx(roc_auc_score(t.y_query[0].numpy(), s[0].numpy()))
    assert np.isnan(df["auc"].iloc[1]) and df["ndcg@10"].between(0, 1).all()
    with pytest.raises(ValueError, match="shape"):
        gm.evaluate_like(s[:, :3], t)


# ----------------------------------------------------------------------------- part 2


def test_gpt_hidden_with_zero_vector_is_the_pretrained_model(gpt):
    tok = torch.tensor([[1, 4, 6, 2], [3, 3, 8, 12]])
    want = gpt(input_ids=tok).logits[..., 1:]
    torch.testing.assert_close(gm.gpt_item_logits(gpt, gm.gpt_hidden(gpt, tok)), want)
    torch.testing.assert_close(gm.gpt_item_logits(gpt, gm.gpt_hidden(gpt, tok, torch.zeros(2, 16))), want)
    with pytest.raises(ValueError, match="user_vec"):
        gm.gpt_hidden(gpt, tok, torch.zeros(2, 5))
    with pytest.raises(TypeError, match="item GPT"):
        gm.gpt_hidden(torch.nn.Linear(2, 2), tok)


def test_only_the_user_vector_changes_per_user(gpt):
    tok = torch.tensor([[1, 4, 6, 2], [3, 3, 8, 12], [5, 7, 9, 10]])
    before = _state(gpt)
    u = gm.adapt_user_vectors(gpt, torch.zeros(16), tok, steps=3, lr=0.5)
    after = gpt.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical GPT
    assert u.shape == (3, 16) and not torch.allclose(u[0], u[1])
    # each user's row depends only on that user: adapting them alone gives the same vector
    for i in range(3):
        alone = gm.adapt_user_vectors(gpt, torch.zeros(16), tok[i : i + 1], steps=3, lr=0.5)
        torch.testing.assert_close(alone[0], u[i], rtol=1e-5, atol=1e-6)


def test_meta_gradient_second_order_vs_first_order(gpt):
    tok = torch.tensor([[1, 4, 6, 2], [3, 3, 8, 12]])
    tgt = torch.tensor([[5, 7], [0, 9]])
    tm = torch.ones_like(tgt, dtype=torch.bool)
    for p in gpt.parameters():
        p.requires_grad_(False)
    u0 = (0.3 * torch.randn(16, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    lr = 2.0

    def outer(u_init, first_order):
        u = gm.adapt_user_vectors(gpt, u_init, tok, steps=1, lr=lr, first_order=first_order)
        if first_order:
            u = u_init + (u - u_init).detach()
        return gm.target_loss(gpt, tok, u, tgt, tm).sum()

    (g2,) = torch.autograd.grad(outer(u0, False), u0)
    (g1,) = torch.autograd.grad(outer(u0, True), u0)
    # FOMAML: the gradient of the query loss at the adapted vectors
    u1 = gm.adapt_user_vectors(gpt, u0.detach(), tok, steps=1, lr=lr).requires_grad_(True)
    (gq,) = torch.autograd.grad(gm.target_loss(gpt, tok, u1, tgt, tm).sum(), u1)
    torch.testing.assert_close(g1, gq.sum(0))
    # second order: the exact derivative (central finite differences in float64)
    g64 = gpt.double()
    u64 = u0.detach().double()

    def f(v):
        with torch.no_grad():
            pass
        u = gm.adapt_user_vectors(g64, v, tok, steps=1, lr=lr)
        return float(gm.target_loss(g64, tok, u, tgt, tm).sum())

    fd = torch.zeros(16, dtype=torch.float64)
    for j in range(16):
        e = torch.zeros(16, dtype=torch.float64)
        e[j] = 1e-5
        fd[j] = (f(u64 + e) - f(u64 - e)) / 2e-5
    torch.testing.assert_close(g2.double(), fd, rtol=1e-3, atol=1e-4)
    assert (g2 - g1).norm() > 1e-3 * g2.norm()  # the Hessian term matters


def test_meta_train_user_vector_leaves_the_gpt_untouched(gpt):
    seqs = [np.random.default_rng(i).choice(12, size=9, replace=False) for i in range(6)]
    before = _state(gpt)
    flags = [p.requires_grad for p in gpt.parameters()]
    for method in ("maml", "fomaml", "reptile"):
        u0, log = gm.meta_train_user_vector(gpt, seqs, method, meta_steps=3, n_users=4, k_choices=(3,), n_targets=2)
        assert u0.shape == (16,) and not u0.requires_grad and len(log.losses) == 3
        assert u0.abs().sum() > 0
    assert all(torch.equal(before[k], gpt.state_dict()[k]) for k in before)
    assert flags == [p.requires_grad for p in gpt.parameters()]
    with pytest.raises(ValueError, match="method"):
        gm.meta_train_user_vector(gpt, seqs, "anil")


def test_gpt_user_tasks_targets_exclude_support():
    seqs = [np.array([0, 1, 2, 1, 3, 4]), np.array([5, 6])]
    t = gm.gpt_user_tasks(seqs, k=3, n_targets=5)
    assert len(t) == 1 and t.owner.tolist() == [0]
    assert t.tokens.tolist() == [[1, 2, 3]] and t.targets[0][t.target_mask[0]].tolist() == [3, 4]
    with pytest.raises(ValueError, match="lower k"):
        gm.gpt_user_tasks(seqs, k=10)


# ----------------------------------------------------------------------------- part 3


def test_generator_shape_zero_start_and_bad_input():
    g = gm.EmbeddingGenerator(8, 16, hidden=6)
    out = g(torch.randn(5, 8))
    assert out.shape == (5, 16) and torch.all(out == 0)
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        g(torch.randn(5, 7))
    with pytest.raises(ValueError, match="NaN"):
        g(torch.full((2, 8), float("nan")))
    with pytest.raises(ValueError):
        gm.EmbeddingGenerator(0, 16)


def test_metaemb_loss_gradient_flows_through_the_warm_up_step():
    torch.manual_seed(0)
    g = gm.EmbeddingGenerator(4, 3, hidden=5).double()
    torch.nn.init.normal_(g.net[2].weight, std=0.5)
    x = torch.randn(2, 4, dtype=torch.float64)
    h_a, h_b = torch.randn(2, 3, 3, dtype=torch.float64), torch.randn(2, 3, 3, dtype=torch.float64)
    z_a, z_b = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    m = torch.ones(2, 3, dtype=torch.bool)
    kw = dict(warm_lr=0.7, alpha=0.2)
    loss, la, lb = gm.metaemb_loss(g, x, h_a, z_a, m, h_b, z_b, m, **kw)
    # value: alpha * L_a + (1 - alpha) * L_b with L_b after one manual gradient step
    e0 = g(x).detach().requires_grad_(True)
    ce = lambda e, h, z: (torch.logaddexp((h * e[:, None]).sum(-1), z) - (h * e[:, None]).sum(-1)).mean(1)  # noqa: E731
    (ge,) = torch.autograd.grad(ce(e0, h_a, z_a).sum(), e0)
    want_b = ce(e0 - 0.7 * ge, h_b, z_b).mean()
    assert float(lb.detach()) == pytest.approx(float(want_b.detach()))
    assert float(loss.detach()) == pytest.approx(0.2 * float(la.detach()) + 0.8 * float(want_b.detach()))
    # gradient w.r.t. the generator: second order matches finite differences, first order differs
    w = g.net[2].weight
    (g2,) = torch.autograd.grad(loss, w)
    (g1,) = torch.autograd.grad(gm.metaemb_loss(g, x, h_a, z_a, m, h_b, z_b, m, first_order=True, **kw)[0], w)
    fd = torch.zeros_like(w)
    for idx in np.ndindex(*w.shape):
        with torch.no_grad():
            w[idx] += 1e-6
        up = float(gm.metaemb_loss(g, x, h_a, z_a, m, h_b, z_b, m, **kw)[0].detach())
        with torch.no_grad():
            w[idx] -= 2e-6
        down = float(gm.metaemb_loss(g, x, h_a, z_a, m, h_b, z_b, m, **kw)[0].detach())
        with torch.no_grad():
            w[idx] += 1e-6
        fd[idx] = (up - down) / 2e-6
    torch.testing.assert_close(g2, fd, rtol=1e-4, atol=1e-6)
    assert (g2 - g1).abs().max() > 1e-4
    with pytest.raises(ValueError, match="alpha"):
        gm.metaemb_loss(g, x, h_a, z_a, m, h_b, z_b, m, warm_lr=0.1, alpha=1.5)


def test_item_events_and_log_z_rest(gpt):
    # vocabulary V = 14 items: 12 GPT items (V 0..11 -> GPT 0..11) and 2 targets (V 12, 13)
    is_target = np.zeros(14, dtype=bool)
    is_target[[12, 13]] = True
    index_map = np.r_[np.arange(12), [0, 1]]
    seqs = [np.array([0, 12, 3, 4, 5, 13, 6]), np.array([7, 8, 9, 12])]
    ev = gm.item_events(gpt, seqs, is_target, index_map, min_history=3)
    assert ev.item.tolist() == [1, 0] and ev.user.tolist() == [0, 1]  # first 12 is skipped: history too short
    h0 = gm.gpt_hidden(gpt, torch.tensor([[1, 4, 5, 6]]))[0, -1]  # history 0, 3, 4, 5 (target 12 removed)
    torch.testing.assert_close(ev.hidden[0], h0.detach())
    table = gpt.transformer.wte.weight[1:].detach()
    torch.testing.assert_close(ev.log_z_rest[0], torch.logsumexp(h0.detach() @ table.T, 0))
    # warm items treated as new: leave the own row out
    ev2 = gm.item_events(gpt, seqs, np.r_[np.zeros(12, bool), [False, False]] | (np.arange(14) == 5), index_map, exclude_own=True)
    s = ev2.hidden[0] @ table.T
    torch.testing.assert_close(ev2.log_z_rest[0], torch.logsumexp(torch.cat([s[:5], s[6:]]), 0), rtol=1e-5, atol=1e-5)


def test_warm_up_and_new_item_metrics():
    torch.manual_seed(0)
    h = torch.randn(6, 4)
    ev = gm.ItemEvents(h, torch.tensor([0, 0, 1, 1, 2, 2]), torch.zeros(6), np.arange(6))
    idx = ev.of_items(3, 2, first=True)
    assert idx.tolist() == [[0, 1], [2, 3], [4, 5]]
    e0 = torch.zeros(3, 4)
    e1 = gm.warm_up_embeddings(e0, ev, idx, steps=1, lr=1.0)
    # d/de mean_j CE at e = 0: CE = log(1 + exp(0)) - h.e -> grad = (sigmoid(0) - 1) h = -h/2
    want = torch.stack([h[[0, 1]].mean(0), h[[2, 3]].mean(0), h[[4, 5]].mean(0)]) / 2
    torch.testing.assert_close(e1, want)
    assert torch.equal(gm.warm_up_embeddings(e0, ev, idx, steps=0, lr=1.0), e0)
    df = gm.new_item_metrics(ev, torch.eye(3, 4) * 0, k=1)
    assert set(df.columns) >= {"hr@1_new", "ndcg@1_new"}


def test_negative_events_give_the_full_softmax_change():
    # One new row e competes in other events' softmax: their CE grows by softplus(h.e - log Z_all).
    torch.manual_seed(0)
    table = torch.randn(5, 3, dtype=torch.float64)                 # warm rows
    h_pos, h_neg = torch.randn(1, 4, 3, dtype=torch.float64), torch.randn(1, 6, 3, dtype=torch.float64)
    t_neg = torch.randint(0, 5, (6,))
    e = torch.randn(1, 3, dtype=torch.float64)
    z_rest = torch.logsumexp(h_pos[0] @ table.T, 1)[None]          # the new row is not in the table
    z_all = torch.logsumexp(h_neg[0] @ table.T, 1)[None]
    got = gm._event_ce(e, h_pos, z_rest, torch.ones(1, 4, dtype=torch.bool), (h_neg, z_all), neg_weight=1.0)
    full = torch.cat([table, e])                                    # brute force: softmax over 6 rows
    pos = torch.nn.functional.cross_entropy(h_pos[0] @ full.T, torch.full((4,), 5)).mean()
    neg_new = torch.nn.functional.cross_entropy(h_neg[0] @ full.T, t_neg, reduction="none")
    neg_old = torch.nn.functional.cross_entropy(h_neg[0] @ table.T, t_neg, reduction="none")
    torch.testing.assert_close(got[0], pos + (neg_new - neg_old).mean())
    # without negatives a huge row along the common direction of the hidden states drives the
    # positive loss to ~0 (hidden states of a trained GPT share such a direction) ...
    h_pos = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64) + 0.1 * torch.randn(1, 4, 3, dtype=torch.float64)
    z_rest = torch.logsumexp(h_pos[0] @ table.T, 1)[None]
    big = 100 * h_pos[0].mean(0, keepdim=True)
    assert gm._event_ce(big, h_pos, z_rest, torch.ones(1, 4, dtype=torch.bool))[0] < 1e-3
    # ... and the negatives forbid it
    assert gm._event_ce(big, h_pos, z_rest, torch.ones(1, 4, dtype=torch.bool), (h_pos, z_rest), 1.0)[0] > 1.0


def test_gpt_meta_cli_and_runner_validate_input():
    from mrec_utils import benchmark

    args = benchmark.build_parser().parse_args(["gpt-meta", "--k", "8", "16", "--methods", "global", "maml"])
    assert args.k == [8, 16] and args.methods == ["global", "maml"] and args.func.__name__ == "_run_gpt_meta"
    feats, ids = _features()
    df = pd.DataFrame({"user_id": [1], "item_id": [100], "rating": [4.0], "timestamp": [0]})
    with pytest.raises(ValueError, match="unknown method"):
        gm.head_benchmark(df, feats, ids, methods=["gpt5"])
    with pytest.raises(ValueError, match="rows"):
        gm.head_benchmark(df, feats, ids[:3])


# ----------------------------------------------------------------------------- residual head (Meta-SGD)


def _pools(feats, ids, n_users=6, n_items=12, seed=0):
    df = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), n_items), "item_id": np.tile(ids[:n_items], n_users),
                       "rating": np.random.default_rng(seed).choice([1.0, 5.0], size=n_users * n_items)})
    return gm.rating_pools(df, ids)


def test_residual_head_is_global_plus_linear_term_and_validates():
    feats, ids = _features()
    base = gm.UserHead(8, d_proj=5, seed=1)
    res = gm.ResidualUserHead(base)
    x = torch.from_numpy(feats[:7])
    torch.testing.assert_close(res(x), base(x))  # user = 0: exactly the global head
    with torch.no_grad():
        res.user_w.copy_(torch.arange(8.0) / 10)
    torch.testing.assert_close(res(x), base(x) + x @ (torch.arange(8.0) / 10))
    assert all(not p.requires_grad for p in res.base.parameters())
    assert [n for n, p in res.named_parameters() if p.requires_grad] == ["user_w", "user_b"]
    with pytest.raises(TypeError, match="UserHead"):
        gm.ResidualUserHead(torch.nn.Linear(8, 1))
    with pytest.raises(ValueError, match="feature size"):
        res(torch.zeros(3, 5))


def test_adapt_and_score_with_meta_sgd_rates_matches_the_closed_form_gradient():
    feats, ids = _features()
    t = gm.like_tasks(_episodes(3), feats, ids)
    res = gm.ResidualUserHead(gm.UserHead(8, d_proj=5, seed=2))
    alpha, beta = torch.linspace(0.1, 0.8, 8), torch.tensor(0.3)
    adapt = list(gm.ResidualUserHead.ADAPT)
    got = gm.adapt_and_score(res, t, adapt=adapt, steps=2, lrs={"user_w": alpha, "user_b": beta})
    for i in range(3):
        x, y, xq = t.x_support[i], t.y_support[i], t.x_query[i]
        g0 = res.base(x).detach()
        u, c = torch.zeros(8), torch.tensor(0.0)
        for _ in range(2):  # BCE mean over the support: grad_u = X^T (sigmoid(s) - y) / n, grad_b = mean(sigmoid(s) - y)
            r = torch.sigmoid(g0 + x @ u + c) - y
            u, c = u - alpha * (x.T @ r) / len(y), c - beta * r.mean()
        torch.testing.assert_close(got[i], res.base(xq).detach() + xq @ u + c, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keys"):
        gm.adapt_and_score(res, t, adapt=adapt, steps=1, lrs={"user_w": alpha})


def test_meta_sgd_meta_gradient_matches_finite_differences():
    feats, ids = _features()
    res = gm.ResidualUserHead(gm.UserHead(8, d_proj=5, seed=3)).double()
    with torch.no_grad():
        res.user_w.normal_(0, 0.3)
        res.user_b.fill_(0.2)
    b = gm.sample_like_batch(_pools(feats, ids), torch.from_numpy(feats).double(), 4, (3, 5), 4, np.random.default_rng(0))
    params, frozen = meta.split_params(res, list(gm.ResidualUserHead.ADAPT))
    lrs = meta.init_meta_sgd_lrs(params, 0.4)
    wrt = [res.user_w, res.user_b, lrs["user_w"], lrs["user_b"]]

    def J(w, c, aw, ab):
        return meta.maml_loss(res, {"user_w": w, "user_b": c}, frozen, b, loss_fn=meta.bce_loss_per_example, steps=2,
                              inner_lr={"user_w": aw, "user_b": ab})

    grads = torch.autograd.grad(J(*wrt), wrt)
    eps = 1e-6
    for which, j in [(0, 0), (0, 5), (1, None), (2, 3), (3, None)]:
        e = torch.zeros_like(wrt[which])
        if j is None:
            e.fill_(eps)
        else:
            e[j] = eps
        plus = [v + e if i == which else v for i, v in enumerate(wrt)]
        minus = [v - e if i == which else v for i, v in enumerate(wrt)]
        with torch.no_grad():
            fd = (J(*plus) - J(*minus)) / (2 * eps)
        want = grads[which] if j is None else grads[which][j]
        assert abs(float(fd) - float(want)) < 1e-6, (which, j)
    assert grads[2].abs().sum() > 0  # the step sizes do receive a meta-gradient


def test_meta_train_residual_learns_init_and_rates_keeps_base_and_early_stops():
    feats, ids = _features()
    pools = _pools(feats, ids)
    base = gm.UserHead(8, d_proj=4, seed=0)
    res = gm.ResidualUserHead(base)
    base_before = _state(res.base)
    val = gm.like_tasks(_episodes(4), feats, ids)
    log, lrs = gm.meta_train_residual(res, pools, torch.from_numpy(feats), meta_steps=6, n_tasks=4, k_choices=(3, 5), n_query=4,
                                      init_lr=0.05, val_tasks=[val], eval_every=2)
    for k, v in res.base.state_dict().items():
        assert torch.equal(v, base_before[k])  # the global head inside is bit-identical
    assert torch.equal(base_before["head.weight"], base.state_dict()["head.weight"])  # and the original is untouched
    assert res.user_w.abs().sum() > 0 and not torch.allclose(lrs["user_w"], torch.full((8,), 0.05))
    assert [s for s, _ in log.checkpoints] == [2, 4, 6] and len(log.losses) == 6
    best = max(log.checkpoints, key=lambda c: c[1])
    assert log.best_step == best[0]
    now = np.nanmean(gm.evaluate_like(gm.adapt_and_score(res, val, adapt=list(gm.ResidualUserHead.ADAPT), steps=3, lrs=lrs), val).auc)
    assert abs(now - best[1]) < 1e-9  # the restored checkpoint is the best one
    with pytest.raises(TypeError, match="ResidualUserHead"):
        gm.meta_train_residual(base, pools, torch.from_numpy(feats), meta_steps=1)
    with pytest.raises(TypeError, match="val_tasks"):
        gm.meta_train_residual(res, pools, torch.from_numpy(feats), meta_steps=1, val_tasks=[1, 2])
    with pytest.raises(ValueError, match="meta_steps"):
        gm.meta_train_residual(res, pools, torch.from_numpy(feats), meta_steps=0)


def test_user_folds_partition_users():
    users = np.arange(100, 123)
    folds = gm.user_folds(users[::-1], n_folds=5, seed=3)
    assert len(folds) == 5 and sorted(len(f) for f in folds) == [4, 4, 5, 5, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate(folds)), users)
    assert all((np.diff(f) > 0).all() for f in folds)
    for a, b in zip(folds, gm.user_folds(users, n_folds=5, seed=3)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="n_folds"):
        gm.user_folds(users, n_folds=1)
    with pytest.raises(ValueError, match="exceeds"):
        gm.user_folds(users[:3], n_folds=4)
    with pytest.raises(ValueError, match="integer"):
        gm.user_folds(np.array([0.5, 1.5]))


def test_pairwise_query_loss_matches_a_loop_ignores_offsets_and_validates():
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.normal(size=(3, 7)))
    y = torch.from_numpy((rng.random((3, 7)) < 0.5).astype(np.float64))
    m = torch.from_numpy(rng.random((3, 7)) < 0.8)
    y[2] = 1.0  # one class only: no pair
    loss, ok = gm.pairwise_query_loss(s, y, m)
    for t in range(3):
        pairs = [(i, j) for i in range(7) for j in range(7) if m[t, i] and m[t, j] and y[t, i] == 1 and y[t, j] == 0]
        want = np.mean([np.log1p(np.exp(float(s[t, j] - s[t, i]))) for i, j in pairs]) if pairs else 0.0
        assert bool(ok[t]) == bool(pairs)
        assert abs(float(loss[t]) - want) < 1e-10
    shifted, _ = gm.pairwise_query_loss(s + torch.tensor([[5.0], [-2.0], [1.0]], dtype=torch.float64), y, m)
    torch.testing.assert_close(shifted, loss)
    with pytest.raises(ValueError, match="same shape"):
        gm.pairwise_query_loss(s, y[:, :3], m)


def test_meta_train_residual_pairwise_and_zero_start_options():
    feats, ids = _features()
    pools = _pools(feats, ids)
    res = gm.ResidualUserHead(gm.UserHead(8, d_proj=4, seed=0))
    log, lrs = gm.meta_train_residual(res, pools, torch.from_numpy(feats), meta_steps=3, n_tasks=4, k_choices=(3, 5), n_query=4,
                                      learn_init=False, per_coordinate=False, outer_loss="pairwise")
    assert torch.equal(res.user_w, torch.zeros(8)) and float(res.user_b.detach()) == 0.0  # the start stays at zero
    assert lrs["user_w"].shape == () and lrs["user_b"].shape == () and float(lrs["user_w"].detach()) != 0.01  # step sizes learned
    assert log.best_step is None and not log.checkpoints and len(log.losses) == 3
    with pytest.raises(ValueError, match="outer_loss"):
        gm.meta_train_residual(res, pools, torch.from_numpy(feats), meta_steps=1, outer_loss="auc")


# ----------------------------------------------------------------------------- K-fold over users


def _kfold_ratings(n_users=12, n_items=20, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        n = 14 if u % 3 else 8  # every third user is too short for k = 4 with 10 query ratings
        items = rng.choice(n_items, size=n, replace=False) + 100
        r = rng.choice([1.0, 2.0, 4.0, 5.0], size=n)
        r[:2] = [5.0, 1.0]
        rows += [(u, int(i), float(x), t) for t, (i, x) in enumerate(zip(items, r))]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_kfold_like_auc_tests_every_user_once_and_trains_without_them():
    from sklearn.metrics import roc_auc_score

    from mrec_utils.tasks import make_episodes

    feats, ids = _features(n_items=20)
    df = _kfold_ratings()
    seen = []

    def fit(pools, f):
        seen.append(sorted(len(p[0]) for p in pools))
        return {"col0": lambda t: t.x_query[..., 0], "neg": lambda t: -t.x_query[..., 0]}

    out = gm.kfold_like_auc(df, feats, ids, fit, ks=(4,), n_folds=3, n_episodes=2, exclude_users=[0], min_query=10, seed=5)
    assert len(seen) == 3
    folds = gm.user_folds(np.arange(1, 12), 3, seed=5)
    for f, fold in enumerate(folds):  # fit saw exactly the other folds' users (user 0 excluded everywhere)
        keep = df[~df.user_id.isin(np.concatenate([fold, [0]]))]
        assert seen[f] == sorted(keep.groupby("user_id").size().tolist())
    long_users = sorted(u for u in range(1, 12) if u % 3)
    for m in ("col0", "neg"):
        assert sorted(out[out.method == m].user_id) == long_users  # each eligible test user exactly once
    u = long_users[0]
    want = []
    for e in range(2):  # plain loop: the user's AUC averaged over the two episodes
        ep = make_episodes(df, np.array([u]), k_support=4, n_query=None, seed=5 + e)[0]
        y = (ep.query_ratings >= 4).astype(int)
        want.append(roc_auc_score(y, feats[ep.query_items - 100, 0]))
    got = out[(out.method == "col0") & (out.user_id == u)].auc.item()
    assert abs(got - np.mean(want)) < 1e-9
    both = out.pivot_table(index="user_id", columns="method", values="auc")
    np.testing.assert_allclose(both["col0"] + both["neg"], 1.0)  # reversed scores: AUC -> 1 - AUC
    with pytest.raises(TypeError, match="fit must"):
        gm.kfold_like_auc(df, feats, ids, "nope")
    with pytest.raises(TypeError, match="non-empty dict"):
        gm.kfold_like_auc(df, feats, ids, lambda p, f: [], ks=(4,), n_folds=2)
    with pytest.raises(ValueError, match="no test user"):
        gm.kfold_like_auc(df, feats, ids, fit, ks=(40,), n_folds=2)


def test_paired_summary_matches_paired_bootstrap():
    from mrec_utils import metrics

    rng = np.random.default_rng(1)
    a, b = rng.random(30), rng.random(30)
    a[3] = np.nan
    per = pd.concat([pd.DataFrame({"method": "ref", "k": 8, "user_id": np.arange(30), "auc": b}),
                     pd.DataFrame({"method": "new", "k": 8, "user_id": np.arange(30), "auc": a})])
    t = gm.paired_summary(per, "ref", seed=3)
    ok = ~np.isnan(a)
    d = metrics.paired_bootstrap_ci(a[ok], b[ok], seed=3)
    row = t.loc[("new", 8)]
    assert row["users"] == 29 and row["auc - ref"] == pytest.approx(d.estimate)
    assert (row["95% low"], row["95% high"]) == pytest.approx((d.low, d.high))
    assert row["beats ref"] == (d.low > 0) and row["auc"] == pytest.approx(a[ok].mean())
    assert t.loc[("ref", 8), "users"] == 30 and np.isnan(t.loc[("ref", 8), "95% low"])
    with pytest.raises(ValueError, match="reference"):
        gm.paired_summary(per, "global")
    with pytest.raises(TypeError, match="columns"):
        gm.paired_summary(per.drop(columns="auc"), "ref")


def test_head_benchmark_folds_option_is_validated_and_parsed():
    from mrec_utils import benchmark

    args = benchmark.build_parser().parse_args(["gpt-meta", "--folds", "5", "--methods", "global", "residual"])
    assert args.folds == 5 and args.methods == ["global", "residual"]
    assert "residual" in gm.HEAD_METHODS
    feats, ids = _features()
    df = pd.DataFrame({"user_id": [1], "item_id": [100], "rating": [4.0], "timestamp": [0]})
    with pytest.raises(ValueError, match="n_folds"):
        gm.head_benchmark(df, feats, ids, n_folds=1)


def test_fit_heads_choices_are_made_on_validation_and_reused_exactly():
    feats, ids = _features()
    pools = _pools(feats, ids)
    val = gm.like_tasks(_episodes(3), feats, ids)
    test = gm.like_tasks(_episodes(4), feats, ids)
    small = gm.HeadSettings(d_proj=4, global_steps=5, meta_steps=2, proto_steps=3, residual_steps=4, residual_eval_every=2,
                            logreg_l2s=(1.0, 10.0), finetune_grid=((1, 0.1), (2, 0.3)))
    f = torch.from_numpy(feats)
    fitted = gm.fit_heads(pools, f, [val], gm.HEAD_METHODS, small, seed=0)
    assert set(fitted.scorers) == set(gm.HEAD_METHODS)
    assert fitted.choices["logreg_l2"] in small.logreg_l2s and tuple(fitted.choices["finetune"]) in small.finetune_grid
    assert fitted.choices["residual_learn_init"] in (True, False)
    # the logistic-regression choice is the validation argmax, computed by hand
    by_hand = max(small.logreg_l2s, key=lambda v: float(np.nanmean(gm.evaluate_like(gm.logreg_scratch(val, l2=v), val).auc)))
    assert fitted.choices["logreg_l2"] == by_hand
    # given the choices, a second fit trains one residual candidate and scores the test tasks identically
    fixed = {k: fitted.choices[k] for k in ("logreg_l2", "finetune", "residual_learn_init")}
    again = gm.fit_heads(pools, f, [val], gm.HEAD_METHODS, small, choices=fixed, seed=0)
    for m in gm.HEAD_METHODS:
        torch.testing.assert_close(again.scorers[m](test), fitted.scorers[m](test), rtol=0, atol=0)
    # the meta-learners start from the global head, which is never modified by them
    torch.testing.assert_close(fitted.scorers["global"](test), gm.adapt_and_score(fitted.heads["global"], test, steps=0))
    with pytest.raises(ValueError, match="unknown method"):
        gm.fit_heads(pools, f, [val], ["global", "magic"], small)
    with pytest.raises(TypeError, match="LikeTasks"):
        gm.fit_heads(pools, f, [], ["global"], small)
