"""Chapter 5's cold-start experiment: MeLU-style model, MF fold-in, the runner and its CLI.

Everything runs on small synthetic data: users with a *known linear preference over genres*
(rating = 3 + w_u . genres_i + noise), so a method that adapts to the user must beat one that
does not, and a single user-independent network cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_utils import benchmark, coldstart as cs, meta, metrics, tasks
from mrec_utils import data as D
from mrec_utils.models import BiasedMF, MeLURatingModel, fit_biased_mf, fold_in, melu_adapt_spec, ridge_rows

GENRES_100K = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
               "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
               "Romance", "Sci-Fi", "Thriller", "War", "Western"]
PLANTED = GENRES_100K[1:7]

# small and fast, the same code paths as the book's settings
TINY = cs.ColdStartConfig(emb_dim=8, hidden=(16, 8), net_epochs=6, meta_epochs=10, meta_batch=16,
                          train_query=10, mf_iters=4, patience=3, reptile_steps=2, lr_grid=(1.0,),
                          finetune_lrs=(0.1, 0.3), finetune_steps=(1, 5), foldin_regs=(1.0, 3.0))


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
    mf = fit_biased_mf(u, i, r, 40, 30, dim=2, reg=0.01, iters=30)
    err = (mf.predict(u, i).numpy() - r)
    assert np.sqrt(np.mean(err ** 2)) < 0.05
    with pytest.raises(ValueError, match="reg"):
        fit_biased_mf(u, i, r, 40, 30, reg=0)


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
    with pytest.raises(ValueError, match="columns"):
        m(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_item_rows"):
        MeLURatingModel(np.ones((2, 2)), np.zeros(2, dtype=int), 1, n_item_rows=1)


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
    f = cs.build_features(items, train, users)
    assert f.user_fields == ("gender", "age", "occupation") and f.n_columns == 5
    assert f.genre_matrix.shape == (50, 6) and set(np.unique(f.genre_matrix)) <= {0.0, 1.0}
    warm = np.isin(f.item_index.item_ids, train.item_id.unique())
    assert f.n_item_rows == warm.sum() + 1
    assert np.all(f.id_row[~warm] == f.n_item_rows - 1) and len(set(f.id_row[warm])) == warm.sum()
    yb = cs._year_bucket(pd.Series([1955, 1960, 1999, 2010, None], dtype="Int64"))
    assert yb.tolist() == [1, 2, 5, 7, 0]
    x = f.encode([1, 2], [1, 2])
    assert x.shape == (2, 5) and x.dtype == np.int64
    assert cs.build_features(items, train, None).n_columns == 2  # auto: no users, no user columns
    with pytest.raises(ValueError, match="no user attributes"):
        cs.build_features(items, train, None, use_user_features=True)


# --------------------------------------------------------------------------------------------
# Adaptation helpers (shared with chapter 6)
# --------------------------------------------------------------------------------------------


def test_adapt_batch_weights():
    m = tiny_model(users=())
    p, f = meta.split_params(m, melu_adapt_spec("head"))
    xs = torch.tensor([[[0, 0], [1, 1], [3, 2]], [[1, 1], [2, 0], [0, 0]]])
    ys = torch.tensor([[5.0, 1.0, 3.0], [2.0, 4.0, 0.0]])
    ms = torch.tensor([[True, True, True], [True, True, False]])
    plain = cs.adapt_batch(m, p, f, xs, ys, ms, steps=3, lr=0.2)
    ones = cs.adapt_batch(m, p, f, xs, ys, ms, steps=3, lr=0.2, weights=torch.ones(2, 3))
    for k in plain:
        torch.testing.assert_close(plain[k], ones[k])
    # weight 0 on a rating = leaving it out, up to the 1/n of the mean (n counts it): rescale lr
    w = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    zero = cs.adapt_batch(m, p, f, xs, ys, ms, steps=1, lr=0.3, weights=w)
    ms2 = ms.clone()
    ms2[0, 2] = False
    dropped = cs.adapt_batch(m, p, f, xs, ys, ms2, steps=1, lr=0.2, weights=None)
    for k in plain:
        torch.testing.assert_close(zero[k][0], dropped[k][0])
    pred = cs.predict_batch(m, plain, f, xs)
    assert pred.shape == (2, 3)
    zero_steps = cs.adapt_batch(m, p, f, xs, ys, ms, steps=0, lr=0.2)
    torch.testing.assert_close(cs.predict_batch(m, zero_steps, f, xs), m(xs).detach())


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def test_planted_preference_is_learned_by_adaptation(frames):
    cfg = TINY.replace(meta_batch=8, meta_epochs=15, meta_lr=1e-2, inner_steps=3)
    res = cs.run_coldstart(frames, "user-cold", 10, seeds=(0,), methods=["global_mean", "net", "melu", "mf_foldin"],
                           config=cfg, progress=False)
    mae = res.summary["MAE"]
    # a user-independent network cannot know w_u; three gradient steps on 10 ratings can
    assert mae["melu"] < 0.75 * mae["net"], mae.to_dict()
    assert mae["mf_foldin"] < 0.85 * mae["net"], mae.to_dict()
    pu = res.per_user
    ci = metrics.paired_bootstrap_ci(pu[pu.method == "melu"]["mae"].to_numpy(), pu[pu.method == "net"]["mae"].to_numpy())
    assert ci.high < 0  # the paired interval of melu - net excludes zero
    assert res.summary.loc["melu", "dMAE"] == pytest.approx(mae["melu"] - mae[res.summary.attrs["reference"]["mae"]])
    assert res.summary.attrs["reference"]["mae"] in cs.BASELINES


def test_every_method_sees_the_same_episodes(frames):
    methods = ["global_mean", "item_mean", "mf_foldin", "protonet"]
    res = cs.run_coldstart(frames, "user-cold", 5, seeds=(0, 1), methods=methods, config=TINY, progress=False)
    pu = res.per_user
    keys = {m: sorted(map(tuple, pu[pu.method == m][["seed", "user_id"]].to_numpy())) for m in methods}
    assert all(keys[m] == keys[methods[0]] for m in methods)
    for seed, d in res.data.items():
        ref = tasks.make_episodes(d.split, "test", k_support=5, n_query=10, seed=seed)
        assert [e.user_id for e in ref] == d.test.user_ids.tolist()
        for e, row in zip(ref, range(len(ref))):
            np.testing.assert_array_equal(e.query_ratings, d.test.y_query[row, :e.n].numpy())
        assert not set(d.test.user_ids) & set(d.split.train.user_id)  # user-cold: test users unseen
    # a method's numbers do not depend on which other methods ran
    alone = cs.run_coldstart(frames, "user-cold", 5, seeds=(1,), methods=["mf_foldin"], config=TINY, progress=False)
    joint = pu[(pu.method == "mf_foldin") & (pu.seed == 1)].reset_index(drop=True)
    np.testing.assert_allclose(alone.per_user["mae"].to_numpy(), joint["mae"].to_numpy())


def test_all_methods_run_and_report_their_choices(frames):
    cfg = TINY.replace(meta_epochs=2, net_epochs=2)
    res = cs.run_coldstart(frames, "user-cold", 5, seeds=(0,), config=cfg, progress=False)
    s = res.summary
    assert list(s.index) == list(cs.METHODS)
    assert np.isfinite(s[["MAE", "RMSE", "nDCG@1", "nDCG@3"]].to_numpy()).all()
    chosen = res.per_user.groupby("method")["chosen"].first()
    assert "adapt=all" in chosen["maml"] and "adapt=head" in chosen["melu"] and "adapt=every" in chosen["reptile"]
    assert "steps=0" in chosen["net"] and "foldin_reg=" in chosen["mf_foldin"]
    assert res.data[0].features.user_fields == ("gender", "age", "occupation")  # "auto" uses them
    # "net" is the trained network used as is: zero adaptation steps = a plain forward pass
    f = res.fitted[0, "net"]
    q, _ = f.predict(res.data[0].test, False)
    x = res.data[0].test.x_query
    model = f.info["model"]
    with torch.no_grad():
        np.testing.assert_allclose(q, model(x).double().numpy(), atol=1e-6)


def test_cli_set_parses_types():
    over = benchmark._config_overrides(["min_ratings=30", "hidden=32,16", "lr_grid=0.5,1", "use_item_id=false",
                                        "inner_lr=0.2", "device=none"])
    assert over == {"min_ratings": 30, "hidden": (32, 16), "lr_grid": (0.5, 1.0), "use_item_id": False,
                    "inner_lr": 0.2, "device": None}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        benchmark._config_overrides(["meta_epochs"])
    with pytest.raises(ValueError, match="meta_epochs"):
        benchmark._config_overrides(["meta_epochs=many"])


def test_summary_intervals_are_paired_differences():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.0, 40)
    rows = []
    for m, shift in (("net", 0.0), ("melu", -0.1)):
        for u, b in enumerate(base):
            rows.append(dict(seed=u % 2, method=m, user_id=u, mae=b + shift, mse=(b + shift) ** 2,
                             **{"ndcg@1": 0.5, "ndcg@3": 0.5, "hr@10": 0.1, "ndcg@10": 0.1}))
    s = cs.summarize(pd.DataFrame(rows))
    assert s.attrs["reference"]["mae"] == "net"
    # every user improves by exactly 0.1: a paired interval is a single point
    assert s.loc["melu", "dMAE"] == pytest.approx(-0.1)
    assert s.loc["melu", "dMAE low"] == pytest.approx(-0.1) and s.loc["melu", "dMAE high"] == pytest.approx(-0.1)
    t = cs.format_table(s)
    assert t.loc["melu", "kind"] == "meta" and "-0.100" in t.loc["melu", "dMAE vs net [95% CI]"]


@pytest.mark.parametrize("kw, match", [
    (dict(methods=["nope"]), "unknown method"),
    (dict(scenario="temporal"), "unknown scenario"),
    (dict(shots=95), "lower shots"),
    (dict(shots=0), "shots"),
])
def test_bad_input(frames, kw, match):
    args = dict(dataset=frames, scenario="user-cold", shots=10, seeds=(0,), methods=["global_mean"], config=TINY, progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        cs.run_coldstart(**args)


def test_k_too_large_for_the_users(frames):
    # 30 ratings per user: 25 + 10 cannot be drawn for anyone
    with pytest.raises(ValueError, match="lower shots"):
        cs.run_coldstart(frames, "user-cold", 25, seeds=(0,), methods=["global_mean"], config=TINY, progress=False)


def test_user_features_requested_on_a_release_without_them(frames):
    ratings, items, _ = frames
    cfg = TINY.replace(use_user_features=True)
    with pytest.raises(ValueError, match="no user attributes"):
        cs.run_coldstart((ratings, items, None), "user-cold", 10, seeds=(0,), methods=["net"], config=cfg, progress=False)


# --------------------------------------------------------------------------------------------
# The command line, on an ml-100k-format folder
# --------------------------------------------------------------------------------------------


def write_100k(root, monkeypatch):
    ratings, items, users = planted_frames(integer=True)
    flags = lambda gs: "|".join("1" if g in gs else "0" for g in GENRES_100K)  # noqa: E731
    files = {
        "u.data": "".join(f"{u}\t{i}\t{int(r)}\t{int(t.timestamp())}\n" for u, i, r, t in ratings.itertuples(index=False)),
        "u.item": "".join(f"{i}|{t} ({y})|01-Jan-{y}||http://x|{flags(gs)}\n" for i, t, y, gs in items.itertuples(index=False)),
        "u.user": "".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, g, a, o, z in users.itertuples(index=False)),
        "u.genre": "".join(f"{g}|{i}\n" for i, g in enumerate(GENRES_100K)) + "\n",
    }
    raw = {k: v.encode("latin-1") for k, v in files.items()}
    specs = tuple(D.FileSpec(k, len(v), hashlib.sha256(v).hexdigest()) for k, v in raw.items())
    monkeypatch.setitem(D.RELEASES, "ml-100k", dataclasses.replace(D.RELEASES["ml-100k"], files=specs))
    folder = root / D.RELEASES["ml-100k"].folder
    folder.mkdir(parents=True)
    for k, v in raw.items():
        (folder / k).write_bytes(v)


TINY_SET = ["emb_dim=8", "hidden=16,8", "net_epochs=3", "meta_epochs=3", "meta_batch=16", "train_query=10",
            "mf_iters=3", "lr_grid=1.0", "finetune_steps=1,5"]


def test_cli_on_ml100k_format_writes_csv_and_json(tmp_path, monkeypatch, capsys):
    write_100k(tmp_path, monkeypatch)
    out = tmp_path / "res.csv"
    rc = benchmark.main(["coldstart", "--dataset", "ml-100k", "--data-dir", str(tmp_path), "--shots", "10",
                         "--seeds", "0", "--methods", "global_mean", "item_mean", "net", "melu",
                         "--set", *TINY_SET, "--no-progress", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    df = pd.read_csv(out)
    assert df["method"].tolist() == ["global_mean", "item_mean", "net", "melu"]
    assert {"MAE", "RMSE", "nDCG@1", "nDCG@3", "HR@10", "nDCG@10", "dMAE", "dMAE low", "dMAE high"} <= set(df.columns)
    assert "melu" in printed and "ml-100k" in printed
    js = tmp_path / "res.json"
    rc = benchmark.main(["coldstart", "--dataset", "ml-100k", "--data-dir", str(tmp_path), "--seeds", "0",
                         "--methods", "global_mean", "--user-features", "yes", "--no-progress", "--out", str(js)])
    assert rc == 0
    payload = json.loads(js.read_text())
    assert payload["meta"]["settings"]["dataset"] == "ml-100k"
    assert payload["meta"]["settings"]["config"]["use_user_features"] is True
    assert payload["results"][0]["method"] == "global_mean"


@pytest.mark.parametrize("argv, match", [
    (["--methods", "magic"], "unknown method"),
    (["--scenario", "sideways"], "unknown scenario"),
    (["--shots", "200"], "lower shots"),
    (["--set", "nonsense=1"], "KEY=VALUE"),
    (["--out", "x.txt"], ".csv or .json"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, monkeypatch, capsys, argv, match):
    write_100k(tmp_path, monkeypatch)
    rc = benchmark.main(["coldstart", "--dataset", "ml-100k", "--data-dir", str(tmp_path), "--seeds", "0",
                         "--no-progress", *argv])
    assert rc == 2
    assert match in capsys.readouterr().err
