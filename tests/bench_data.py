"""Small synthetic MovieLens-shaped data and shrunk settings for the benchmark's tests (not a test file).

Imported as a plain module by ``test_benchmark_ranking.py`` and ``test_benchmark_sweep.py`` (pytest puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mrec_bench import ranking
from mrec_utils import coldstart as cs, data as D, gpt
from mrec_utils.heads import HeadSettings

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]
CCFG = cs.ColdStartSettings(cs.EpisodeSettings(train_query=10), cs.NetSettings(emb_dim=8, hidden=(16, 8), epochs=2),
                            cs.MetaSettings(epochs=2, batch=16, reptile_steps=2, lr_grid=(1.0,)),
                            cs.BaselineSettings(finetune_lrs=(0.1,), finetune_steps=(1, 3), foldin_regs=(1.0, 3.0), mf_iters=3),
                            patience=2, device="cpu")
RCFG = ranking.RankingSettings(
    coldstart=CCFG,
    gpt=gpt.ItemGPTSettings(min_count=2, max_len=20, n_embd=16, n_head=2, epochs=2, batch_size=32, cooc_windows=(1, 3), cooc_lasts=(2,)),
    heads=HeadSettings(d_proj=8, global_steps=10, meta_steps=3, proto_steps=5, logreg_l2s=(1.0, 10.0), finetune_grid=((1, 0.1),),
                       residual_steps=4, residual_eval_every=2),
    layers=2, components=8, min_item_count=3)
SPLIT = dict(item_cutoff_quantile=0.5)  # about half the films are new: enough new-film ratings per user


def synthetic(n_users: int = 70, n_items: int = 60, per_user: int = 40, seed: int = 0) -> D.MovieLens:
    """Films released one after another; each user rates ``per_user`` films after their release,
    rating = 3 + taste . genres + noise (so adapting to the user helps)."""
    rng = np.random.default_rng(seed)
    g = np.zeros((n_items, len(GENRES)))
    for i in range(n_items):
        g[i, rng.choice(len(GENRES), size=rng.integers(1, 3), replace=False)] = 1
    taste = rng.normal(0, 1.5, size=(n_users, len(GENRES)))
    release = np.linspace(0, 1e7, n_items)
    rows = []
    for u in range(n_users):
        its = rng.choice(n_items, size=per_user, replace=False)
        r = np.clip(np.round(3 + (g[its] / g[its].sum(1, keepdims=True)) @ taste[u] + rng.normal(0, 0.3, per_user)), 1, 5)
        ts = 9e8 + release[its] + rng.integers(0, 2e6, per_user)
        rows += [(u + 1, int(i) + 1, float(x), int(t)) for i, x, t in zip(its, r, ts)]
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    ratings["rating"] = ratings["rating"].astype(np.float64)
    ratings["timestamp"] = pd.to_datetime(ratings["timestamp"], unit="s", utc=True)
    items = pd.DataFrame({
        "item_id": np.arange(1, n_items + 1, dtype=np.int64),
        "title": [f"Film {i}" for i in range(1, n_items + 1)],
        "year": pd.array(rng.integers(1950, 2015, n_items), dtype="Int64"),
        "genres": [[GENRES[j] for j in np.flatnonzero(row)] for row in g],
    })
    return D.MovieLens("synthetic", ratings, items)
