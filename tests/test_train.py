"""Tests of mrec_utils.train: seeding, device choice, versions line, early stopping, progress."""

import io
import random

import numpy as np
import pytest
import torch

from mrec_utils import train as T


# ----------------------------------------------------------------------------- seeding
def _draw():
    return random.random(), np.random.rand(3), torch.randn(4), torch.randint(0, 1000, (5,))


def test_seed_everything_reproducible():
    T.seed_everything(123)
    a = _draw()
    T.seed_everything(123)
    b = _draw()
    T.seed_everything(124)
    c = _draw()
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert a[0] != c[0]
    assert not torch.equal(a[2], c[2])


def test_seed_everything_model_init_reproducible():
    T.seed_everything(0)
    w1 = torch.nn.Linear(8, 3).weight.detach().clone()
    T.seed_everything(0)
    w2 = torch.nn.Linear(8, 3).weight.detach().clone()
    assert torch.equal(w1, w2)


@pytest.mark.parametrize("bad,err", [(-1, ValueError), (2**32, ValueError), (1.5, ValueError), ("1", ValueError), (True, ValueError)])
def test_seed_everything_bad(bad, err):
    with pytest.raises(err):
        T.seed_everything(bad)


# ----------------------------------------------------------------------------- device
def test_get_device_cpu_and_auto(monkeypatch):
    monkeypatch.delenv("MREC_DEVICE", raising=False)
    assert T.get_device("cpu") == torch.device("cpu")
    assert T.get_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert T.get_device().type == expected
    assert T.get_device("auto").type == expected


def test_get_device_env(monkeypatch):
    monkeypatch.setenv("MREC_DEVICE", "cpu")
    assert T.get_device() == torch.device("cpu")
    monkeypatch.setenv("MREC_DEVICE", "auto")
    assert T.get_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    # an explicit argument wins over the environment
    monkeypatch.setenv("MREC_DEVICE", "definitely-not-a-device")
    assert T.get_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError):
        T.get_device()


def test_get_device_errors(monkeypatch):
    monkeypatch.delenv("MREC_DEVICE", raising=False)
    with pytest.raises(ValueError):
        T.get_device("gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            T.get_device("cuda")
    else:
        with pytest.raises(ValueError):
            T.get_device(f"cuda:{torch.cuda.device_count()}")


def test_versions_line(monkeypatch):
    monkeypatch.setenv("MREC_DEVICE", "cpu")
    line = T.versions()
    assert "\n" not in line
    for part in ("python ", "torch ", "numpy ", "pandas ", "transformers ", "device cpu"):
        assert part in line
    assert f"numpy {np.__version__}" in line


# ----------------------------------------------------------------------------- early stopping
def test_early_stopping_min():
    es = T.EarlyStopping(patience=2, min_delta=0.1)
    # 1.0 best; 0.95 not better by > 0.1 (bad 1); 0.85 better (reset); 0.9, 0.8 bad -> stop
    assert es.step(1.0) is False
    assert es.step(0.95) is False and es.num_bad_steps == 1
    assert es.step(0.85) is False and es.best == 0.85 and es.best_step == 2
    assert es.step(0.9) is False
    assert es.step(0.8) is True
    assert es.best == 0.85 and es.num_bad_steps == es.patience


def test_early_stopping_max_and_tensor_values():
    es = T.EarlyStopping(patience=1, mode="max")
    assert es.step(torch.tensor(0.3)) is False
    assert es.step(np.float64(0.4)) is False
    assert es.best == pytest.approx(0.4)
    assert es.step(0.4) is True  # equal is not an improvement


def test_early_stopping_keeps_and_restores_best_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    es = T.EarlyStopping(patience=2)
    es.step(1.0, model)
    best_w = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)  # training moves the weights ...
    es.step(2.0, model)  # ... and makes the loss worse: best state must not change
    assert torch.equal(es.best_state["weight"], best_w)
    es.restore(model)
    assert torch.equal(model.weight, best_w)
    with pytest.raises(ValueError):
        T.EarlyStopping().restore(model)


def test_early_stopping_keeps_a_dict_of_tensors_and_never_stops_without_patience():
    state = {"w": torch.zeros(3), "lr": torch.ones(())}
    es = T.EarlyStopping(patience=None, mode="max")
    for i, value in enumerate([0.1, 0.5, 0.2, 0.3, 0.5 + 1e-12, 0.4]):  # a gain below TIE_TOL is a tie
        state["w"] += 1.0
        state["lr"] *= 2
        assert es.step(value, state) is False
    assert es.best_step == 1 and es.best == 0.5
    es.restore(state)
    assert state["w"].tolist() == [2.0, 2.0, 2.0] and state["lr"].item() == 4.0


@pytest.mark.parametrize(
    "kw", [dict(mode="best")]
)
def test_early_stopping_bad_args(kw):
    with pytest.raises(ValueError):
        T.EarlyStopping(**kw)


def test_early_stopping_nan():
    with pytest.raises(ValueError, match="NaN"):
        T.EarlyStopping().step(float("nan"))


# ----------------------------------------------------------------------------- progress
def test_progress(monkeypatch):
    monkeypatch.setenv("MREC_NO_PROGRESS", "1")
    bar = T.progress(range(5), desc="x")
    assert list(bar) == [0, 1, 2, 3, 4]
    assert bar.disable and bar.leave is False
    monkeypatch.delenv("MREC_NO_PROGRESS")
    bar = T.progress(range(3), disable=False, file=io.StringIO())
    assert not bar.disable and bar.leave is False
    assert sum(bar) == 3
