"""Chapter 5's cold-start experiment: MeLU-style model, MF fold-in, the runner (mrec_utils.coldstart, exported
from the chapter, and mrec_utils.models).

Everything runs on small synthetic data: users with a *known linear preference over genres*
(rating = 3 + w_u . genres_i + noise), so a method that adapts to the user must beat one that
does not, and a single user-independent network cannot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import coldstart as cs, meta, metrics, tasks
from mrec_utils import data as D
from mrec_utils.models import (BiasedMF, MeLURatingModel, _year_bucket, build_features, fit_biased_mf, fold_in,
                               fold_in_items, melu_adapt_spec, ridge_rows)

GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western"]
PLANTED = GENRES_100K[1:7]

# small and fast, the same code paths as the book's settings
TINY = cs.ColdStartSettings(
    cs.EpisodeSettings(train_query=10), cs.NetSettings(emb_dim=8, hidden=(16, 8), epochs=6),
    cs.MetaSettings(epochs=10, batch=16, reptile_steps=2, lr_grid=(1.0,)),
    cs.BaselineSettings(finetune_lrs=(0.1, 0.3), finetune_steps=(1, 5), foldin_regs=(1.0, 3.0), mf_iters=4), patience=3)
M = cs.METHODS


def planted_frames(n_users: int = 90, n_items: int = 50, per_user: int = 30, seed: int = 0, integer: bool = False):
    """(ratings, items, users) frames in the MovieLens schema with a planted genre preference."""
    rng = np.random.default_rng(seed)
    g = np.zeros((n_items, len(PLANTED)))
    for i in range(n_items):
        g[i, rng.choice(len(PLANTED), size=rng.integers(1, 3), replace=False)] = 1
    w = rng.normal(0, 1.5, size=(n_users, len(PLANTED)))
    rows = []
    for u in range(n_users):
        its = rng.choice(n_items, size=per_user, replace=False)
        score = 3 + (g[its] / g[its].sum(1, keepdims=True)) @ w[u] + rng.normal(0, 0.2, per_user)
        r = np.clip(np.round(score) if integer else np.round(score * 2) / 2, 1, 5)
        ts = 9e8 + np.sort(rng.integers(0, 10**7, per_user))
        rows += [(u + 1, int(i) + 1, float(x), int(t)) for i, x, t in zip(its, r, ts)]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    ratings["rating"] = ratings["rating"].astype(np.float64)
    ratings["timestamp"] = pd.to_datetime(ratings["timestamp"], unit="s", utc=True)
    items = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1, dtype=np.int64),
        "title": [f"Movie {i}" for i in range(1, n_items + 1)],
        "year": pd.array(rng.integers(1950, 2015, n_items), dtype="Int64"),
        "genres": [[PLANTED[j] for j in np.flatnonzero(row)] for row in g],
    })
    users = pd.DataFrame({
        "user_id": np.arange(1, n_users + 1, dtype=np.int64),
        "gender": rng.choice(["F", "M"], n_users),
        "age": rng.integers(15, 70, n_users),
        "occupation": rng.choice(["writer", "student", "other"], n_users),
        "zip": ["00000"] * n_users,
    })
    return ratings, items, users


@pytest.fixture(scope="module")
def frames():
    return planted_frames()


@pytest.fixture(scope="module")
def ml(frames):
    ratings, items, users = frames
    return D.MovieLens("planted", ratings, items, users=users)


# --------------------------------------------------------------------------------------------
# Matrix factorisation and fold-in
# --------------------------------------------------------------------------------------------


def random_mf(n_items=12, dim=3, seed=0, reg=2.0) -> BiasedMF:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_items, dim, generator=g, dtype=torch.float64)
    b = torch.randn(n_items, generator=g, dtype=torch.float64)
    return BiasedMF(3.5, q, b, torch.zeros(1, dim, dtype=torch.float64), torch.zeros(1, dtype=torch.float64), reg)


def test_fold_in_equals_closed_form_ridge_and_sklearn():
    from sklearn.linear_model import Ridge

    mf = random_mf()
    items = np.array([0, 3, 4, 7, 9, 11])
    r = np.array([4.0, 2.5, 5.0, 3.0, 1.0, 4.5])
    p, b = fold_in(mf, items, r, reg=0.7)
    x = np.c_[mf.item_factors.numpy()[items], np.ones(len(items))]
    t = r - mf.mu - mf.item_bias.numpy()[items]
    w = np.linalg.solve(x.T @ x + 0.7 * np.eye(x.shape[1]), x.T @ t)
    np.testing.assert_allclose(np.r_[p.numpy(), b.item()], w, atol=1e-10)
    sk = Ridge(alpha=0.7, fit_intercept=False).fit(x, t).coef_
    np.testing.assert_allclose(np.r_[p.numpy(), b.item()], sk, atol=1e-8)
    # the solution is the minimiser: the gradient of the ridge objective vanishes there
    grad = x.T @ (x @ w - t) + 0.7 * w
    assert np.abs(grad).max() < 1e-9
    # default penalty = the MF's own
    p2, _ = fold_in(mf, items, r)
    w2 = np.linalg.solve(x.T @ x + 2.0 * np.eye(x.shape[1]), x.T @ t)
    np.testing.assert_allclose(p2.numpy(), w2[:-1], atol=1e-10)


def test_fold_in_batch_with_padding_equals_one_by_one():
    mf = random_mf(seed=1)
    items = np.array([[1, 2, 5, 0], [4, 6, 0, 0]])
    r = np.array([[5.0, 3.0, 4.0, 99.0], [1.0, 2.0, 99.0, 99.0]])
    mask = np.array([[True, True, True, False], [True, True, False, False]])
    p, b = fold_in(mf, items, r, mask, reg=1.0)
    for t in range(2):
        pt, bt = fold_in(mf, items[t][mask[t]], r[t][mask[t]], reg=1.0)
        np.testing.assert_allclose(p[t].numpy(), pt.numpy(), atol=1e-12)
        assert b[t].item() == pytest.approx(bt.item(), abs=1e-12)


def test_fold_in_items_is_a_ridge_regression_per_item_with_the_users_fixed():
    mf = random_mf(seed=2)
    g = torch.Generator().manual_seed(3)
    items = torch.tensor([2, 2, 5, 5, 5, 9])
    p, b = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    r = torch.tensor([4.0, 3.0, 5.0, 2.0, 4.5, 1.0], dtype=torch.float64)
    f = fold_in_items(mf, items, p, b, r, reg=0.5)
    for i in (2, 5, 9):
        x, sel = np.c_[p.numpy(), np.ones(6)], (items == i).numpy()
        w = np.linalg.solve(x[sel].T @ x[sel] + 0.5 * np.eye(4), x[sel].T @ (r.numpy() - mf.mu - b.numpy())[sel])
        np.testing.assert_allclose(np.r_[f.item_factors[i].numpy(), f.item_bias[i].item()], w, atol=1e-10)
    other = [i for i in range(12) if i not in (2, 5, 9)]  # items without a rating keep their factors
    assert torch.equal(f.item_factors[other], mf.item_factors[other]) and torch.equal(f.item_bias[other], mf.item_bias[other])


def test_ridge_rows_matches_a_loop():
    rng = np.random.default_rng(0)
    table = torch.as_tensor(rng.normal(size=(7, 4)))
    rows = torch.as_tensor(rng.integers(0, 5, 40))
    cols = torch.as_tensor(rng.integers(0, 7, 40))
    target = torch.as_tensor(rng.normal(size=40))
    w = ridge_rows(rows, cols, table, target, 6, 0.5)
    for r in range(6):
        sel = (rows == r).numpy()
        x = table.numpy()[cols.numpy()[sel]]
        ref = np.linalg.solve(x.T @ x + 0.5 * np.eye(4), x.T @ target.numpy()[sel])
        np.testing.assert_allclose(w[r].numpy(), ref, atol=1e-10)
    assert torch.all(w[5] == 0)  # row 5 has no observation


def test_als_fits_planted_low_rank_ratings():
    rng = np.random.default_rng(0)
    p, q = rng.normal(size=(40, 2)), rng.normal(size=(30, 2))
    u, i = np.divmod(np.arange(1200), 30)
    r = 3 + (p[u] * q[i]).sum(1)
    mf = fit_biased_mf(u, i, r, (40, 30), dim=2, reg=0.01, iters=30)
    err = (mf.predict(u, i).numpy() - r)
    assert np.sqrt(np.mean(err ** 2)) < 0.05
    with pytest.raises(ValueError, match="reg"):
        fit_biased_mf(u, i, r, (40, 30), reg=0)


# --------------------------------------------------------------------------------------------
# The MeLU-style model and the features
# --------------------------------------------------------------------------------------------


def tiny_model(users=(3, 4)) -> MeLURatingModel:
    torch.manual_seed(0)
    genres = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=np.float64)
    return MeLURatingModel(genres, np.array([0, 1, 2, 1]), 3, n_item_rows=3, user_cardinalities=users,
                           emb_dim=4, hidden=(6, 5), offset=3.0)


def test_model_shapes_and_genre_mean():
    m = tiny_model()
    x = torch.tensor([[0, 0, 1, 2], [3, 2, 0, 0]])
    assert m(x).shape == (2,) and m.features(x).shape == (2, 5)
    assert m(x[None].expand(3, 2, 4)).shape == (3, 2)
    emb = m.embed(torch.tensor([[0, 0, 0, 0], [2, 0, 0, 0]]))
    w = m.genre_emb.weight.detach()
    torch.testing.assert_close(emb[0, :4], (w[:, 0] + w[:, 2]) / 2)  # mean of the item's genres
    torch.testing.assert_close(emb[1, :4], torch.zeros(4))  # no genre


def test_adapt_flags_select_the_documented_parameters():
    m = tiny_model()
    names = {a: set(meta.split_params(m, melu_adapt_spec(a))[0]) for a in ("every", "all", "head", "out")}
    every = {n for n, _ in m.named_parameters()}
    assert names["every"] == every
    assert names["all"] == every - {"item_emb.weight"}
    assert names["head"] == {n for n in every if n.startswith(("decision.", "out."))}
    assert names["out"] == {"out.weight", "out.bias"}
    with pytest.raises(ValueError, match="adapt"):
        melu_adapt_spec("body")


def test_leaving_the_id_table_out_of_one_step_changes_no_query_prediction():
    """The documented reason why adapt='all' skips the item-id table: the query never holds a
    support item, so after one inner step the table's update is invisible."""
    m = tiny_model(users=())
    xs = torch.tensor([[0, 0], [1, 1]])
    ys = torch.tensor([5.0, 1.0])
    xq = torch.tensor([[3, 2], [2, 2]])  # other items (id row 2 = unknown)
    preds = []
    for spec in (lambda n: True, melu_adapt_spec("all")):
        p, f = meta.split_params(m, spec)
        ad = meta.inner_adapt(m, p, f, xs, ys, loss_fn=meta.mse_loss_per_example, steps=1, inner_lr=0.5)
        preds.append(meta.functional_forward(m, ad, f, xq))
    torch.testing.assert_close(preds[0], preds[1])


def test_build_features(frames):
    ratings, items, users = frames
    train = ratings[ratings.user_id <= 60]
    f = build_features(items, train, users)
    assert f.user_fields == ("gender", "age", "occupation")
    assert f.genre_matrix.shape == (50, 6) and set(np.unique(f.genre_matrix)) <= {0.0, 1.0}
    warm = np.isin(f.item_index.item_ids, train.item_id.unique())
    assert f.n_item_rows == warm.sum() + 1
    assert np.all(f.id_row[~warm] == f.n_item_rows - 1) and len(set(f.id_row[warm])) == warm.sum()
    yb = _year_bucket(pd.Series([1955, 1960, 1999, 2010, None], dtype="Int64"))
    assert yb.tolist() == [1, 2, 5, 7, 0]
    x = f.encode([1, 2], [1, 2])
    assert x.shape == (2, 5) and x.dtype == np.int64  # item, id row, three user fields
    assert build_features(items, train, None).encode([1], [1]).shape == (1, 2)  # auto: no users, no user columns
    with pytest.raises(ValueError, match="no user attributes"):
        build_features(items, train, None, use_user_features=True)
    k = build_features(items, train, None, known_users=train.user_id.to_numpy())  # a user-id attribute (item-cold)
    assert k.user_fields == ("user",) and k.user_cardinalities == (61,)
    assert k.user_codes([1, 60, 61, 999]).ravel().tolist() == [1, 60, 0, 0]  # 0: a user training does not know
    assert build_features(items, train, users, known_users=[5, 7]).user_codes([7, 8]).tolist() == [
        [*f.user_codes([7])[0], 2], [*f.user_codes([8])[0], 0]]


# --------------------------------------------------------------------------------------------
# Adaptation
# --------------------------------------------------------------------------------------------


def test_adapt_batch_equals_one_user_at_a_time_and_zero_steps_is_the_model():
    m = tiny_model(users=())
    p, f = meta.split_params(m, melu_adapt_spec("head"))
    xs = torch.tensor([[[0, 0], [1, 1], [3, 2]], [[1, 1], [2, 0], [0, 0]]])
    ys = torch.tensor([[5.0, 1.0, 3.0], [2.0, 4.0, 0.0]])
    ms = torch.tensor([[True, True, True], [True, True, False]])
    batched = cs.adapt_batch(m, p, f, xs, ys, ms, steps=3, lr=0.2)
    for t in range(2):
        one = meta.inner_adapt(m, p, f, xs[t][ms[t]], ys[t][ms[t]], loss_fn=meta.mse_loss_per_example, steps=3, inner_lr=0.2)
        for k in one:
            torch.testing.assert_close(batched[k][t], one[k].detach())
    assert cs.predict_batch(m, batched, f, xs).shape == (2, 3)
    zero_steps = cs.adapt_batch(m, p, f, xs, ys, ms, steps=0, lr=0.2)
    torch.testing.assert_close(cs.predict_batch(m, zero_steps, f, xs), m(xs).detach())



def test_batch_rows_reptile_equals_the_full_update():
    """Reptile on the rows of the batch's films equals Reptile on the whole item-id table (rows that no task
    holds, padding row 0 included, keep their values in both)."""
    torch.manual_seed(1)
    genres = np.eye(3)[np.arange(30) % 3]
    full = MeLURatingModel(genres, np.arange(30) % 3, 3, n_item_rows=21, emb_dim=4, hidden=(6,), offset=3.0)
    rows = MeLURatingModel(genres, np.arange(30) % 3, 3, n_item_rows=21, emb_dim=4, hidden=(6,), offset=3.0)
    rows.load_state_dict(full.state_dict())
    gen = torch.Generator().manual_seed(0)
    items = torch.randint(0, 30, (4, 7), generator=gen)
    x = torch.stack([items, torch.where(items < 20, items, 20)], -1)  # films 20-29 share the unknown row 20
    y = torch.randint(1, 6, (4, 7), generator=gen).double()
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[3, 4:] = False  # a padded task
    batch = tasks.TaskBatch(x[:, :3], y[:, :3], x[:, 3:] * mask[:, 3:, None], y[:, 3:], mask[:, :3], mask[:, 3:])
    kw = dict(inner_steps=2, inner_lr=0.1, epsilon=0.5, adapt=melu_adapt_spec("every"))
    before = full.item_emb.weight.detach().clone()
    meta.Reptile(**kw).update(full, batch, None, 0.25)
    cs.BatchRowsReptile(**kw).update(rows, batch, None, 0.25)
    for (name, a), b in zip(full.named_parameters(), rows.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-14, msg=name)
    untouched = np.setdiff1d(np.arange(21), x[..., 1].numpy())
    assert len(untouched) and torch.equal(rows.item_emb.weight[untouched], before[untouched])
    assert not torch.equal(rows.item_emb.weight, before)

def test_settings_replace_dotted_and_top_level():
    s = cs.ColdStartSettings().replace(**{"meta.inner_lr": 0.1, "net.hidden": (8,), "device": "cpu"})
    assert s.meta.inner_lr == 0.1 and s.net.hidden == (8,) and s.device == "cpu"
    assert s.meta.epochs == cs.MetaSettings().epochs and cs.ColdStartSettings().meta.inner_lr == 0.3


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def test_planted_preference_is_learned_by_adaptation(ml):
    cfg = TINY.replace(**{"meta.batch": 8, "meta.epochs": 15, "meta.lr": 1e-2, "meta.inner_steps": 3})
    res = cs.run_coldstart(ml, "user-cold", 10, seeds=(0,), methods=[M["global_mean"], M["net"], M["melu"], M["mf_foldin"]],
                           settings=cfg, progress=False)
    mae = res.summary["MAE"]
    # a user-independent network cannot know w_u; three gradient steps on 10 ratings can
    assert mae["melu"] < 0.75 * mae["net"], mae.to_dict()
    assert mae["mf_foldin"] < 0.85 * mae["net"], mae.to_dict()
    pu = res.per_user
    ci = metrics.paired_bootstrap_ci(pu[pu.method == "melu"]["mae"].to_numpy(), pu[pu.method == "net"]["mae"].to_numpy())
    assert ci.high < 0  # the paired interval of melu - net excludes zero
    assert res.summary.loc["melu", "dMAE"] == pytest.approx(mae["melu"] - mae[res.summary.attrs["reference"]["mae"]])
    assert res.summary.attrs["reference"]["mae"] in cs.BASELINES


def test_every_method_sees_the_same_episodes(ml):
    methods = ["global_mean", "item_mean", "mf_foldin", "protonet"]
    res = cs.run_coldstart(ml, "user-cold", 5, seeds=(0, 1), methods=[M[m] for m in methods], settings=TINY, progress=False)
    pu = res.per_user
    keys = {m: sorted(map(tuple, pu[pu.method == m][["seed", "user_id"]].to_numpy())) for m in methods}
    assert all(keys[m] == keys[methods[0]] for m in methods)
    for seed, d in res.data.items():
        ref = tasks.make_episodes(d.split, "test", k_support=5, n_query=10, seed=seed)
        assert [e.user_id for e in ref] == d.test_users.tolist()
        for e, row in zip(ref, range(len(ref))):
            np.testing.assert_array_equal(e.query_ratings, d.test.y_query[row, :e.n].numpy())
        assert not set(d.test_users) & set(d.split.train.user_id)  # user-cold: test users unseen
    # a method's numbers do not depend on which other methods ran
    alone = cs.run_coldstart(ml, "user-cold", 5, seeds=(1,), methods=[M["mf_foldin"]], settings=TINY, progress=False)
    joint = pu[(pu.method == "mf_foldin") & (pu.seed == 1)].reset_index(drop=True)
    np.testing.assert_allclose(alone.per_user["mae"].to_numpy(), joint["mae"].to_numpy())


def test_all_methods_run_and_report_their_choices(ml):
    cfg = TINY.replace(**{"meta.epochs": 2, "net.epochs": 2})
    res = cs.run_coldstart(ml, "user-cold", 5, seeds=(0,), settings=cfg, progress=False)
    s = res.summary
    assert list(s.index) == list(cs.METHODS)
    assert np.isfinite(s[["MAE", "RMSE", "nDCG@1", "nDCG@3"]].to_numpy()).all()
    chosen = res.per_user.groupby("method")["chosen"].first()
    assert "adapt=all" in chosen["maml"] and "adapt=head" in chosen["melu"] and "adapt=every" in chosen["reptile"]
    assert "steps=0" in chosen["net"] and "foldin_reg=" in chosen["mf_foldin"]
    assert res.fitted[0, "melu"].info.chosen() == chosen["melu"]
    assert res.data[0].features.user_fields == ("gender", "age", "occupation")  # "auto" uses them
    # "net" is the trained network used as is: zero adaptation steps = a plain forward pass
    f, d = res.fitted[0, "net"], res.data[0]
    q, c = f.predict(d.test, d.test_users, True)
    with torch.no_grad():
        np.testing.assert_allclose(q, f.info.model(d.test.x_query).double().numpy(), atol=1e-6)
    assert c.shape == (len(d.test), d.features.n_items)
    assert res.fitted[0, "mf_foldin"].info.mf.item_factors.shape[1] == TINY.baselines.mf_dim


def test_item_cold_users_stay_known(ml):
    """Item-cold evaluation users are training users: the network gets their user-id row and fold-in starts from
    their training factors (a huge penalty keeps them: the new films' factors stay 0, the user's bias remains)."""
    late = ml.ratings.assign(timestamp=ml.ratings.timestamp.where(ml.ratings.item_id <= 25,
                                                                   ml.ratings.timestamp + pd.Timedelta(days=365)))
    cfg = TINY.replace(**{"baselines.foldin_regs": (1e12,), "net.epochs": 1})
    res = cs.run_coldstart(D.MovieLens("late", late, ml.items, users=ml.users), "item-cold", 3, seeds=(0,),
                           methods=[M["mf_foldin"], M["net"]], settings=cfg, progress=False, item_cutoff_quantile=0.45)
    d, f = res.data[0], res.fitted[0, "mf_foldin"]
    assert d.features.user_fields[-1] == "user" and (d.features.user_codes(d.test_users)[:, -1] > 0).all()
    mf, known = f.info.mf, np.unique(d.train.user_id)
    q, _ = f.predict(d.test, d.test_users, False)
    rows = np.searchsorted(known, d.test_users)
    level = (mf.mu + mf.user_bias[rows]).numpy()[:, None]
    np.testing.assert_allclose(q[d.test.mask_query.numpy()], np.broadcast_to(level, q.shape)[d.test.mask_query.numpy()], atol=1e-6)
    assert cs.prepare_data(ml, "user-cold", 5, 0, TINY).features.user_fields == ("gender", "age", "occupation")


def test_summary_intervals_are_paired_differences():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 40)
    rows = []
    for m, shift in (("net", 0.0), ("melu", -0.1)):
        for u, b in enumerate(base):
            rows.append(dict(seed=u % 2, method=m, user_id=u, mae=b + shift, mse=(b + shift) ** 2, fit_seconds=1.0,
                             **{"ndcg@1": 0.5, "ndcg@3": 0.5, "hr@10": 0.1, "ndcg@10": 0.1}))
    s = cs.summarize(pd.DataFrame(rows))
    assert s.attrs["reference"]["mae"] == "net"
    # every user improves by exactly 0.1: a paired interval is a single point
    assert s.loc["melu", "dMAE"] == pytest.approx(-0.1)
    assert s.loc["melu", "dMAE low"] == pytest.approx(-0.1) and s.loc["melu", "dMAE high"] == pytest.approx(-0.1)
    t = cs.format_table(s)
    assert t.loc["melu", "kind"] == "meta" and "-0.100" in t.loc["melu", "dMAE vs net [95% CI]"]


@pytest.mark.parametrize("kw, match", [
    (dict(scenario="temporal"), "unknown scenario"),
    (dict(shots=95), "lower shots"),
    (dict(shots=0), "shots"),
    (dict(shots=25), "lower shots"),  # 30 ratings per user: 25 + 10 cannot be drawn for anyone
])
def test_bad_input(ml, kw, match):
    args = dict(dataset=ml, scenario="user-cold", shots=10, seeds=(0,), methods=[M["global_mean"]], settings=TINY,
                progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        cs.run_coldstart(**args)


def test_user_features_requested_on_a_release_without_them(ml):
    no_users = D.MovieLens("no users", ml.ratings, ml.items)
    with pytest.raises(ValueError, match="no user attributes"):
        cs.run_coldstart(no_users, "user-cold", 10, seeds=(0,), methods=[M["net"]],
                         settings=TINY.replace(**{"net.use_user_features": True}), progress=False)
