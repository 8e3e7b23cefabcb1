"""The cold-start experiment of chapter 5: features, methods, protocol and results.

One function runs it all (``python -m mrec_utils.benchmark coldstart`` calls it)::

    >>> from mrec_utils.coldstart import run_coldstart
    >>> res = run_coldstart("ml-latest-small", scenario="user-cold", shots=10, seeds=(0, 1, 2))
    >>> res.summary          # one row per method: MAE, RMSE, nDCG@1/@3, HR@10, nDCG@10, intervals

Protocol (per seed ``s``)
-------------------------
1. ``tasks.make_split(ratings, scenario, seed=s)``: training ratings, validation users, test users.
2. Episodes of the validation and test users: ``k = shots`` support ratings and ``n_query = 10``
   query ratings drawn at random (``shots="melu"``: MeLU's preset, all but 10 ratings as support).
   Users who cannot supply ``k + n_query`` ratings are skipped; every method is scored on
   *exactly the same* episodes (the runner builds them once per seed and checks it).
3. Every method learns from the training ratings only. Validation users choose early stopping,
   the inner learning rate and number of adaptation steps, the fold-in penalty; test users are
   used once, for the reported numbers.
4. Metrics per test user: MAE and RMSE of the query ratings; nDCG@1 and nDCG@3 of the query
   items ranked by the prediction (graded gains ``2**r - 1``, ties averaged; MeLU's protocol);
   HR@10 and nDCG@10 ranking the *whole catalogue* minus the user's support items, relevant =
   query items rated >= 4 (users without such an item are left out of these two means).
5. :func:`summarize`: means over all (seed, test user) pairs and paired bootstrap 95% intervals
   of each method's difference to the best non-meta baseline.

Features
--------
:func:`build_features` turns the items (genres, release year), optionally an item-id row for
items seen in training, and optionally user attributes (gender, age group, occupation when the
release has them: ml-100k, ml-1m) into the integer input ``x [..., C]`` of
:class:`mrec_utils.models.MeLURatingModel`.

Reuse for streams (chapter 6)
-----------------------------
:func:`adapt_batch` adapts a model to many users at once from any support tensors (optionally
with per-rating weights, e.g. recency weights, through :func:`weighted_mse_per_example`);
:func:`predict_batch` predicts with the adapted parameters; :func:`encode_ratings` encodes any
list of (user, item) pairs.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call, vmap

from mrec_utils import meta, metrics, tasks, train
from mrec_utils.models import MeLURatingModel, fit_biased_mf, fold_in, melu_adapt_spec

__all__ = [
    "METHODS",
    "BASELINES",
    "META_METHODS",
    "SCENARIOS",
    "Features",
    "build_features",
    "EpisodeTensors",
    "encode_episodes",
    "encode_ratings",
    "ColdStartConfig",
    "ColdStartData",
    "prepare_data",
    "make_model",
    "weighted_mse_per_example",
    "adapt_batch",
    "predict_batch",
    "train_net",
    "meta_train",
    "train_protonet",
    "TrainLog",
    "ProtoNet",
    "proto_predict",
    "LIKE_THRESHOLD",
    "METRICS",
    "Fitted",
    "fit_method",
    "model_method",
    "evaluate",
    "summarize",
    "format_table",
    "ColdStartResult",
    "run_coldstart",
]

METHODS: dict[str, str] = {
    "global_mean": "predicts the training mean rating for everything",
    "item_mean": "item mean (popularity): predicts the item's damped mean rating, ranks by number of ratings",
    "mf_foldin": "biased MF (ALS); a new user is folded in by closed-form ridge regression on the support",
    "net": "the MeLU-style network trained normally on all training ratings, no per-user adaptation",
    "net_finetune": "the same trained network, then SGD on the user's support (decision layers)",
    "maml": "MAML, second order, adapts all parameters",
    "fomaml": "first-order MAML, adapts all parameters",
    "melu": "MeLU local update / ANIL: second-order MAML that adapts only the decision layers",
    "reptile": "Reptile (batched), every parameter; adapts on the support at test time",
    "protonet": "prototypical like/dislike head on the network's last hidden layer",
}
"""Method keys and one-line descriptions (the order is the order of the tables)."""

BASELINES: tuple[str, ...] = ("global_mean", "item_mean", "mf_foldin", "net", "net_finetune")
META_METHODS: tuple[str, ...] = ("maml", "fomaml", "melu", "reptile", "protonet")
SCENARIOS: tuple[str, ...] = ("user-cold", "item-cold", "user+item-cold")

_ADAPT = {"net_finetune": "head", "maml": "all", "fomaml": "all", "melu": "head", "reptile": "every"}
_YEAR_EDGES = (1960, 1970, 1980, 1990, 2000, 2010)  # buckets: unknown, <1960, 60s, ..., >=2010
_AGE_EDGES = (18, 25, 35, 45, 50, 56)  # ml-1m's age groups; ml-100k's exact ages fall into them
_USER_FIELDS = ("gender", "age", "occupation")


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Features:
    """How (user, item) pairs become the integer input of :class:`MeLURatingModel`.

    Attributes:
        item_index: the catalogue (every item of the release): raw id <-> index 0..n-1.
        genres: genre names, the columns of ``genre_matrix``.
        genre_matrix: [n_catalogue, n_genres] float32 0/1.
        year_bucket: [n_catalogue] int64 in 0..7 (0 = unknown year, then <1960, 1960s, ..., >=2010).
        id_row: [n_catalogue] int64 row of the item-id table: warm items (rated in training) get
            0..n_warm-1, every other item the unknown row n_warm; all 0 without id embedding.
        n_item_rows: n_warm + 1, or 0 when the item id is not used.
        user_fields: names of the user attributes used (empty if none).
        user_cardinalities: codes per attribute (code 0 = unknown).
        user_table: DataFrame indexed by user_id with one int64 code column per field.
    """

    item_index: tasks.ItemIndex
    genres: tuple[str, ...]
    genre_matrix: np.ndarray
    year_bucket: np.ndarray
    id_row: np.ndarray
    n_item_rows: int
    user_fields: tuple[str, ...]
    user_cardinalities: tuple[int, ...]
    user_table: pd.DataFrame

    @property
    def n_items(self) -> int:
        return len(self.item_index)

    @property
    def n_columns(self) -> int:
        return 2 + len(self.user_fields)

    def user_codes(self, user_ids: Any) -> np.ndarray:
        """[n, n_fields] int64 codes of ``user_ids`` (0 for users without a profile)."""
        u = np.asarray(user_ids, dtype=np.int64).ravel()
        if not self.user_fields:
            return np.zeros((len(u), 0), dtype=np.int64)
        return self.user_table.reindex(u).fillna(0).to_numpy(np.int64)

    def encode(self, user_ids: Any, item_ids: Any) -> np.ndarray:
        """Model input for aligned ``user_ids [n]`` and raw ``item_ids [n]`` -> int64 [n, C]."""
        it = self.item_index.encode(np.asarray(item_ids, dtype=np.int64).ravel())
        u = np.asarray(user_ids, dtype=np.int64).ravel()
        if len(u) != len(it):
            raise ValueError(f"user_ids ({len(u)}) and item_ids ({len(it)}) must be aligned.")
        return np.concatenate([it[:, None], self.id_row[it][:, None], self.user_codes(u)], axis=1)

    def catalogue(self, user_id: int) -> np.ndarray:
        """Model input of every catalogue item for one user -> int64 [n_catalogue, C]."""
        idx = np.arange(self.n_items)
        codes = np.repeat(self.user_codes([user_id]), self.n_items, axis=0)
        return np.concatenate([idx[:, None], self.id_row[:, None], codes], axis=1)


def _year_bucket(years: pd.Series) -> np.ndarray:
    y = pd.array(years, dtype="Float64").to_numpy(dtype=np.float64, na_value=np.nan)
    b = np.searchsorted(np.asarray(_YEAR_EDGES, dtype=np.float64), y, side="right") + 1
    return np.where(np.isnan(y), 0, b).astype(np.int64)


def _user_table(users: pd.DataFrame) -> tuple[pd.DataFrame, tuple[int, ...]]:
    missing = [c for c in ("user_id", *_USER_FIELDS) if c not in users.columns]
    if missing:
        raise ValueError(f"users frame lacks the column(s) {missing}; it needs user_id, gender, age, occupation.")
    out = pd.DataFrame(index=pd.Index(users["user_id"].astype(np.int64), name="user_id"))
    cards = []
    for f in _USER_FIELDS:
        col = users[f]
        if f == "age":
            a = pd.to_numeric(col, errors="coerce").to_numpy(np.float64)
            codes = np.where(np.isnan(a), 0, np.searchsorted(np.asarray(_AGE_EDGES, float), a, side="right") + 1)
            cards.append(len(_AGE_EDGES) + 2)
        else:
            vals = col.astype(str).to_numpy()
            cats = np.unique(vals)
            codes = np.searchsorted(cats, vals) + 1
            cards.append(len(cats) + 1)
        out[f] = codes.astype(np.int64)
    return out, tuple(cards)


def build_features(
    items: pd.DataFrame,
    train_ratings: pd.DataFrame,
    users: pd.DataFrame | None = None,
    *,
    use_item_id: bool = True,
    use_user_features: bool | str = "auto",
    extra_item_ids: Any = None,
) -> Features:
    """Build the :class:`Features` of a release from its items, training ratings and users.

    Args:
        items: ``item_id``, ``year`` (nullable), ``genres`` (list of str), one row per item.
        train_ratings: the ratings training may use; an item is *warm* (gets its own id row)
            iff it appears here, so no evaluation rating can shape an id embedding.
        users: ``user_id``, ``gender``, ``age``, ``occupation`` (ml-100k / ml-1m) or None.
        use_item_id: give warm items an id embedding row.
        use_user_features: True (requires ``users``), False, or "auto" (use them when present).
        extra_item_ids: more item ids to put in the catalogue (e.g. rated ids missing from
            ``items``); they get no genre and an unknown year.

    Raises:
        ValueError: ``use_user_features=True`` without a users frame, bad frames.
    """
    for name, frame, cols in (("items", items, ("item_id", "year", "genres")), ("train_ratings", train_ratings, ("item_id",))):
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}.")
        miss = [c for c in cols if c not in frame.columns]
        if miss:
            raise ValueError(f"{name} lacks the column(s) {miss}.")
    if use_user_features not in (True, False, "auto"):
        raise ValueError(f"use_user_features must be True, False or 'auto', got {use_user_features!r}.")
    if use_user_features is True and users is None:
        raise ValueError(
            "use_user_features=True but this dataset has no user attributes (ml-latest-small and "
            "the ml-latest/ml-25m/ml-32m releases have none); use ml-100k or ml-1m, or "
            "use_user_features='auto'/False."
        )
    ids = items["item_id"].to_numpy(np.int64)
    if extra_item_ids is not None:
        ids = np.concatenate([ids, np.asarray(extra_item_ids, dtype=np.int64).ravel()])
    index = tasks.ItemIndex.from_ids(ids)
    genres = tuple(sorted({g for gs in items["genres"] for g in gs}))
    gpos = {g: j for j, g in enumerate(genres)}
    gm = np.zeros((len(index), max(len(genres), 1)), dtype=np.float32)
    rows = index.encode(items["item_id"].to_numpy(np.int64))
    for r, gs in zip(rows, items["genres"]):
        for g in gs:
            gm[r, gpos[g]] = 1.0
    yb = np.zeros(len(index), dtype=np.int64)
    yb[rows] = _year_bucket(items["year"])
    warm = np.isin(index.item_ids, train_ratings["item_id"].to_numpy())
    if use_item_id:
        n_warm = int(warm.sum())
        id_row = np.where(warm, np.cumsum(warm) - 1, n_warm).astype(np.int64)
        n_rows = n_warm + 1
    else:
        id_row, n_rows = np.zeros(len(index), dtype=np.int64), 0
    if users is not None and use_user_features in (True, "auto"):
        table, cards = _user_table(users)
        fields = _USER_FIELDS
    else:
        table, cards, fields = pd.DataFrame(index=pd.Index([], dtype=np.int64, name="user_id")), (), ()
    return Features(index, genres, gm, yb, id_row, n_rows, fields, cards, table)


# --------------------------------------------------------------------------------------------
# Episodes as tensors
# --------------------------------------------------------------------------------------------


@dataclass
class EpisodeTensors:
    """Padded episodes encoded for the model (T users, S support and Q query slots).

    Fields: ``user_ids [T]`` (numpy); ``x_support [T, S, C]`` int64, ``y_support [T, S]``
    default float dtype, ``mask_support [T, S]`` bool; ``x_query``, ``y_query``, ``mask_query`` alike.
    Padded slots hold zeros. Column 0 of ``x`` is the catalogue index of the item.
    """

    user_ids: np.ndarray
    x_support: torch.Tensor
    y_support: torch.Tensor
    mask_support: torch.Tensor
    x_query: torch.Tensor
    y_query: torch.Tensor
    mask_query: torch.Tensor

    def __len__(self) -> int:
        return len(self.user_ids)

    def task_batch(self) -> tasks.TaskBatch:
        """The same tensors as a :class:`mrec_utils.tasks.TaskBatch`."""
        return tasks.TaskBatch(self.x_support, self.y_support, self.x_query, self.y_query,
                              self.mask_support, self.mask_query)

    def subset(self, idx: Any) -> "EpisodeTensors":
        """The episodes at positions ``idx``."""
        idx = np.asarray(idx, dtype=np.int64)
        t = torch.as_tensor(idx, device=self.x_support.device)
        return EpisodeTensors(self.user_ids[idx], *(getattr(self, f)[t] for f in
                              ("x_support", "y_support", "mask_support", "x_query", "y_query", "mask_query")))


def encode_episodes(features: Features, episodes: Sequence[tasks.Episode], device: Any = None) -> EpisodeTensors:
    """Pad and encode ``episodes`` (from :func:`mrec_utils.tasks.make_episodes`)."""
    b = tasks.collate_episodes(episodes, item_index=features.item_index)
    user_ids = np.array([e.user_id for e in episodes], dtype=np.int64)
    codes = torch.as_tensor(features.user_codes(user_ids))  # [T, F]
    id_row = torch.as_tensor(features.id_row)

    def x_of(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        it = torch.where(mask, items, torch.zeros_like(items))
        u = codes[:, None, :].expand(*it.shape, codes.shape[1])
        x = torch.cat([it[..., None], id_row[it][..., None], u], dim=-1)
        return x * mask[..., None]

    dev = torch.device("cpu") if device is None else torch.device(device)
    return EpisodeTensors(
        user_ids,
        x_of(b.x_support, b.mask_support).to(dev), b.y_support.to(dev), b.mask_support.to(dev),
        x_of(b.x_query, b.mask_query).to(dev), b.y_query.to(dev), b.mask_query.to(dev),
    )


def encode_ratings(features: Features, ratings: pd.DataFrame, device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, C] int64, y [n])`` of every row of a ratings frame (normal training); ``y`` has torch's default dtype."""
    x = features.encode(ratings["user_id"].to_numpy(), ratings["item_id"].to_numpy())
    y = ratings["rating"].to_numpy(np.float64)
    dev = torch.device("cpu") if device is None else torch.device(device)
    return torch.tensor(x, device=dev), torch.tensor(y, dtype=torch.get_default_dtype(), device=dev)


def _drop_ids(x: torch.Tensor, p: float, unknown_row: int, gen: torch.Generator) -> torch.Tensor:
    """Replace the id row by the unknown row with probability ``p`` (teaches the unknown row)."""
    if p <= 0 or unknown_row <= 0:
        return x
    drop = torch.rand(x.shape[:-1], generator=gen).to(x.device) < p
    x = x.clone()
    x[..., 1] = torch.where(drop, torch.full_like(x[..., 1], unknown_row), x[..., 1])
    return x


# --------------------------------------------------------------------------------------------
# Configuration and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColdStartConfig:
    """Every setting of the experiment (the defaults are the book's).

    Episodes: ``n_query`` query ratings per evaluation user; ``train_query`` query ratings per
    meta-training task (more than at test time: a better estimate of the meta-gradient);
    ``min_ratings``: evaluate only users with at least this many ratings (None: everyone who
    can supply ``k + n_query``; set it to compare several k on the same users).
    Model: ``emb_dim``, ``hidden``, ``use_item_id``, ``use_user_features``, ``id_dropout`` (the
    probability that a training rating's item is shown as "unknown", so that the unknown row
    learns what a new item looks like).
    Normal training: ``net_lr``, ``net_batch``, ``net_epochs``.
    Meta-training: ``meta_lr`` (Adam), ``meta_batch`` tasks per step, ``meta_epochs`` passes over
    the training users (episodes redrawn each pass), ``inner_steps`` and ``inner_lr`` (SGD on the
    support), ``reptile_steps``, ``reptile_lr``, ``reptile_epsilon`` (outer step, annealed to 0),
    ``meta_init``: "scratch" (default) or "net" (start from the normally trained network).
    Selection on validation users: ``patience`` (early stopping, in epochs), ``lr_grid``
    (multipliers of the meta-learners' inner lr), ``finetune_lrs`` x ``finetune_steps`` (the
    fine-tuning grid), ``foldin_regs`` (fold-in penalties).
    Baselines: ``mf_dim``, ``mf_reg``, ``mf_iters``, ``item_damping``.
    ``device``: None = CUDA when available (:func:`mrec_utils.train.get_device`).
    """

    n_query: int = 10
    train_query: int = 80
    min_ratings: int | None = None
    emb_dim: int = 16
    hidden: tuple[int, ...] = (32, 16)
    use_item_id: bool = True
    use_user_features: bool | str = "auto"
    id_dropout: float = 0.1
    net_lr: float = 2e-3
    net_batch: int = 512
    net_epochs: int = 10
    meta_lr: float = 2e-3
    meta_batch: int = 32
    meta_epochs: int = 12
    inner_steps: int = 1
    inner_lr: float = 0.3
    reptile_steps: int = 3
    reptile_epsilon: float = 0.5
    reptile_lr: float = 0.1
    patience: int = 3
    lr_grid: tuple[float, ...] = (0.5, 1.0, 2.0)
    finetune_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    finetune_steps: tuple[int, ...] = (1, 3, 10)
    foldin_regs: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)
    mf_dim: int = 16
    mf_reg: float = 10.0
    mf_iters: int = 8
    item_damping: float = 5.0
    meta_init: str = "scratch"
    device: str | None = None

    def replace(self, **kw: Any) -> "ColdStartConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class ColdStartData:
    """Everything one seed of the experiment needs.

    Attributes:
        scenario, shots, seed: the setting (``shots`` an int or "melu").
        split: the :class:`mrec_utils.tasks.Split`.
        features: :class:`Features` built from the items, the training ratings and the users.
        train: the training ratings; val, test: :class:`EpisodeTensors` of the validation and
            test users; val_episodes, test_episodes: the same as :class:`mrec_utils.tasks.Episode`.
        rating_range: (min, max) training rating; every prediction is clipped to it.
        device: where tensors live.
    """

    scenario: str
    shots: int | str
    seed: int
    split: tasks.Split
    features: Features
    train: pd.DataFrame
    val: EpisodeTensors
    test: EpisodeTensors
    val_episodes: list[tasks.Episode]
    test_episodes: list[tasks.Episode]
    rating_range: tuple[float, float]
    config: ColdStartConfig
    device: torch.device

    def train_episodes(self, epoch: int) -> list[tasks.Episode]:
        """Meta-training episodes of the training users, redrawn for each ``epoch``.

        k-shot: every training user with more than k ratings gives ``k`` random support ratings
        and *up to* ``config.train_query`` random query ratings from the rest. "melu": MeLU's
        preset (users with 13 to 100 ratings; 10 query, the rest support).
        """
        seed = self.seed * 100_003 + epoch + 1
        if self.shots == "melu":
            eps = tasks.make_episodes(self.train, None, k_support=None, n_query=self.config.n_query,
                                      seed=seed, on_short="skip", min_ratings=13, max_ratings=100)
        else:
            eps = tasks.make_episodes(self.train, None, k_support=int(self.shots), n_query=None,
                                      seed=seed, on_short="skip")
            rng = np.random.default_rng(seed)
            cap = self.config.train_query
            for e in eps:
                if e.n > cap:  # keep a random subset of the query, in time order
                    keep = np.sort(rng.choice(e.n, size=cap, replace=False))
                    e.query_items, e.query_ratings, e.query_times = e.query_items[keep], e.query_ratings[keep], e.query_times[keep]
        if not eps:
            raise ValueError(f"no training user has more than {self.shots} ratings; lower shots.")
        return eps


def _check_shots(shots: Any) -> int | str:
    if shots == "melu":
        return "melu"
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an int >= 1 or 'melu', got {shots!r}.")
    return int(shots)


def _check_scenario(scenario: Any) -> str:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}.")
    return scenario


def prepare_data(
    ratings: pd.DataFrame,
    items: pd.DataFrame,
    users: pd.DataFrame | None,
    scenario: str,
    shots: int | str,
    seed: int = 0,
    config: ColdStartConfig | None = None,
    **split_kwargs: Any,
) -> ColdStartData:
    """Split, build features and draw the validation/test episodes for one seed.

    ``split_kwargs`` go to :func:`mrec_utils.tasks.make_split` (e.g. ``item_cutoff_quantile``).

    Raises:
        ValueError: unknown scenario, bad shots, ``shots + n_query`` more than the largest
            evaluation user can have, no evaluation user with enough ratings, a dataset without
            the requested user features.
    """
    cfg = ColdStartConfig() if config is None else config
    if not isinstance(cfg, ColdStartConfig):
        raise TypeError(f"config must be a ColdStartConfig, got {type(cfg).__name__}.")
    if cfg.meta_init not in ("scratch", "net"):
        raise ValueError(f"meta_init must be 'scratch' or 'net', got {cfg.meta_init!r}.")
    scenario = _check_scenario(scenario)
    shots = _check_shots(shots)
    max_r = split_kwargs.get("max_ratings", 100)
    if shots != "melu" and max_r is not None and shots + cfg.n_query > max_r:
        raise ValueError(
            f"shots={shots} + n_query={cfg.n_query} = {shots + cfg.n_query} ratings is more than any "
            f"evaluation user has (max_ratings={max_r}); lower shots (e.g. 5, 10 or 20)."
        )
    split = tasks.make_split(ratings, scenario, seed=seed, **split_kwargs)
    dev = train.get_device(cfg.device)
    features = build_features(items, split.train, users, use_item_id=cfg.use_item_id,
                              use_user_features=cfg.use_user_features,
                              extra_item_ids=ratings["item_id"].to_numpy())
    eps = {}
    for part in ("val", "test"):
        if shots == "melu":
            e = tasks.make_episodes(split, part, preset="melu", seed=seed, on_short="skip")
        else:
            e = tasks.make_episodes(split, part, k_support=shots, n_query=cfg.n_query, seed=seed,
                                    on_short="skip", min_ratings=cfg.min_ratings)
        if len(e) < 2:
            raise ValueError(
                f"{scenario}, shots={shots}: only {len(e)} {part} user(s) have {shots} support + "
                f"{cfg.n_query} query ratings; lower shots or use a larger release."
            )
        eps[part] = e
    tasks.check_no_leakage(split, eps["val"] + eps["test"]).raise_if_bad()
    r = split.train["rating"].to_numpy()
    return ColdStartData(
        scenario, shots, int(seed), split, features, split.train,
        encode_episodes(features, eps["val"], dev), encode_episodes(features, eps["test"], dev),
        eps["val"], eps["test"], (float(r.min()), float(r.max())), cfg, dev,
    )


# --------------------------------------------------------------------------------------------
# Model, adaptation, prediction
# --------------------------------------------------------------------------------------------


def make_model(data: ColdStartData, seed: int | None = None) -> MeLURatingModel:
    """A fresh :class:`MeLURatingModel` for ``data`` (seeded by ``seed``, default data.seed)."""
    torch.manual_seed(data.seed if seed is None else seed)
    f, cfg = data.features, data.config
    model = MeLURatingModel(f.genre_matrix, f.year_bucket, len(_YEAR_EDGES) + 2, f.n_item_rows,
                            f.user_cardinalities, cfg.emb_dim, cfg.hidden,
                            offset=float(data.train["rating"].mean()))
    return model.to(data.device)


def weighted_mse_per_example(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``w * (pred - r)^2`` per example, with ``target [..., 2] = (rating r, weight w)``.

    Pass a weighted target to :func:`adapt_batch` (``weights=``) to down-weight old ratings.
    """
    pred = pred.squeeze(-1) if pred.dim() == target.dim() and pred.shape[-1] == 1 else pred
    return target[..., 1] * (pred - target[..., 0]).pow(2)


def adapt_batch(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    x_s: torch.Tensor,
    y_s: torch.Tensor,
    mask_s: torch.Tensor,
    *,
    steps: int,
    lr: float,
    weights: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Adapt ``params`` to each of T users: ``steps`` SGD steps (rate ``lr``) on their support.

    Args:
        x_s [T, S, C], y_s [T, S], mask_s [T, S]: the users' support sets.
        weights: optional [T, S] per-rating weights of the squared error (e.g. recency weights);
            the loss is the masked mean of ``w * (pred - r)^2``.

    Returns:
        ``{name: [T, ...]}`` adapted copies of ``params`` (detached; evaluation use).
    """
    if steps == 0:
        return {k: v.detach()[None].expand(x_s.shape[0], *v.shape) for k, v in params.items()}
    if weights is None:
        loss_fn, y = meta.mse_loss_per_example, y_s
    else:
        if weights.shape != y_s.shape:
            raise ValueError(f"weights must have the shape of y_s {tuple(y_s.shape)}, got {tuple(weights.shape)}.")
        loss_fn, y = weighted_mse_per_example, torch.stack([y_s, weights.to(y_s.dtype)], -1)
    p = {k: v.detach() for k, v in params.items()}
    fz = {k: v.detach() for k, v in frozen.items()}

    def one(x, yy, m):
        return meta.inner_adapt(model, p, fz, x, yy, m, loss_fn=loss_fn, steps=steps, inner_lr=lr)

    with torch.no_grad():
        return vmap(one)(x_s, y, mask_s)


def predict_batch(model: torch.nn.Module, adapted: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor],
                  x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Predictions ``[T, N]`` for inputs ``x [T, N, C]`` with per-user parameters ``{name: [T, ...]}``."""
    fz = {k: v.detach() for k, v in frozen.items()}

    def one(p, xx):
        return functional_call(model, {**fz, **p}, (xx,))

    with torch.no_grad():
        outs = [vmap(one)(adapted, x[:, s:s + chunk]) for s in range(0, x.shape[1], chunk)]
    return torch.cat(outs, dim=1)


def _val_mae(pred: torch.Tensor, et: EpisodeTensors, lo: float, hi: float) -> float:
    err = (pred.clamp(lo, hi) - et.y_query).abs()
    per_user = (err * et.mask_query).sum(1) / et.mask_query.sum(1)
    return float(per_user.mean())


# --------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    """What a training loop did: validation MAE per epoch, the best epoch, seconds."""

    val_mae: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0


def _eval_adapted(model, data: ColdStartData, et: EpisodeTensors, adapt: str, steps: int, lr: float) -> float:
    params, frozen = meta.split_params(model, melu_adapt_spec(adapt))
    ad = adapt_batch(model, params, frozen, et.x_support, et.y_support, et.mask_support, steps=steps, lr=lr)
    return _val_mae(predict_batch(model, ad, frozen, et.x_query), et, *data.rating_range)


def train_net(model: MeLURatingModel, data: ColdStartData, seed: int = 0, progress: bool = False) -> TrainLog:
    """Normal training: Adam on the squared error of every training rating, mini-batches,
    early stopping on the validation users' query MAE (no adaptation). Restores the best epoch."""
    cfg = data.config
    x, y = encode_ratings(data.features, data.train, data.device)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.net_lr)
    stop = train.EarlyStopping(patience=cfg.patience)
    log, t0 = TrainLog(), time.perf_counter()
    for epoch in train.progress(range(cfg.net_epochs), desc="net", disable=not progress):
        perm = torch.randperm(len(y), generator=gen).to(data.device)
        total = 0.0
        for s in range(0, len(y), cfg.net_batch):
            idx = perm[s:s + cfg.net_batch]
            xb = _drop_ids(x[idx], cfg.id_dropout, data.features.n_item_rows - 1, gen)
            loss = (model(xb) - y[idx]).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log.train_loss.append(total / len(y))
        with torch.no_grad():
            log.val_mae.append(_val_mae(model(data.val.x_query), data.val, *data.rating_range))
        if stop.step(log.val_mae[-1], model):
            break
    stop.restore(model)
    log.best_epoch, log.seconds = stop.best_step, time.perf_counter() - t0
    return log


def meta_train(
    model: MeLURatingModel,
    data: ColdStartData,
    algorithm: str,
    adapt: str,
    seed: int = 0,
    progress: bool = False,
) -> TrainLog:
    """Meta-train ``model`` in place on episodes of the training users.

    ``algorithm``: "maml" (second order), "fomaml" (first order) or "reptile". Each epoch redraws
    one episode per training user and walks over them in meta-batches of ``config.meta_batch``:
    MAML/FOMAML take one Adam step on :func:`mrec_utils.meta.maml_loss` (vmapped over tasks);
    Reptile moves the adapted parameters by :func:`mrec_utils.meta.reptile_step` (epsilon
    annealed linearly to 0) and the rest stays fixed. After each epoch the validation users are
    adapted (``inner_steps`` SGD steps at ``inner_lr``) and scored; the best epoch is restored.
    """
    if algorithm not in ("maml", "fomaml", "reptile"):
        raise ValueError(f"algorithm must be 'maml', 'fomaml' or 'reptile', got {algorithm!r}.")
    cfg = data.config
    params, frozen = meta.split_params(model, melu_adapt_spec(adapt))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.meta_lr) if algorithm != "reptile" else None
    gen = torch.Generator().manual_seed(seed)
    stop = train.EarlyStopping(patience=cfg.patience)
    log, t0 = TrainLog(), time.perf_counter()
    unknown = data.features.n_item_rows - 1
    n_batches = None
    step = 0
    for epoch in train.progress(range(cfg.meta_epochs), desc=algorithm, disable=not progress):
        et = encode_episodes(data.features, data.train_episodes(epoch), data.device)
        n_batches = math.ceil(len(et) / cfg.meta_batch)
        order = torch.randperm(len(et), generator=gen).numpy()
        total = 0.0
        for b in range(n_batches):
            sub = et.subset(order[b * cfg.meta_batch:(b + 1) * cfg.meta_batch])
            tb = sub.task_batch()
            tb.x_support = _drop_ids(tb.x_support, cfg.id_dropout, unknown, gen)
            tb.x_query = _drop_ids(tb.x_query, cfg.id_dropout, unknown, gen)
            if algorithm == "reptile":
                frac = 1.0 - step / (cfg.meta_epochs * n_batches)
                new = meta.reptile_step(model, params, frozen, tb, loss_fn=meta.mse_loss_per_example,
                                        steps=cfg.reptile_steps, inner_lr=cfg.reptile_lr,
                                        epsilon=cfg.reptile_epsilon * frac)
                meta.load_params_(model, new)
            else:
                loss = meta.meta_step(model, params, frozen, tb, opt, loss_fn=meta.mse_loss_per_example,
                                      steps=cfg.inner_steps, inner_lr=cfg.inner_lr,
                                      first_order=algorithm == "fomaml")
                total += float(loss)
            step += 1
        log.train_loss.append(total / n_batches)
        steps, lr = (cfg.reptile_steps, cfg.reptile_lr) if algorithm == "reptile" else (cfg.inner_steps, cfg.inner_lr)
        log.val_mae.append(_eval_adapted(model, data, data.val, adapt, steps, lr))
        if stop.step(log.val_mae[-1], model):
            break
    stop.restore(model)
    log.best_epoch, log.seconds = stop.best_step, time.perf_counter() - t0
    return log


class ProtoNet(torch.nn.Module):
    """A prototypical like/dislike head on :meth:`MeLURatingModel.features`.

    ``fallback [2, D]`` are learned prototypes for a class missing from a user's support set.
    """

    def __init__(self, body: MeLURatingModel):
        super().__init__()
        self.body = body
        width = body.out.in_features
        self.fallback = torch.nn.Parameter(torch.zeros(2, width))

    def logits(self, x_s, like_s, mask_s, x_q) -> torch.Tensor:
        """[T, Q, 2] class logits (0 = dislike, 1 = like) for ``x_q [T, Q, C]``."""
        return meta.prototypical_logits(self.body.features(x_s), like_s, self.body.features(x_q), mask_s,
                                        n_classes=2, fallback_prototypes=self.fallback)


LIKE_THRESHOLD = 4.0
"""A rating >= 4 stars is a "like" (the prototypical head's classes, and the relevance of HR@10)."""


def train_protonet(net: ProtoNet, data: ColdStartData, seed: int = 0, progress: bool = False) -> TrainLog:
    """Episodic training of the prototypical head: cross-entropy of the query like/dislike labels
    under :func:`mrec_utils.meta.prototypical_logits` (batched over tasks), Adam, early stopping on
    the validation users' query MAE of :func:`proto_predict`."""
    cfg = data.config
    opt = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    gen = torch.Generator().manual_seed(seed)
    stop = train.EarlyStopping(patience=cfg.patience)
    log, t0 = TrainLog(), time.perf_counter()
    unknown = data.features.n_item_rows - 1
    class_means = _class_means(data.train["rating"].to_numpy())
    for epoch in train.progress(range(cfg.meta_epochs), desc="protonet", disable=not progress):
        et = encode_episodes(data.features, data.train_episodes(epoch), data.device)
        order = torch.randperm(len(et), generator=gen).numpy()
        total, n_b = 0.0, 0
        for b in range(0, len(et), cfg.meta_batch):
            sub = et.subset(order[b:b + cfg.meta_batch])
            xs = _drop_ids(sub.x_support, cfg.id_dropout, unknown, gen)
            xq = _drop_ids(sub.x_query, cfg.id_dropout, unknown, gen)
            logits = net.logits(xs, (sub.y_support >= LIKE_THRESHOLD).long(), sub.mask_support, xq)
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), (sub.y_query >= LIKE_THRESHOLD).long().flatten(),
                                                   reduction="none").view_as(sub.y_query)
            loss = meta.masked_mean(ce, sub.mask_query).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n_b = total + float(loss.detach()), n_b + 1
        log.train_loss.append(total / n_b)
        with torch.no_grad():
            pred, _ = proto_predict(net, data.val, class_means)
        log.val_mae.append(_val_mae(pred, data.val, *data.rating_range))
        if stop.step(log.val_mae[-1], net):
            break
    stop.restore(net)
    log.best_epoch, log.seconds = stop.best_step, time.perf_counter() - t0
    return log


def _class_means(r: np.ndarray) -> tuple[float, float]:
    like = r >= LIKE_THRESHOLD
    return float(r[~like].mean()) if (~like).any() else float(r.mean()), float(r[like].mean()) if like.any() else float(r.mean())


def proto_predict(net: ProtoNet, et: EpisodeTensors, class_means: tuple[float, float],
                  x_other: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ratings from like-probabilities: ``r_hat = p * m_like + (1 - p) * m_dislike``.

    ``p`` = softmax probability of "like"; ``m_like`` / ``m_dislike`` = the user's mean support
    rating among liked / disliked support items (the training means ``class_means`` when the user
    has none of that class). Returns (query predictions [T, Q], ``p`` for ``x_other [T, N, C]``
    or None); ``p`` ranks the catalogue (the same order as ``r_hat`` whenever ``m_like > m_dislike``).
    """
    like = (et.y_support >= LIKE_THRESHOLD) & et.mask_support
    dis = (et.y_support < LIKE_THRESHOLD) & et.mask_support
    m_like = torch.where(like.any(1), (et.y_support * like).sum(1) / like.sum(1).clamp_min(1), class_means[1])
    m_dis = torch.where(dis.any(1), (et.y_support * dis).sum(1) / dis.sum(1).clamp_min(1), class_means[0])
    p = net.logits(et.x_support, like.long(), et.mask_support, et.x_query).softmax(-1)[..., 1]
    pred = p * m_like[:, None] + (1 - p) * m_dis[:, None]
    p_other = None
    if x_other is not None:
        p_other = torch.cat([net.logits(et.x_support, like.long(), et.mask_support, x_other[:, s:s + 8192]).softmax(-1)[..., 1]
                             for s in range(0, x_other.shape[1], 8192)], 1)
    return pred, p_other


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass
class Fitted:
    """A trained method.

    ``predict(et, catalogue)`` returns ``(query predictions [T, Q], catalogue scores
    [T, n_catalogue] or None)`` as float64 numpy arrays; ``info`` holds what was chosen on the
    validation users (inner lr, steps, fold-in penalty, best epoch) and ``seconds`` the time to fit.
    """

    name: str
    predict: Callable[[EpisodeTensors, bool], tuple[np.ndarray, np.ndarray | None]]
    seconds: float
    info: dict = field(default_factory=dict)


def _catalogue_x(data: ColdStartData, user_ids: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.stack([data.features.catalogue(int(u)) for u in user_ids]), device=data.device)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().double().cpu().numpy()


def model_method(name: str, model: MeLURatingModel, data: ColdStartData, adapt: str,
                 steps: int, lr: float, seconds: float = 0.0, info: dict | None = None) -> Fitted:
    """A :class:`Fitted` that adapts ``model`` to each user (``steps`` SGD steps at ``lr`` on the
    parameters chosen by ``adapt``, see :func:`mrec_utils.models.melu_adapt_spec`) and predicts.
    ``info["model"]`` keeps the model, so the same network can be re-evaluated with other steps."""
    params, frozen = meta.split_params(model, melu_adapt_spec(adapt))

    def predict(et: EpisodeTensors, catalogue: bool):
        ad = adapt_batch(model, params, frozen, et.x_support, et.y_support, et.mask_support, steps=steps, lr=lr)
        q = predict_batch(model, ad, frozen, et.x_query)
        c = predict_batch(model, ad, frozen, _catalogue_x(data, et.user_ids)) if catalogue else None
        return _np(q), _np(c)

    info = {**(info or {}), "adapt": adapt, "steps": steps, "inner_lr": lr, "model": model}
    return Fitted(name, predict, seconds, info)


def _choose_lr(model, data: ColdStartData, adapt: str, steps_grid: Sequence[int], lr_grid: Sequence[float]) -> tuple[int, float, float]:
    """(steps, lr, val MAE) with the lowest validation MAE after adaptation."""
    vals = {(s, lr): _eval_adapted(model, data, data.val, adapt, s, lr) for s in steps_grid for lr in lr_grid}
    steps, lr = train.pick_best(vals, vals.get, maximize=False)
    return steps, lr, vals[steps, lr]


def fit_method(name: str, data: ColdStartData, cache: dict | None = None, progress: bool = False) -> Fitted:
    """Train method ``name`` (a key of :data:`METHODS`) on ``data``; seeded by ``data.seed``.

    ``cache`` (a dict) shares the normally trained network between "net" and "net_finetune"
    (it is trained identically either way, so results do not depend on which methods run).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}.")
    cfg, seed = data.config, data.seed
    cache = {} if cache is None else cache
    train.seed_everything(seed)
    t0 = time.perf_counter()
    tr = data.train
    r = tr["rating"].to_numpy(np.float64)
    mu = float(r.mean())
    n_cat = data.features.n_items

    if name == "global_mean":
        def predict(et, catalogue):
            q = np.full(tuple(et.y_query.shape), mu)
            return q, (np.full((len(et), n_cat), mu) if catalogue else None)
        return Fitted(name, predict, time.perf_counter() - t0)

    if name == "item_mean":
        idx = data.features.item_index.encode(tr["item_id"].to_numpy())
        s = np.bincount(idx, weights=r, minlength=n_cat)
        n = np.bincount(idx, minlength=n_cat).astype(np.float64)
        mean = (s + cfg.item_damping * mu) / (n + cfg.item_damping)
        pop = n + 1e-6 * mean  # popularity; the mean only breaks ties

        def predict(et, catalogue):
            q = mean[et.x_query[..., 0].cpu().numpy()]
            return q, (np.broadcast_to(pop, (len(et), n_cat)).copy() if catalogue else None)
        return Fitted(name, predict, time.perf_counter() - t0, {"damping": cfg.item_damping})

    if name == "mf_foldin":
        users, uidx = np.unique(tr["user_id"].to_numpy(), return_inverse=True)
        iidx = data.features.item_index.encode(tr["item_id"].to_numpy())
        mf = fit_biased_mf(uidx, iidx, r, len(users), n_cat, dim=cfg.mf_dim, reg=cfg.mf_reg,
                           iters=cfg.mf_iters, seed=seed, device=data.device)

        def run(et: EpisodeTensors, reg: float, catalogue: bool):
            p, b = fold_in(mf, et.x_support[..., 0], et.y_support, et.mask_support, reg=reg)
            qi = et.x_query[..., 0]
            q = mf.mu + b[:, None] + mf.item_bias[qi] + (mf.item_factors[qi] * p[:, None, :]).sum(-1)
            c = (mf.mu + b[:, None] + mf.item_bias[None, :] + p @ mf.item_factors.T) if catalogue else None
            return _np(q), _np(c)

        lo, hi = data.rating_range
        vals = {}
        for reg in cfg.foldin_regs:
            q, _ = run(data.val, reg, False)
            vals[reg] = _val_mae(torch.as_tensor(q), _cpu(data.val), lo, hi)
        reg = train.pick_best(vals, vals.get, maximize=False)
        return Fitted(name, lambda et, catalogue: run(et, reg, catalogue), time.perf_counter() - t0,
                      {"foldin_reg": reg, "mf": mf})

    def trained_net() -> tuple[MeLURatingModel, TrainLog]:
        if "net" not in cache:
            model = make_model(data, seed)
            cache["net"] = (model, train_net(model, data, seed, progress))
        return cache["net"]

    if name in ("net", "net_finetune"):
        model, log = trained_net()
        info = {"best_epoch": log.best_epoch, "train_seconds": log.seconds}
        if name == "net":
            return model_method(name, model, data, "head", 0, 1.0, log.seconds, info)
        t1 = time.perf_counter()
        steps, lr, _ = _choose_lr(model, data, _ADAPT[name], cfg.finetune_steps, cfg.finetune_lrs)
        return model_method(name, model, data, _ADAPT[name], steps, lr, log.seconds + time.perf_counter() - t1, info)

    if name in ("maml", "fomaml", "melu", "reptile"):
        if cfg.meta_init == "net":
            base, base_log = trained_net()
            model = copy.deepcopy(base)
            t0 -= base_log.seconds
        else:
            model = make_model(data, seed)
        algo = {"melu": "maml"}.get(name, name)
        log = meta_train(model, data, algo, _ADAPT[name], seed, progress)
        base_lr, steps_grid = (cfg.reptile_lr, (cfg.reptile_steps,)) if name == "reptile" else (cfg.inner_lr, (cfg.inner_steps,))
        grid = [base_lr * m for m in cfg.lr_grid]
        steps, lr, _ = _choose_lr(model, data, _ADAPT[name], steps_grid, grid)
        return model_method(name, model, data, _ADAPT[name], steps, lr, time.perf_counter() - t0,
                             {"best_epoch": log.best_epoch, "val_mae": log.val_mae})

    # protonet
    net = ProtoNet(make_model(data, seed)).to(data.device)
    log = train_protonet(net, data, seed, progress)
    cm = _class_means(r)

    def predict(et, catalogue):
        with torch.no_grad():
            q, c = proto_predict(net, et, cm, _catalogue_x(data, et.user_ids) if catalogue else None)
        return _np(q), _np(c)
    return Fitted(name, predict, time.perf_counter() - t0, {"best_epoch": log.best_epoch, "class_means": cm, "model": net})


def _cpu(et: EpisodeTensors) -> EpisodeTensors:
    return EpisodeTensors(et.user_ids, *(getattr(et, f).cpu() for f in
                          ("x_support", "y_support", "mask_support", "x_query", "y_query", "mask_query")))


# --------------------------------------------------------------------------------------------
# Evaluation and summary
# --------------------------------------------------------------------------------------------

METRICS: tuple[str, ...] = ("mae", "rmse", "ndcg@1", "ndcg@3", "hr@10", "ndcg@10")


def evaluate(fitted: Fitted, data: ColdStartData, et: EpisodeTensors | None = None, catalogue: bool = True) -> pd.DataFrame:
    """Per-user metrics of a fitted method on the test episodes (or ``et``).

    Returns:
        DataFrame, one row per user: ``user_id``, ``mae``, ``mse``, ``ndcg@1``, ``ndcg@3`` and,
        with ``catalogue``, ``hr@10``, ``ndcg@10`` (NaN for users without a query item rated >= 4),
        ``n_relevant``. Predictions are clipped to the training rating range.
    """
    et = data.test if et is None else et
    q, c = fitted.predict(et, catalogue)
    lo, hi = data.rating_range
    q = np.clip(q, lo, hi)
    y = et.y_query.double().cpu().numpy()
    m = et.mask_query.cpu().numpy()
    n = m.sum(1)
    err = np.where(m, q - y, 0.0)
    out = pd.DataFrame({
        "user_id": et.user_ids,
        "mae": np.abs(err).sum(1) / n,
        "mse": (err ** 2).sum(1) / n,
        "ndcg@1": metrics.ndcg_at_k_batch(np.where(m, y, 0), np.where(m, q, 0), 1, ties="average", mask=m),
        "ndcg@3": metrics.ndcg_at_k_batch(np.where(m, y, 0), np.where(m, q, 0), 3, ties="average", mask=m),
    })
    if catalogue:
        T = len(et)
        rel = np.zeros((T, data.features.n_items), dtype=bool)
        exc = np.zeros_like(rel)
        qi = et.x_query[..., 0].cpu().numpy()
        si = et.x_support[..., 0].cpu().numpy()
        ms = et.mask_support.cpu().numpy()
        for t in range(T):
            rel[t, qi[t][m[t] & (y[t] >= LIKE_THRESHOLD)]] = True
            exc[t, si[t][ms[t]]] = True
        top = metrics.topk_metrics(c, rel, exclude=exc, k=10)
        has = top["n_relevant"] > 0
        out["hr@10"] = np.where(has, top["hr"], np.nan)
        out["ndcg@10"] = np.where(has, top["ndcg"], np.nan)
        out["n_relevant"] = top["n_relevant"].astype(np.int64)
    return out


def _diff_ci(a: pd.Series, b: pd.Series, seed: int) -> metrics.BootstrapResult | None:
    ok = a.notna() & b.notna()
    if ok.sum() < 2:
        return None
    return metrics.paired_bootstrap_ci(a[ok].to_numpy(), b[ok].to_numpy(), n_boot=2000, seed=seed)


def summarize(per_user: pd.DataFrame, reference: dict[str, str] | None = None, seed: int = 0) -> pd.DataFrame:
    """One row per method: metric means over all (seed, user) pairs and paired bootstrap intervals.

    Args:
        per_user: rows ``seed, method, user_id`` and the columns of :func:`evaluate`.
        reference: ``{"mae": method, "ndcg@10": method}``; default: the best non-meta baseline
            present (lowest MAE, highest nDCG@10), chosen on these test numbers.
        seed: seed of the bootstrap.

    Returns:
        DataFrame indexed by method with ``MAE, RMSE, nDCG@1, nDCG@3, HR@10, nDCG@10``, ``MAE sd``
        (standard deviation of the per-seed MAE), ``dMAE`` and ``dMAE low/high`` (difference to the
        reference with its 95% interval; negative = lower error), ``dnDCG@10`` and its interval,
        ``users`` (evaluated (seed, user) pairs) and ``fit s`` (mean seconds to fit).
        ``.attrs["reference"]`` names the references.
    """
    need = {"seed", "method", "user_id", "mae", "mse"}
    if not need <= set(per_user.columns):
        raise ValueError(f"per_user needs the columns {sorted(need)}.")
    methods = [m for m in METHODS if m in set(per_user["method"])]
    g = per_user.groupby("method")
    rows = {}
    for m in methods:
        d = g.get_group(m)
        rows[m] = {
            "MAE": d["mae"].mean(), "RMSE": math.sqrt(d["mse"].mean()),
            "nDCG@1": d["ndcg@1"].mean(), "nDCG@3": d["ndcg@3"].mean(),
            "HR@10": d["hr@10"].mean() if "hr@10" in d else np.nan,
            "nDCG@10": d["ndcg@10"].mean() if "ndcg@10" in d else np.nan,
            "MAE sd": d.groupby("seed")["mae"].mean().std(ddof=1) if d["seed"].nunique() > 1 else np.nan,
            "users": len(d), "fit s": d["fit_seconds"].groupby(d["seed"]).first().mean() if "fit_seconds" in d else np.nan,
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    base = [m for m in BASELINES if m in rows]
    if reference is None:
        reference = {}
        if base:
            reference["mae"] = train.pick_best(base, lambda m: rows[m]["MAE"], maximize=False)
            if "ndcg@10" in per_user and not all(np.isnan(rows[m]["nDCG@10"]) for m in base):
                reference["ndcg@10"] = train.pick_best(base, lambda m: np.nan_to_num(rows[m]["nDCG@10"], nan=-1))
    key = ["seed", "user_id"]
    for metric, col in (("mae", "dMAE"), ("ndcg@10", "dnDCG@10")):
        ref = reference.get(metric)
        if ref is None:
            continue
        r = g.get_group(ref).set_index(key)[metric]
        for m in methods:
            a = g.get_group(m).set_index(key)[metric].reindex(r.index)
            ci = _diff_ci(a, r, seed)
            table.loc[m, col] = np.nan if ci is None else ci.estimate
            table.loc[m, f"{col} low"] = np.nan if ci is None else ci.low
            table.loc[m, f"{col} high"] = np.nan if ci is None else ci.high
    table.index.name = "method"
    table.attrs["reference"] = dict(reference)
    return table


def format_table(summary: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """The summary as the book prints it: rounded metrics, differences with their 95% intervals
    as text (``-0.046 [-0.071, -0.022]``), a ``kind`` column (baseline / meta), fit seconds."""
    if not isinstance(summary, pd.DataFrame) or "MAE" not in summary.columns:
        raise TypeError("summary must be the DataFrame returned by summarize().")
    out = pd.DataFrame(index=summary.index)
    out["kind"] = ["meta" if m in META_METHODS else "baseline" for m in summary.index]
    for c in ("MAE", "RMSE", "nDCG@1", "nDCG@3", "HR@10", "nDCG@10"):
        out[c] = summary[c].round(digits)
    ref = summary.attrs.get("reference", {})
    for metric, col in (("mae", "dMAE"), ("ndcg@10", "dnDCG@10")):
        if col not in summary.columns:
            continue
        f = f"{{:+.{digits}f}} [{{:+.{digits}f}}, {{:+.{digits}f}}]"
        out[f"{col} vs {ref.get(metric)} [95% CI]"] = [
            "" if m == ref.get(metric) or np.isnan(r[col]) else f.format(r[col], r[f"{col} low"], r[f"{col} high"])
            for m, r in summary.iterrows()
        ]
    out["users"] = summary["users"].astype(int)
    out["fit s"] = summary["fit s"].round(1)
    return out


# --------------------------------------------------------------------------------------------
# The whole experiment
# --------------------------------------------------------------------------------------------


@dataclass
class ColdStartResult:
    """Output of :func:`run_coldstart`.

    Attributes:
        per_user: one row per (seed, method, test user) with the metrics of :func:`evaluate`,
            ``fit_seconds`` and the chosen settings (``chosen``).
        summary: :func:`summarize` of ``per_user``.
        fitted: ``{(seed, method): Fitted}`` (to inspect or reuse a trained method).
        data: ``{seed: ColdStartData}``.
        settings: the run's arguments.
    """

    per_user: pd.DataFrame
    summary: pd.DataFrame
    fitted: dict
    data: dict
    settings: dict


def _load(dataset: Any, data_dir: Any) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, str]:
    from mrec_utils import data as mdata

    if isinstance(dataset, str):
        ml = mdata.load_movielens(dataset, data_dir)
        return ml.ratings, ml.items, ml.users, ml.name
    if isinstance(dataset, mdata.MovieLens):
        return dataset.ratings, dataset.items, dataset.users, dataset.name
    if isinstance(dataset, tuple) and len(dataset) == 3:
        return dataset[0], dataset[1], dataset[2], "custom"
    raise TypeError("dataset must be a release name, a MovieLens object or a (ratings, items, users) tuple.")


def run_coldstart(
    dataset: Any = "ml-latest-small",
    scenario: str = "user-cold",
    shots: int | str = 10,
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] | None = None,
    config: ColdStartConfig | None = None,
    data_dir: Any = None,
    progress: bool = True,
    catalogue: bool = True,
    **split_kwargs: Any,
) -> ColdStartResult:
    """Run the cold-start comparison: every method, every seed, the same episodes.

    Args:
        dataset: a release name for :func:`mrec_utils.data.load_movielens`, a loaded MovieLens,
            or a ``(ratings, items, users)`` tuple of frames in its schema.
        scenario: "user-cold", "item-cold" or "user+item-cold".
        shots: support size k, or "melu" (MeLU's preset).
        seeds: each seed redraws the split, the episodes and the initialisations.
        methods: keys of :data:`METHODS` (default: all, in that order).
        config: :class:`ColdStartConfig` (default: the book's settings).
        catalogue: also compute the full-catalogue HR@10 / nDCG@10.
        split_kwargs: passed to :func:`mrec_utils.tasks.make_split`.

    Returns:
        :class:`ColdStartResult`.
    """
    methods = list(METHODS) if methods is None else list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise ValueError("methods contains duplicates.")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("seeds must be a non-empty list of distinct ints.")
    _check_scenario(scenario)
    shots = _check_shots(shots)
    cfg = ColdStartConfig() if config is None else config
    ratings, items, users, name = _load(dataset, data_dir)
    rows, fitted, datas = [], {}, {}
    bar = train.progress(total=len(seeds) * len(methods), desc="cold-start", disable=not progress)
    for seed in seeds:
        d = prepare_data(ratings, items, users, scenario, shots, seed, cfg, **split_kwargs)
        datas[seed] = d
        cache: dict = {}
        for m in methods:
            bar.set_postfix_str(f"seed {seed} {m}")
            f = fit_method(m, d, cache)
            ev = evaluate(f, d, catalogue=catalogue)
            ev.insert(0, "method", m)
            ev.insert(0, "seed", seed)
            ev["fit_seconds"] = f.seconds
            ev["chosen"] = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in f.info.items()
                                     if k in ("adapt", "steps", "inner_lr", "foldin_reg", "best_epoch"))
            rows.append(ev)
            fitted[seed, m] = f
            bar.update(1)
    bar.close()
    per_user = pd.concat(rows, ignore_index=True)
    settings = dict(dataset=name, scenario=scenario, shots=shots, seeds=seeds, methods=methods,
                    config=dataclasses.asdict(cfg), split_kwargs=split_kwargs)
    return ColdStartResult(per_user, summarize(per_user), fitted, datas, settings)


# ==============================================================================================
# Rating streams: preferences that drift (chapter 6)
# ==============================================================================================
#
# A user's ratings arrive one at a time, in time order. After t ratings a strategy holds some
# parameters phi_t and predicts rating t + 1 (0-based: ``pred[:, t]`` predicts ``y[:, t]`` from
# ``y[:, :t]``; position t = the number of ratings already seen). The strategies:
#
#   static      phi_t = theta                                 (the meta-learned init, never adapted)
#   reset       phi_t = Adapt(theta; ratings 1..t)            (MAML's inner loop on everything seen)
#   window      phi_t = Adapt(theta; ratings t-w+1..t)        (sliding window of the last w)
#   recency     phi_t = Adapt_gamma(theta; ratings 1..t)      (inner loss weighted by gamma^age)
#   continual   phi_t = phi_{t-1} - lr * grad (f(x_t) - r_t)^2, phi_0 = theta   (online SGD)
#
# Adapt = ``steps`` SGD steps of rate ``lr`` on the (weighted) mean squared error, exactly
# :func:`adapt_batch`. The recency-weighted inner loss is
#   L_t(phi) = sum_{j<=t} w~_tj (f_phi(x_j) - r_j)^2,   w~_tj = gamma^(a_tj) / sum_{l<=t} gamma^(a_tl),
# with the age a_tj = t - j (by position) or the days between rating j and rating t (by time).
# :func:`mrec_utils.meta.inner_adapt` takes the *masked mean* (1/n) sum_j loss_j over the n real
# ratings, so :func:`recency_weights` returns n * w~_tj: the masked mean of w * (pred - r)^2 is then
# exactly the weighted loss above, and gamma = 1 gives the plain mean (same step size).

STREAM_STRATEGIES: dict[str, str] = {
    "static": "the meta-learned initialisation, never adapted",
    "reset": "after each rating, re-adapt from the meta-learned init on every rating seen so far",
    "window": "after each rating, re-adapt from the meta-learned init on the last w ratings only",
    "recency": "after each rating, re-adapt from the meta-learned init with inner-loss weights ∝ gamma^age",
    "continual": "keep fine-tuning: one SGD step on each new rating from the previous adapted state",
}
"""Stream strategies of :func:`replay_streams` and what each does."""

__all__ += ["STREAM_STRATEGIES", "RatingStreams", "make_streams", "recency_weights", "replay_streams",
            "stream_errors", "summarize_streams"]


@dataclass
class RatingStreams:
    """Users' ratings in time order, padded on the right (U users, L slots).

    Attributes:
        user_ids: [U] int64.
        item_ids: [U, L] int64 raw item ids (-1 in padding).
        x: [U, L, C] int64 model input (:meth:`Features.encode`; zeros in padding).
        y: [U, L] ratings (torch default float dtype) (0 in padding).
        mask: [U, L] bool, True on real ratings; every row is a prefix of Trues.
        days: [U, L] float64 days since the user's first rating (0 in padding).
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    days: torch.Tensor

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def lengths(self) -> np.ndarray:
        """[U] int64 number of ratings of each stream."""
        return self.mask.sum(1).cpu().numpy().astype(np.int64)

    def subset(self, idx: Any) -> "RatingStreams":
        """The streams at positions ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64).ravel()
        t = torch.as_tensor(idx, device=self.x.device)
        return RatingStreams(self.user_ids[idx], self.item_ids[idx], self.x[t], self.y[t], self.mask[t], self.days[t])

    def shuffled(self, seed: int = 0) -> "RatingStreams":
        """The same ratings in a random order per user (seeded): a control without drift.

        Each user's ratings are permuted among that user's time slots; ``days`` stays where it
        was (slot j keeps its time), so only the order of the ratings changes.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
        rng = np.random.default_rng(seed)
        L = self.y.shape[1]
        perm = np.tile(np.arange(L), (len(self), 1))
        for u, n in enumerate(self.lengths):
            perm[u, :n] = rng.permutation(n)
        p = torch.as_tensor(perm, device=self.x.device)
        x = torch.gather(self.x, 1, p[..., None].expand_as(self.x))
        return RatingStreams(self.user_ids.copy(), np.take_along_axis(self.item_ids, perm, 1), x,
                             torch.gather(self.y, 1, p), self.mask.clone(), self.days.clone())


def make_streams(features: Features, ratings: pd.DataFrame, users: Any = None, *, max_len: int | None = None,
                 min_len: int = 2, seed: int = 0, device: Any = None) -> RatingStreams:
    """Each user's ratings in time order, encoded for the model.

    MovieLens often stores many ratings of one user with the same second. Such ties are broken
    by a seeded random key (deterministic for a given ``seed``), not by item id: ids follow the
    order in which films entered the catalogue, so an id order would put older films first
    inside every burst. The result does not depend on the row order of ``ratings``.

    Args:
        features: :class:`Features` (its catalogue must contain every rated item).
        ratings: ``user_id``, ``item_id``, ``rating``, ``timestamp``, one row per (user, item).
        users: keep these users, in this order (default: every user, sorted by id).
        max_len: keep each user's *first* ``max_len`` ratings (None: all).
        min_len: users with fewer ratings are an error (a stream needs something to predict).
        seed: seeds the tie-breaking.

    Returns:
        :class:`RatingStreams`.

    Raises:
        ValueError: a requested user without ratings or with fewer than ``min_len``; bad arguments.
    """
    if not isinstance(features, Features):
        raise TypeError(f"features must be a coldstart.Features (build_features), got {type(features).__name__}.")
    df, t = tasks._prepare(ratings)  # validated, sorted by (user, time, item)
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, (int, np.integer)) or max_len < 2):
        raise ValueError(f"max_len must be an int >= 2 or None, got {max_len!r}.")
    if isinstance(min_len, bool) or not isinstance(min_len, (int, np.integer)) or min_len < 1:
        raise ValueError(f"min_len must be an int >= 1, got {min_len!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}.")
    key = np.random.default_rng(seed).random(len(df))
    order = np.lexsort((key, t, df["user_id"].to_numpy()))
    df, t = df.iloc[order].reset_index(drop=True), t[order]
    u = df["user_id"].to_numpy(np.int64)
    all_users = np.unique(u)
    want = all_users if users is None else np.asarray(users, dtype=np.int64).ravel()
    if want.size == 0:
        raise ValueError("users is empty.")
    missing = np.setdiff1d(want, all_users)
    if missing.size:
        raise ValueError(f"users without any rating: {missing[:10].tolist()}.")
    starts, ends = np.searchsorted(u, want, side="left"), np.searchsorted(u, want, side="right")
    n = ends - starts
    if (n < min_len).any():
        bad = want[n < min_len][:10].tolist()
        raise ValueError(f"users {bad} have fewer than min_len={min_len} ratings; drop them or lower min_len.")
    if max_len is not None:
        n = np.minimum(n, int(max_len))
    L = int(n.max())
    rows = np.concatenate([np.arange(s, s + k) for s, k in zip(starts, n)])
    slot = np.concatenate([np.arange(k) for k in n])
    who = np.repeat(np.arange(len(want)), n)
    x_flat = features.encode(u[rows], df["item_id"].to_numpy(np.int64)[rows])
    x = np.zeros((len(want), L, x_flat.shape[1]), dtype=np.int64)
    x[who, slot] = x_flat
    item_ids = np.full((len(want), L), -1, dtype=np.int64)
    item_ids[who, slot] = df["item_id"].to_numpy(np.int64)[rows]
    y = np.zeros((len(want), L), dtype=np.float64)
    y[who, slot] = df["rating"].to_numpy(np.float64)[rows]
    mask = np.zeros((len(want), L), dtype=bool)
    mask[who, slot] = True
    days = np.zeros((len(want), L), dtype=np.float64)
    days[who, slot] = (t[rows] - t[starts][who]) / 86400.0
    dev = torch.device("cpu") if device is None else torch.device(device)
    return RatingStreams(want.copy(), item_ids, torch.as_tensor(x, device=dev), torch.as_tensor(y, dtype=torch.get_default_dtype(), device=dev),
                         torch.as_tensor(mask, device=dev), torch.as_tensor(days, device=dev))


def recency_weights(ages: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-rating weights ``n * gamma^a_j / sum_l gamma^a_l`` over the real ratings of each row.

    Passed to :func:`adapt_batch` (``weights=``), whose inner loss is the masked *mean* of
    ``w_j (pred_j - r_j)^2`` over the ``n`` real ratings, they make that loss the weighted mean
    ``sum_j w~_j (pred_j - r_j)^2`` with ``w~_j = gamma^a_j / sum_l gamma^a_l``.

    Args:
        ages: [..., S] age of each rating (>= 0; e.g. positions or days before the newest).
        mask: [..., S] True on real ratings.
        gamma: decay per unit of age, in (0, 1] (1 = equal weights).

    Returns:
        [..., S] weights (0 in padding; each row with a real rating sums to its count n).
    """
    if not isinstance(ages, torch.Tensor) or not isinstance(mask, torch.Tensor):
        raise TypeError("ages and mask must be tensors.")
    if ages.shape != mask.shape:
        raise ValueError(f"ages {tuple(ages.shape)} and mask {tuple(mask.shape)} must have the same shape.")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating)) or not 0 < float(gamma) <= 1:
        raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}.")
    m = mask.bool()
    a = torch.where(m, ages.double(), torch.zeros((), dtype=torch.float64, device=ages.device))
    if bool((a < 0).any()):
        raise ValueError("ages must be >= 0 (the newest rating has age 0).")
    # gamma^(a - min a) avoids underflow for long histories; the normalisation cancels the shift
    big = torch.full((), float("inf"), dtype=torch.float64, device=a.device)
    a_min = torch.where(m, a, big).amin(-1, keepdim=True)
    a_min = torch.where(m.any(-1, keepdim=True), a_min, torch.zeros_like(a_min))
    zero = torch.zeros((), dtype=torch.float64, device=a.device)
    raw = torch.where(m, float(gamma) ** (a - a_min), zero)
    n = m.sum(-1, keepdim=True).to(torch.float64)
    w = n * raw / raw.sum(-1, keepdim=True).clamp_min(1e-300)
    return w.to(torch.get_default_dtype())


def _check_strategy_args(strategy: str, lr: Any, steps: Any, window: Any, gamma: Any, decay: str) -> None:
    if strategy not in STREAM_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STREAM_STRATEGIES)}.")
    if strategy != "static":
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)) or not float(lr) > 0:
            raise ValueError(f"lr must be a positive number for strategy {strategy!r}, got {lr!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
    if strategy == "window" and (isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1):
        raise ValueError(f"strategy 'window' needs window= an int >= 1 (the last w ratings), got {window!r}.")
    if strategy == "recency":
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating)) or not 0 < float(gamma) <= 1:
            raise ValueError(f"strategy 'recency' needs gamma= a number in (0, 1], got {gamma!r}.")
        if decay not in ("position", "days"):
            raise ValueError(f"decay must be 'position' or 'days', got {decay!r}.")


def _stream_weight_matrix(streams: RatingStreams, idx: torch.Tensor, strategy: str, window: int | None,
                          gamma: float | None, decay: str) -> torch.Tensor:
    """[u, L, L] weights omega[t, j] of rating j in the inner loss after t ratings (rows sum to 1,
    or 0 for t = 0): the normalised weights of :func:`replay_streams`'s re-adapting strategies."""
    mask = streams.mask[idx]
    u, L = mask.shape
    dev = mask.device
    pos = torch.arange(L, device=dev)
    seen = (pos[None, :] < pos[:, None])[None] & mask[:, None, :]  # [u, t, j]: j < t and real
    if strategy == "window":
        seen = seen & (pos[None, :] >= pos[:, None] - int(window))[None]
    if strategy == "recency":
        if decay == "position":
            ages = (pos[:, None] - 1 - pos[None, :]).to(torch.float64).clamp_min(0)[None].expand(u, L, L)
        else:
            d = streams.days[idx].to(dev)
            newest = torch.cat([d[:, :1], d[:, :-1]], 1)  # time of rating t-1 (the newest seen)
            ages = (newest[:, :, None] - d[:, None, :]).clamp_min(0)
        w = recency_weights(ages, seen, float(gamma)).double()
    else:
        w = seen.double()
    n = seen.sum(-1, keepdim=True).clamp_min(1).double()
    return (w / n).to(torch.get_default_dtype())


def _replay_one_step(model, p0, fz, streams: RatingStreams, strategy: str, lr: float, window, gamma, decay,
                     chunk_floats: int = 1 << 24) -> torch.Tensor:
    """Re-adapting strategies with one inner step, all positions at once.

    One SGD step from theta on a weighted mean loss is ``theta - lr * sum_j omega_tj g_j`` with
    ``g_j`` the gradient of rating j's squared error *at theta*: every g_j is computed once and
    the adapted parameters of every position are weighted sums of them. Same numbers as the
    position-by-position loop (tests check it), in a few batched calls.
    """
    x, y, mask = streams.x, streams.y, streams.mask
    U, L = y.shape
    n_par = sum(v.numel() for v in p0.values())
    per = max(1, chunk_floats // max(1, L * n_par))

    def sq_err(p, xx, yy):
        pred = functional_call(model, {**fz, **p}, (xx[None],))
        return meta.mse_loss_per_example(pred, yy[None])[0]

    g_one = torch.func.grad(sq_err)
    out = torch.empty((U, L), dtype=y.dtype, device=y.device)
    for s in range(0, U, per):
        idx = torch.arange(s, min(U, s + per), device=y.device)
        u = len(idx)
        xs, ys = x[idx].reshape(u * L, -1), y[idx].reshape(u * L)
        with torch.no_grad():
            g = vmap(g_one, in_dims=(None, 0, 0))(p0, xs, ys)  # {name: [u*L, ...]}
            omega = _stream_weight_matrix(streams, idx, strategy, window, gamma, decay)  # [u, L, L]
            adapted = {}
            for k, v in p0.items():
                gk = g[k].reshape(u, L, -1)
                step = torch.bmm(omega, gk)  # [u, L, numel]
                adapted[k] = (v.reshape(1, 1, -1) - lr * step).reshape(u * L, *v.shape)
            pred = predict_batch(model, adapted, fz, xs[:, None, :])[:, 0]
        out[idx] = pred.reshape(u, L)
    return out


def replay_streams(
    model: torch.nn.Module,
    params: dict[str, torch.Tensor],
    frozen: dict[str, torch.Tensor],
    streams: RatingStreams,
    strategy: str,
    *,
    lr: float | None = None,
    steps: int = 1,
    window: int | None = None,
    gamma: float | None = None,
    decay: str = "position",
    vectorize: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Replay every stream and predict each rating from the ratings before it.

    Args:
        model, params, frozen: the meta-learned model split by :func:`mrec_utils.meta.split_params`
            (``params`` = what adaptation changes, e.g. ``melu_adapt_spec("head")``).
        streams: :class:`RatingStreams`.
        strategy: a key of :data:`STREAM_STRATEGIES`.
        lr, steps: inner SGD rate and steps (re-adapting strategies); ``continual`` takes one
            step of rate ``lr`` per new rating (``steps`` times).
        window: w, the number of latest ratings ``window`` adapts on.
        gamma, decay: recency weighting (:func:`recency_weights`); ages by ``"position"``
            (``t - j``) or ``"days"`` (days between rating j and the newest seen rating).
        vectorize: with one inner step, compute every position of reset / window / recency at
            once (one step from theta is theta minus lr times a weighted mean of per-rating
            gradients at theta); False replays position by position with :func:`adapt_batch`
            (same numbers up to float rounding; always used for ``steps > 1`` and ``continual``).

    Returns:
        [U, L] predictions (the dtype of ``streams.y``): ``pred[:, t]`` predicts ``y[:, t]`` after the ratings
        ``0..t-1`` (``t = 0``: the unadapted model); NaN in padding. Not clipped.
    """
    _check_strategy_args(strategy, lr, steps, window, gamma, decay)
    if not isinstance(streams, RatingStreams):
        raise TypeError(f"streams must be RatingStreams (make_streams), got {type(streams).__name__}.")
    x, y, mask = streams.x, streams.y, streams.mask
    U, L = y.shape
    out = torch.full((U, L), float("nan"), dtype=y.dtype, device=y.device)
    p0 = {k: v.detach() for k, v in params.items()}
    fz = {k: v.detach() for k, v in frozen.items()}
    with torch.no_grad():
        init = predict_batch(model, {k: v[None].expand(U, *v.shape) for k, v in p0.items()}, fz, x)
    out[:, 0] = init[:, 0]
    if strategy == "static":
        return torch.where(mask, init, out)
    if vectorize and strategy in ("reset", "window", "recency") and int(steps) == 1:
        pred = _replay_one_step(model, p0, fz, streams, strategy, float(lr), window, gamma, decay)
        return torch.where(mask, pred, out)
    pos = torch.arange(L, device=y.device)
    state = {k: v[None].expand(U, *v.shape).clone() for k, v in p0.items()} if strategy == "continual" else None

    def sgd_one(p, xx, yy, mm):
        return meta.inner_adapt(model, p, fz, xx, yy, mm, loss_fn=meta.mse_loss_per_example, steps=steps,
                                inner_lr=lr)

    for t in train.progress(range(1, L), desc=strategy, disable=not progress, leave=False):
        live = mask[:, t]  # streams that have a rating t to predict
        if not bool(live.any()):
            continue
        idx = torch.nonzero(live).squeeze(1)
        if strategy == "continual":
            # one update on the newest rating t-1, from the previous state (only live streams matter)
            sub = {k: v[idx] for k, v in state.items()}
            with torch.no_grad():
                new = vmap(sgd_one)(sub, x[idx, t - 1:t], y[idx, t - 1:t], mask[idx, t - 1:t])
            for k in state:
                state[k][idx] = new[k]
            pred = predict_batch(model, new, fz, x[idx, t:t + 1])[:, 0]
        else:
            seen = mask[idx, :t]
            weights = None
            if strategy == "window":
                seen = seen & (pos[:t] >= t - int(window))
            elif strategy == "recency":
                if decay == "position":
                    ages = (t - 1 - pos[:t]).to(torch.float64).expand(len(idx), t)
                else:
                    d = streams.days[idx.to(streams.days.device), :t].to(y.device)
                    ages = (d[:, -1:] - d).clamp_min(0)
                weights = recency_weights(ages, seen, float(gamma))
            ad = adapt_batch(model, p0, fz, x[idx, :t], y[idx, :t], seen, steps=int(steps), lr=float(lr), weights=weights)
            pred = predict_batch(model, ad, fz, x[idx, t:t + 1])[:, 0]
        out[idx, t] = pred
    return out


def stream_errors(pred: torch.Tensor, streams: RatingStreams, rating_range: tuple[float, float] | None = None) -> np.ndarray:
    """[U, L] float64 absolute errors ``|clip(pred) - y|`` (NaN in padding)."""
    if not isinstance(pred, torch.Tensor) or pred.shape != streams.y.shape:
        raise ValueError(f"pred must be a tensor of shape {tuple(streams.y.shape)} (replay_streams).")
    p = pred.double()
    if rating_range is not None:
        p = p.clamp(float(rating_range[0]), float(rating_range[1]))
    err = (p - streams.y.double()).abs()
    err = torch.where(streams.mask, err, torch.full((), float("nan"), dtype=torch.float64, device=err.device))
    return err.cpu().numpy()


def summarize_streams(errors: dict[str, np.ndarray], bins: Sequence[tuple[int, int | None]],
                      reference: str | None = None, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Mean error per strategy and range of positions, with bootstrap intervals over users.

    Each user contributes one number per bin: the mean of their errors at positions
    ``lo <= t <= hi`` (``hi=None``: no upper end); users without a position in the bin are left
    out. Intervals resample users (:func:`mrec_utils.metrics.bootstrap_ci`); with ``reference``,
    ``diff`` is the paired mean difference to it (:func:`mrec_utils.metrics.paired_bootstrap_ci`;
    negative = lower error than the reference).

    Args:
        errors: ``{strategy: [U, L] errors}`` (:func:`stream_errors`) on the same streams.
        bins: ``[(lo, hi), ...]`` inclusive position ranges.

    Returns:
        DataFrame with ``strategy``, ``bin`` ("lo-hi" or "lo+"), ``lo``, ``hi``, ``users``, ``mean``,
        ``low``, ``high`` and, with a reference, ``diff``, ``diff_low``, ``diff_high``.
    """
    if not isinstance(errors, dict) or not errors:
        raise TypeError("errors must be a non-empty dict {strategy: [U, L] array}.")
    shapes = {k: np.shape(v) for k, v in errors.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"every error array must be [U, L] with the same shape, got {shapes}.")
    if reference is not None and reference not in errors:
        raise ValueError(f"reference {reference!r} is not one of {list(errors)}.")
    if not bins:
        raise ValueError("bins must list at least one (lo, hi) range.")
    L = next(iter(shapes.values()))[1]
    pos = np.arange(L)
    rows = []
    for lo, hi in bins:
        if hi is not None and hi < lo:
            raise ValueError(f"bin ({lo}, {hi}) is empty: hi < lo.")
        sel = (pos >= lo) & (pos <= (L if hi is None else hi))
        label = f"{lo}+" if hi is None else (f"{lo}" if hi == lo else f"{lo}-{hi}")
        per_user = {}
        for k, e in errors.items():
            block = np.asarray(e, dtype=np.float64)[:, sel]
            real = ~np.isnan(block)
            count = real.sum(1)
            total = np.where(real, block, 0.0).sum(1)
            per_user[k] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        for k, v in per_user.items():
            ok = ~np.isnan(v)
            row = {"strategy": k, "bin": label, "lo": lo, "hi": hi, "users": int(ok.sum())}
            if ok.sum() >= 2:
                ci = metrics.bootstrap_ci(v[ok], n_boot=n_boot, seed=seed)
                row.update(mean=ci.estimate, low=ci.low, high=ci.high)
                if reference is not None and k != reference:
                    r = per_user[reference]
                    both = ok & ~np.isnan(r)
                    d = metrics.paired_bootstrap_ci(v[both], r[both], n_boot=n_boot, seed=seed)
                    row.update(diff=d.estimate, diff_low=d.low, diff_high=d.high)
            else:
                row.update(mean=float(v[ok].mean()) if ok.any() else np.nan, low=np.nan, high=np.nan)
            rows.append(row)
    return pd.DataFrame(rows)
