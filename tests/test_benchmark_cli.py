"""``python -m mrec_bench``: the command line checks its arguments (exit status 2 and a message that says
what to do), and its single commands write what they promise."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mrec_bench import cli

TINY_SET = ["emb_dim=8", "hidden=16,8", "net_epochs=2", "meta_epochs=2", "meta_batch=16", "train_query=10",
            "mf_iters=3", "lr_grid=1.0", "finetune_steps=1,3"]


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
    for pair in ("meta_epochs", "nonsense=1"):
        assert cli.main(["coldstart", "--set", pair]) == 2
        assert "--set expects KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["report", "--results", "/nonexistent/folder"]) == 2
    assert "no coldstart per-user file" in capsys.readouterr().err


def test_config_overrides_are_typed():
    over = cli.config_overrides(["meta_epochs=5", "hidden=32,16", "use_item_id=no", "min_ratings=30", "lr_grid=0.5,1"])
    assert over == {"meta_epochs": 5, "hidden": (32, 16), "use_item_id": False, "min_ratings": 30, "lr_grid": (0.5, 1.0)}
    with pytest.raises(ValueError, match="meta_epochs=five"):
        cli.config_overrides(["meta_epochs=five"])


def test_coldstart_on_ml100k_writes_the_table_and_self_describing_per_user_rows(movielens_dir, tmp_path, capsys):
    out, pu = tmp_path / "res.json", tmp_path / "pu.csv"
    rc = cli.main(["coldstart", "--dataset", "ml-100k", "--shots", "10", "--seeds", "0", "--threads", "1", "--device", "cpu",
                   "--methods", "global_mean", "net", "melu", "--user-features", "yes", "--set", *TINY_SET,
                   "--no-progress", "--no-catalogue", "--out", str(out), "--per-user", str(pu)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out.read_text())
    assert doc["meta"]["settings"]["dataset"] == "ml-100k" and doc["meta"]["settings"]["config"]["use_user_features"] is True
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
