"""``python -m mrec_bench``: the command line checks its arguments (exit status 2 and a message that says
what to do), and its single commands write what they promise."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mrec_bench import cli
from mrec_utils import coldstart

TINY_SET = ["net.emb_dim=8", "net.hidden=16,8", "net.epochs=2", "meta.epochs=2", "meta.batch=16", "episodes.train_query=10",
            "baselines.mf_iters=3", "meta.lr_grid=1.0", "baselines.finetune_steps=1,3"]


@pytest.mark.parametrize("argv, match", [
    (["sweep", "--workers", "0"], "expected an integer >= 1, got '0'"),
    (["sweep", "--datasets", "ml-7"], "invalid choice: 'ml-7'"),
    (["sweep", "--scenarios", "sideways"], "invalid choice: 'sideways'"),
    (["sweep", "--ks", "five"], "expected an integer >= 1, got 'five'"),
    (["coldstart", "--out", "table.txt"], "must end in .csv or .json"),
    (["coldstart", "--per-user", "users.json"], "must end in .csv"),
    (["cost", "--repeats", "-1"], "expected an integer >= 1"),
    (["speed", "--methods", "jit"], "invalid choice: 'jit'"),
    (["nonsense"], "invalid choice: 'nonsense'"),
])
def test_bad_arguments_exit_2_with_a_message(argv, match, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and match in capsys.readouterr().err


def test_bad_values_found_later_exit_2_with_a_message(capsys):
    for pair in ("meta.epochs", "meta_epochs=5", "nonsense=1"):
        assert cli.main(["coldstart", "--set", pair]) == 2
        assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["report", "--results", "/nonexistent/folder"]) == 2
    assert "no coldstart per-user file" in capsys.readouterr().err


def test_config_overrides_are_typed():
    over = cli.config_overrides(["meta.epochs=5", "net.hidden=32,16", "net.use_item_id=no", "episodes.min_ratings=30",
                                 "meta.lr_grid=0.5,1", "device=cpu", "episodes.min_ratings=none"][:-1])
    assert over == {"meta.epochs": 5, "net.hidden": (32, 16), "net.use_item_id": False, "episodes.min_ratings": 30,
                    "meta.lr_grid": (0.5, 1.0), "device": "cpu"}
    assert cli.config_overrides(["episodes.min_ratings=none"]) == {"episodes.min_ratings": None}
    s = coldstart.ColdStartSettings().replace(**over)
    assert s.meta.epochs == 5 and s.net.hidden == (32, 16) and s.episodes.min_ratings == 30 and s.device == "cpu"
    with pytest.raises(ValueError, match="meta.epochs=five"):
        cli.config_overrides(["meta.epochs=five"])


def test_coldstart_on_ml100k_writes_the_table_and_self_describing_per_user_rows(movielens_dir, tmp_path, capsys):
    out, pu = tmp_path / "res.json", tmp_path / "pu.csv"
    rc = cli.main(["coldstart", "--dataset", "ml-100k", "--shots", "10", "--seeds", "0", "--threads", "1", "--device", "cpu",
                   "--methods", "global_mean", "net", "melu", "--user-features", "yes", "--set", *TINY_SET,
                   "--no-progress", "--no-catalogue", "--out", str(out), "--per-user", str(pu)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out.read_text())
    assert doc["meta"]["settings"]["dataset"] == "ml-100k" and doc["meta"]["settings"]["settings"]["net"]["use_user_features"] is True
    assert [r["method"] for r in doc["results"]] == ["global_mean", "net", "melu"] and "melu" in printed
    rows = pd.read_csv(pu)
    assert list(rows.columns[:5]) == ["scenario", "k", "seed", "method", "user_id"] and set(rows.k) == {10}
    assert cli.main(["report", "--results", str(pu)]) == 0
    assert "melu" in capsys.readouterr().out
    assert cli.main(["coldstart", "--dataset", "ml-100k", "--shots", "200", "--seeds", "0", "--methods", "global_mean"]) == 2
    assert "lower shots" in capsys.readouterr().err


def test_parsers_of_the_other_commands():
    p = cli.build_parser()
    args = p.parse_args(["gpt-meta", "--k", "8", "16", "--methods", "global", "residual", "--folds", "5"])
    assert args.k == [8, 16] and args.methods == ["global", "residual"] and args.folds == 5
    args = p.parse_args(["sweep", "--datasets", "ml-100k", "--ks", "5", "--workers", "3", "--scheduler", "serial"])
    assert args.datasets == ["ml-100k"] and args.ks == [5] and args.workers == 3 and args.scheduler == "serial"
    assert p.parse_args(["coldstart", "--shots", "melu"]).shots == "melu"


def test_gpt_meta_runs_chapter_9s_head_study_and_writes_its_per_user_rows(monkeypatch, tmp_path, capsys):
    """``gpt-meta`` hands its arguments to :func:`mrec_utils.heads.head_study` (replaced here by a stub: the
    study itself is chapter 9's and tests/test_heads.py's) and prints each head's AUC against the global head."""
    import numpy as np

    from mrec_utils import data, heads

    calls = {}

    def fake_study(ml, **kw):
        calls.update(kw, dataset=ml.name)
        rng = np.random.default_rng(0)
        rows = [{"method": m, "k": k, "fold": u % 2, "user_id": u, "auc": rng.uniform(0.4, 0.9), "ndcg@10": 0.5}
                for k in kw["ks"] for m in kw["methods"] for u in range(1, 21)]
        out = pd.DataFrame(rows)
        out.attrs = {"choices": {"finetune": (1, 0.1)}, "split": "Split(...)", "catalogue": 10, "warm films": 8}
        return out

    monkeypatch.setattr(heads, "head_study", fake_study)
    monkeypatch.setattr(data, "load_movielens", lambda name, data_dir=None: data.MovieLens(name, pd.DataFrame(), pd.DataFrame()))
    out = tmp_path / "heads.json"
    assert cli.main(["gpt-meta", "--k", "8", "16", "--methods", "global", "residual", "--folds", "2", "--seed", "3",
                     "--out", str(out)]) == 0
    assert calls == {"methods": ["global", "residual"], "ks": [8, 16], "n_folds": 2, "seed": 3, "llm": None,
                     "dataset": "ml-latest-small"}
    printed = capsys.readouterr().out
    assert "AUC - global [95%]" in printed and "residual" in printed and "choices {'finetune': (1, 0.1)}" in printed
    doc = json.loads(out.read_text())
    assert doc["meta"]["catalogue"] == 10 and len(doc["results"]) == 2 * 2 * 20 and {r["k"] for r in doc["results"]} == {"8", "16"}
