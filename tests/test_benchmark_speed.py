"""Fast checks of ``python -m mrec_bench speed`` (tiny sizes, one timed round)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from mrec_bench import cli, speed
from mrec_utils.tasks import TaskBatch

HAS_HIGHER = importlib.util.find_spec("higher") is not None
TINY = dict(input_dim=6, hidden=5, n_tasks=3, n_support=4, n_query=3, steps=2, warmup=0, repeats=1)

COLUMNS = ["method", "description", "order", "meta_steps_per_s", "median_ms", "min_ms", "max_ms",
           "median_cpu_ms", "speedup_vs_higher", "grad_max_abs_diff", "grad_rel_diff"]


def test_speed_benchmark_table_and_gradient_agreement():
    methods = ["vmap", "loop", "vmap_first_order", "bmm"] + (["higher"] if HAS_HIGHER else [])
    df = speed.speed_benchmark(methods=methods, **TINY)
    assert list(df.columns) == COLUMNS
    assert list(df["method"]) == methods
    assert (df["meta_steps_per_s"] > 0).all() and (df["median_ms"] > 0).all()
    assert dict(zip(df["method"], df["order"]))["vmap_first_order"] == "first"
    others = df[df["method"] != "loop"]
    assert (others["grad_max_abs_diff"] < 1e-4).all() and (others["grad_rel_diff"] < 1e-4).all()
    assert math.isnan(float(df.loc[df["method"] == "loop", "grad_rel_diff"].iloc[0]))
    if HAS_HIGHER:
        assert float(df.loc[df["method"] == "higher", "speedup_vs_higher"].iloc[0]) == pytest.approx(1.0)
    assert df.attrs["config"]["n_tasks"] == 3 and df.attrs["device"] == "cpu"


def test_speed_gradients_really_compared():
    """The agreement columns must detect a different algorithm: first order vs second order."""
    from mrec_utils import meta

    torch.manual_seed(0)
    model = speed.melu_mlp(6, 5)
    batch = TaskBatch(**speed.random_batch(3, 4, 3, 6, 0, torch.device("cpu"), torch.get_default_dtype()))
    p, f = meta.split_params(model)
    kw = dict(loss_fn=meta.mse_loss_per_example, steps=2, inner_lr=0.5)
    _, g2 = meta.meta_gradient(model, p, f, batch, **kw)
    _, g1 = meta.meta_gradient(model, p, f, batch, first_order=True, **kw)
    assert speed.grad_diff(g1, g2)[1] > 1e-4


def test_cli_speed_writes_json_and_csv(tmp_path, capsys):
    for name in ("speed.json", "speed.csv"):
        out = tmp_path / name
        rc = cli.main(["speed", "--input-dim", "6", "--hidden", "5", "--tasks", "2", "--support", "3",
                             "--query", "2", "--steps", "1", "--warmup", "0", "--repeats", "1",
                             "--methods", "vmap", "loop", "--out", str(out)])
        assert rc == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "vmap / loop throughput" in printed and "load avg" in printed
    data = json.loads((tmp_path / "speed.json").read_text())
    assert [r["method"] for r in data["results"]] == ["vmap", "loop"] and "loadavg_before" in data["meta"]


def test_speed_benchmark_rejects_bad_arguments():
    with pytest.raises(ValueError, match="methods"):
        speed.speed_benchmark(methods=["fast"], **TINY)
    with pytest.raises(ValueError, match="repeats"):
        speed.speed_benchmark(**dict(TINY, repeats=0))
    with pytest.raises(SystemExit):
        cli.main(["nonsense"])


def test_hand_batched_reference_is_the_second_order_meta_gradient():
    """(e) accumulates the same meta-gradient as the plain loop, in float64 to tight tolerance."""
    from mrec_utils import meta

    torch.manual_seed(1)
    model = speed.melu_mlp(6, 5).double()
    batch = speed.random_batch(4, 5, 3, 6, 1, torch.device("cpu"), torch.float64)
    p, f = meta.split_params(model)
    kw = dict(loss_fn=meta.mse_loss_per_example, steps=3, inner_lr=0.3)
    loss, ref = meta.meta_gradient(model, p, f, TaskBatch(**batch), vectorize=False, **kw)
    got_loss = speed.bmm_backward(model, batch, 3, 0.3)
    assert float(got_loss) == pytest.approx(float(loss), rel=1e-12)
    got = speed.grad_dict(model)
    abs_d, rel_d = speed.grad_diff(got, ref)
    assert rel_d < 1e-10, (abs_d, rel_d)
    _, fo = meta.meta_gradient(model, p, f, TaskBatch(**batch), first_order=True, **kw)
    assert speed.grad_diff(got, fo)[1] > 1e-4  # and it is not the first-order one
