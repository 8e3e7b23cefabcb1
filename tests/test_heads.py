"""Tests of mrec_utils.heads (chapter 9): user heads on LM features, Meta-SGD residual head, K-fold over users."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import heads as H
from mrec_utils import meta, metrics
from mrec_utils.tasks import Episode, make_episodes


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


def _pools(feats, ids, n_users=6, n_items=12, seed=0):
    df = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), n_items), "item_id": np.tile(ids[:n_items], n_users),
                       "rating": np.random.default_rng(seed).choice([1.0, 5.0], size=n_users * n_items)})
    return H.rating_pools(df, ids)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- data and tasks


def test_catalogue_split_holds_out_one_film_in_five():
    df = pd.DataFrame({"user_id": np.arange(300) % 30, "item_id": np.repeat(np.arange(30), 10) + 7, "rating": 4.0})
    df = df[~((df.item_id == 7) & (df.user_id > 3))]  # film 7 has 4 ratings: not in the catalogue
    cat, is_new = H.catalogue_split(df, min_count=5, seed=1)
    np.testing.assert_array_equal(cat, np.arange(8, 37))
    assert is_new.sum() == len(cat) // 5
    np.testing.assert_array_equal(is_new, H.catalogue_split(df, min_count=5, seed=1)[1])


def test_lm_item_features_centred_scaled_and_validated():
    e = np.random.default_rng(0).normal(size=(40, 10)) + 5.0
    f = H.lm_item_features(e, n_components=4)
    assert f.shape == (40, 4) and f.dtype == np.float64
    np.testing.assert_allclose(f.mean(0), 0, atol=1e-10)
    np.testing.assert_allclose((f ** 2).sum(1).mean(), 4.0, rtol=1e-10)
    assert f[:, 0].var() >= f[:, 1].var() >= f[:, 3].var()  # principal axes: the first has the largest variance
    np.testing.assert_array_equal(f, H.lm_item_features(e, n_components=4))
    # fitted on some rows only: those rows are centred, the others are projected on the same axes
    g = H.lm_item_features(e, n_components=4, fit_rows=np.arange(20))
    np.testing.assert_allclose(g[:20].mean(0), 0, atol=1e-10)
    with pytest.raises(ValueError, match="n_components"):
        H.lm_item_features(e, n_components=11)


def test_like_tasks_shapes_ratings_likes_and_bad_items():
    feats, ids = _features()
    eps = _episodes()
    t = H.like_tasks(eps, feats, ids)
    assert t.x_support.shape == (5, 6, 8) and t.x_query.shape == (5, 8, 8) and len(t) == 5
    np.testing.assert_array_equal(t.y_support.numpy(), np.stack([e.support_ratings for e in eps]))
    np.testing.assert_array_equal(H.likes(t).y_support.numpy(), (np.stack([e.support_ratings for e in eps]) >= 4).astype(float))
    np.testing.assert_allclose(t.x_query[2, 3].numpy(), feats[eps[2].query_items[3] - 100])
    assert t.mask_support.all()
    bad = _episodes(1)
    bad[0].support_items[0] = 9999
    with pytest.raises(ValueError, match="without features"):
        H.like_tasks(bad, feats, ids)


def test_like_batches_respect_pools_and_masks():
    feats, ids = _features()
    df = pd.DataFrame({"user_id": np.repeat([1, 2, 3], 10), "item_id": np.tile(ids[:10], 3),
                       "rating": np.tile(np.arange(10) % 5 + 1.0, 3)})
    pools = H.rating_pools(df, ids)
    b = H.like_batches(pools, torch.from_numpy(feats), n_tasks=6, k_choices=(4, 16), n_query=5)(0)
    s, q = b.mask_support.sum(1).numpy(), b.mask_query.sum(1).numpy()
    assert set(s.tolist()) <= {4, 9} and (q >= 1).all() and (s + q <= 10).all()
    assert b.x_support.shape == (6, 16, 8) and b.x_query.shape == (6, 5, 8)
    assert torch.all(b.y_support[~b.mask_support] == 0) and set(b.y_support.unique().tolist()) <= {0.0, 1.0}
    r = H.like_batches(pools, torch.from_numpy(feats), n_tasks=6, target="rating")(0)
    assert set(r.y_support[r.mask_support].unique().tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_like_batches_with_the_same_arguments_give_the_same_batches():
    """fit_heads' methods train on the same tasks: a sampler's batch number i is the same whichever batches it or
    another sampler with the same arguments drew before, and a different seed starts a new stream."""
    feats, ids = _features()
    pools, f = _pools(feats, ids), torch.from_numpy(feats)
    fields = ("x_support", "y_support", "x_query", "y_query", "mask_support", "mask_query")
    alone = [H.like_batches(pools, f, seed=5)(i) for i in range(1)]  # a fresh stream, one batch
    first = H.like_batches(pools, f, seed=5)
    batches = [first(i) for i in range(4)]
    second, other = H.like_batches(pools, f, seed=5), H.like_batches(pools, f, seed=6)
    for i in (2, 0, 3, 1):
        assert all(torch.equal(getattr(second(i), n), getattr(batches[i], n)) for n in fields)
    assert all(torch.equal(getattr(alone[0], n), getattr(batches[0], n)) for n in fields)
    assert not torch.equal(other(0).x_support, batches[0].x_support)
    ratings = H.like_batches(pools, f, seed=5, target="rating")(0)  # the same draw, ratings as targets
    assert torch.equal(ratings.x_support, batches[0].x_support) and ratings.y_support.max() > 1


def test_evaluate_like_is_metrics_auc_of_every_task():
    """The batched AUC (ranks with padding last) equals metrics.auc task by task, bit for bit, ties included."""
    feats, ids = _features()
    t = H.like_tasks(_episodes(5), feats, ids)
    s = torch.round(torch.randn(t.y_query.shape, generator=torch.Generator().manual_seed(1)) * 2) / 2  # many ties
    y, m = H.likes(t).y_query.numpy(), t.mask_query.numpy()
    by_task = [metrics.auc(y[i][m[i]], s[i].numpy()[m[i]]) for i in range(len(y))]
    assert H.evaluate_like(s, t)["auc"].tolist() == by_task


# ----------------------------------------------------------------------------- heads


@pytest.mark.parametrize("l2", [0.7, min(H.HeadSettings().logreg_l2s)])
def test_per_user_logreg_matches_sklearn(l2):
    """The default 15 Newton steps reach scikit-learn's optimum of the same objective, also at the smallest penalty
    of the book's grid (the support is separable there, so the optimum lies far from the start). A constant column
    of s = sqrt(l2 / 1e-6) gives sklearn's unpenalised-intercept fit our 1e-6 penalty on the intercept."""
    from sklearn.linear_model import LogisticRegression

    feats, ids = _features()
    t = H.like_tasks(_episodes(3), feats, ids)
    got, lk, s = H.per_user_logreg(t, l2=l2), H.likes(t), np.sqrt(l2 / 1e-6)
    for i in range(3):
        x, xq = (np.c_[v[i].numpy(), np.full(len(v[i]), s)] for v in (t.x_support, t.x_query))
        clf = LogisticRegression(C=1 / l2, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, lk.y_support[i].numpy())
        np.testing.assert_allclose(got[i].numpy(), clf.decision_function(xq), rtol=1e-4, atol=1e-4)


def test_adapt_and_score_matches_a_plain_loop():
    feats, ids = _features()
    t = H.like_tasks(_episodes(4), feats, ids)
    model = H.UserHead(8, d_proj=5, seed=1)
    torch.testing.assert_close(H.adapt_and_score(model, t, steps=0), model(t.x_query).detach())
    got = H.adapt_and_score(model, t, adapt=["head"], steps=2, inner_lr=0.5)
    params, frozen = meta.split_params(model, ["head"])
    lk = H.likes(t)
    for i in range(4):
        p = meta.inner_adapt(model, params, frozen, t.x_support[i], lk.y_support[i], loss_fn=meta.bce_loss_per_example,
                             steps=2, inner_lr=0.5)
        torch.testing.assert_close(got[i], meta.functional_forward(model, p, frozen, t.x_query[i]).detach(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, model(t.x_query).detach())


@pytest.mark.parametrize("name", ["maml", "fomaml", "anil", "reptile"])
def test_meta_train_head_changes_what_it_should(name):
    feats, ids = _features()
    pools = _pools(feats, ids)
    model = H.UserHead(8, d_proj=4, seed=0)
    before = _state(model)
    log = H.meta_train_head(model, pools, torch.from_numpy(feats), H._meta_method(name, H.HeadSettings()), meta_steps=3)
    after = model.state_dict()
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert not torch.equal(before["body.0.weight"], after["body.0.weight"])  # ANIL's body is meta-learned too
    assert len(log.losses) == (0 if name == "reptile" else 3)


def test_meta_train_head_is_the_plain_loop_it_replaces():
    """MAML on a head through meta.meta_train == the loop of chapter 8 before issue 12 (sample, meta_step)."""
    feats, ids = _features()
    pools, f = _pools(feats, ids), torch.from_numpy(feats)
    a, b = H.UserHead(8, d_proj=4, seed=0), H.UserHead(8, d_proj=4, seed=0)
    H.meta_train_head(a, pools, f, meta.MAML(2, 0.3, loss_fn=meta.bce_loss_per_example), meta_steps=4, outer_lr=0.01, seed=3)
    sample = H.like_batches(pools, f, seed=3)
    opt = torch.optim.Adam(b.parameters(), lr=0.01)
    params, frozen = meta.split_params(b, "all")
    for step in range(4):
        meta.meta_step(b, params, frozen, sample(step), opt, loss_fn=meta.bce_loss_per_example, steps=2, inner_lr=0.3)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0)


def test_protonet_scores_match_hand_computation():
    feats, ids = _features()
    t = H.like_tasks(_episodes(2), feats, ids)
    model = H.UserHead(8, d_proj=3, seed=0)
    s = H.protonet_scores(model, t)
    y = H.likes(t).y_support[0]
    f_s, f_q = model.features(t.x_support[0]).detach(), model.features(t.x_query[0]).detach()
    like, dis = f_s[y == 1].mean(0), f_s[y == 0].mean(0)
    torch.testing.assert_close(s[0], -((f_q - like) ** 2).sum(1) + ((f_q - dis) ** 2).sum(1))
    before = _state(model)
    H.train_protonet(model, _pools(feats, ids), torch.from_numpy(feats), steps=2)
    assert not torch.equal(before["body.0.weight"], model.state_dict()["body.0.weight"])
    assert torch.equal(before["head.weight"], model.state_dict()["head.weight"])  # only the body is trained


def test_evaluate_like_auc_matches_sklearn_and_handles_one_class():
    from sklearn.metrics import roc_auc_score

    feats, ids = _features()
    eps = _episodes(2)
    eps[1].query_ratings[:] = 5.0  # one class only
    t = H.like_tasks(eps, feats, ids)
    s = torch.randn(t.y_query.shape, generator=torch.Generator().manual_seed(0))
    df = H.evaluate_like(s, t)
    assert df["auc"].iloc[0] == pytest.approx(roc_auc_score(H.likes(t).y_query[0].numpy(), s[0].numpy()))
    assert np.isnan(df["auc"].iloc[1]) and df["ndcg@10"].between(0, 1).all()


# ----------------------------------------------------------------------------- residual head (Meta-SGD)


def test_residual_head_is_global_plus_linear_term():
    feats, ids = _features()
    base = H.UserHead(8, d_proj=5, seed=1)
    res = H.ResidualUserHead(base)
    x = torch.from_numpy(feats[:7])
    torch.testing.assert_close(res(x), base(x))  # user = 0: exactly the global head
    with torch.no_grad():
        res.user_w.copy_(torch.arange(8.0) / 10)
    torch.testing.assert_close(res(x), base(x) + x @ (torch.arange(8.0) / 10))
    assert all(not p.requires_grad for p in res.base.parameters())
    assert [n for n, p in res.named_parameters() if p.requires_grad] == ["user_w", "user_b"]


def test_adapt_and_score_with_meta_sgd_rates_matches_the_closed_form_gradient():
    feats, ids = _features()
    t = H.like_tasks(_episodes(3), feats, ids)
    res = H.ResidualUserHead(H.UserHead(8, d_proj=5, seed=2))
    alpha, beta = torch.linspace(0.1, 0.8, 8), torch.tensor(0.3)
    got = H.adapt_and_score(res, t, adapt=H.ResidualUserHead.ADAPT, steps=2, inner_lr={"user_w": alpha, "user_b": beta})
    lk = H.likes(t)
    for i in range(3):
        x, y, xq = t.x_support[i], lk.y_support[i], t.x_query[i]
        g0 = res.base(x).detach()
        u, c = torch.zeros(8), torch.tensor(0.0)
        for _ in range(2):  # BCE mean over the support: grad_u = X^T (sigmoid(s) - y) / n, grad_b = mean(sigmoid(s) - y)
            r = torch.sigmoid(g0 + x @ u + c) - y
            u, c = u - alpha * (x.T @ r) / len(y), c - beta * r.mean()
        torch.testing.assert_close(got[i], res.base(xq).detach() + xq @ u + c, rtol=1e-10, atol=1e-10)


def test_meta_sgd_meta_gradient_matches_finite_differences():
    feats, ids = _features()
    res = H.ResidualUserHead(H.UserHead(8, d_proj=5, seed=3))
    with torch.no_grad():
        res.user_w.normal_(0, 0.3)
        res.user_b.fill_(0.2)
    b = H.like_batches(_pools(feats, ids), torch.from_numpy(feats), n_tasks=4, k_choices=(3, 5), n_query=4)(0)
    params, frozen = meta.split_params(res, H.ResidualUserHead.ADAPT)
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
        with torch.no_grad():
            fd = (J(*[v + e if i == which else v for i, v in enumerate(wrt)])
                  - J(*[v - e if i == which else v for i, v in enumerate(wrt)])) / (2 * eps)
        assert abs(float(fd) - float(grads[which] if j is None else grads[which][j])) < 1e-6, (which, j)
    assert grads[2].abs().sum() > 0  # the step sizes do receive a meta-gradient


def test_pairwise_query_loss_matches_a_loop_and_ignores_offsets():
    rng = np.random.default_rng(0)
    s = torch.from_numpy(rng.normal(size=(3, 7)))
    y = torch.from_numpy((rng.random((3, 7)) < 0.5).astype(np.float64))
    m = torch.from_numpy(rng.random((3, 7)) < 0.8)
    y[2] = 1.0  # one class only: no pair
    loss, ok = H.pairwise_query_loss(s, y, m)
    for t in range(3):
        pairs = [(i, j) for i in range(7) for j in range(7) if m[t, i] and m[t, j] and y[t, i] == 1 and y[t, j] == 0]
        want = np.mean([np.log1p(np.exp(float(s[t, j] - s[t, i]))) for i, j in pairs]) if pairs else 0.0
        assert bool(ok[t]) == bool(pairs) and abs(float(loss[t]) - want) < 1e-10
    shifted, _ = H.pairwise_query_loss(s + torch.tensor([[5.0], [-2.0], [1.0]]), y, m)
    torch.testing.assert_close(shifted, loss)


def test_pairwise_meta_sgd_is_the_mean_pairwise_loss_after_the_inner_steps():
    feats, ids = _features()
    res = H.ResidualUserHead(H.UserHead(8, d_proj=4, seed=0))
    b = H.like_batches(_pools(feats, ids), torch.from_numpy(feats), n_tasks=3, k_choices=(3,), n_query=5, target="rating")(0)
    lrs = {"user_w": torch.full((8,), 0.2), "user_b": torch.tensor(0.1)}
    method = H.PairwiseMetaSGD(2, lrs, adapt=H.ResidualUserHead.ADAPT, loss_fn=meta.bce_loss_per_example)
    q = H.adapt_and_score(res, b, adapt=H.ResidualUserHead.ADAPT, steps=2, inner_lr=lrs)
    lk = H.likes(b)
    loss, ok = H.pairwise_query_loss(q, lk.y_query, lk.mask_query)
    torch.testing.assert_close(method.loss(res, lk).detach(), (loss * ok).sum() / ok.sum())


@pytest.mark.parametrize("learn_init", [True, False])
def test_meta_train_residual_learns_rates_keeps_base_and_the_best_checkpoint(learn_init):
    feats, ids = _features()
    pools = _pools(feats, ids)
    base = H.UserHead(8, d_proj=4, seed=0)
    res = H.ResidualUserHead(base)
    base_before = _state(res.base)
    val = H.like_tasks(_episodes(4), feats, ids)
    s = H.HeadSettings(residual_steps=6, residual_eval_every=2, residual_init_lr=0.05)
    log, lrs = H.meta_train_residual(res, pools, torch.from_numpy(feats), s, learn_init=learn_init, val=[val])
    for k, v in res.base.state_dict().items():
        assert torch.equal(v, base_before[k])  # the global head inside is bit-identical
    assert not torch.allclose(lrs["user_w"], torch.full((8,), 0.05))  # the step sizes are learned
    assert (res.user_w.abs().sum() > 0) == learn_init  # the start moves only when it is learned
    assert [step for step, _ in log.scores] == [2, 4, 6] and len(log.losses) == 6
    best = max(log.scores, key=lambda c: c[1])
    assert log.best_step == best[0]
    now = np.nanmean(H.evaluate_like(H.adapt_and_score(res, val, adapt=H.ResidualUserHead.ADAPT, steps=3, inner_lr=lrs), val).auc)
    assert abs(now - best[1]) < 1e-12  # the restored checkpoint is the best one


# ----------------------------------------------------------------------------- fit_heads and K-fold


def test_fit_heads_choices_are_made_on_validation_and_reused_exactly():
    feats, ids = _features()
    pools = _pools(feats, ids)
    val = H.like_tasks(_episodes(3), feats, ids)
    test = H.like_tasks(_episodes(4), feats, ids)
    small = H.HeadSettings(d_proj=4, global_steps=5, meta_steps=2, proto_steps=3, residual_steps=4, residual_eval_every=2,
                           logreg_l2s=(1.0, 10.0), finetune_grid=((1, 0.1), (2, 0.3)))
    f = torch.from_numpy(feats)
    fitted = H.fit_heads(pools, f, [val], H.HEAD_METHODS, small, seed=0)
    assert list(fitted.scorers) == list(H.HEAD_METHODS)
    assert fitted.choices["logreg_l2"] in small.logreg_l2s and tuple(fitted.choices["finetune"]) in small.finetune_grid
    assert set(fitted.choices["residual_val_auc"]) == {True, False}
    by_hand = max(small.logreg_l2s, key=lambda v: float(np.nanmean(H.evaluate_like(H.per_user_logreg(val, l2=v), val).auc)))
    assert fitted.choices["logreg_l2"] == by_hand  # the validation argmax
    fixed = {k: fitted.choices[k] for k in ("logreg_l2", "finetune", "residual_learn_init")}
    again = H.fit_heads(pools, f, [val], H.HEAD_METHODS, small, choices=fixed, seed=0)
    for m in H.HEAD_METHODS:  # given the choices, a second fit scores the test tasks identically
        torch.testing.assert_close(again.scorers[m](test), fitted.scorers[m](test), rtol=0, atol=0)
    torch.testing.assert_close(fitted.scorers["global"](test), H.adapt_and_score(fitted.heads["global"], test, steps=0))
    with pytest.raises(ValueError, match="unknown method"):
        H.fit_heads(pools, f, [val], ["global", "magic"], small)


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


def test_kfold_heads_tests_every_user_once_and_trains_without_them():
    from sklearn.metrics import roc_auc_score

    feats, ids = _features(n_items=20)
    df = _kfold_ratings()
    seen = []

    def fit(pools, f):
        seen.append(sorted(len(p[0]) for p in pools))
        return {"col0": lambda t: t.x_query[..., 0], "neg": lambda t: -t.x_query[..., 0]}

    out = H.kfold_heads(df, feats, ids, fit, ks=(4,), n_folds=3, n_episodes=2, exclude_users=[0], seed=5)
    folds = np.array_split(np.random.default_rng(5).permutation(np.arange(1, 12)), 3)
    assert len(seen) == 3
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
        want.append(roc_auc_score((ep.query_ratings >= 4).astype(int), feats[ep.query_items - 100, 0]))
    assert abs(out[(out.method == "col0") & (out.user_id == u)].auc.item() - np.mean(want)) < 1e-12
    both = out.pivot_table(index="user_id", columns="method", values="auc")
    np.testing.assert_allclose(both["col0"] + both["neg"], 1.0)  # reversed scores: AUC -> 1 - AUC
