"""Chapter 7's next-film comparison on both releases (``python -m mrec_bench nextfilm``, chapter 12).

The committed files ``benchmarks/results/<release>/nextfilm_*`` are checked here: they cover both releases,
made with chapter 7's settings object, split and protocol unchanged; the report is the aggregate of the
per-user file; the ml-latest-small file holds chapter 7's own numbers (read from the chapter's stored
outputs: its results table, validation choices, glued intervals and verdicts); and re-computing on one
thread reproduces the whole ml-100k file (about 50 s of CPU) and the baselines of the ml-latest-small file
user by user.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mrec_bench import cli, nextfilm, reports, sweep
from mrec_utils import gpt, metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CHAPTER7 = ROOT / "notebooks" / "07_item_gpt.ipynb"
METRICS = list(nextfilm.NEXTFILM_METRICS)
NAMES = {"item-GPT": "item_gpt", "co-occurrence": "cooccurrence", "popularity": "popularity"}  # chapter 7 -> bench

# Tolerance of the live re-computation. Every per-user number is a mean of 10 cases of a function of one
# rank (HR@10, nDCG@10, full catalogue or among 100 sampled films), so it is exact unless a rank moves,
# and one rank moving shifts a user's mean by about 1e-3 or more (nDCG at rank 10 against 11: 0.289 / 10).
# The book computes in float64 at one thread, so no rank moves; 1e-9 only absorbs the order of a float sum.
LIVE_ATOL = 1e-9


def _files(dataset: str) -> dict:
    return {"per_user": reports.read_csv("nextfilm_per_user.csv", dataset, RESULTS),
            "report": reports.read_csv("nextfilm_report.csv", dataset, RESULTS),
            "runs": reports.read_json("nextfilm_runs.json", dataset, RESULTS)}


@pytest.fixture(scope="module", params=sweep.DATASETS)
def files(request) -> dict:
    return {"dataset": request.param, **_files(request.param)}


def _same_per_user(live: pd.DataFrame, filed: pd.DataFrame) -> None:
    key = ["seed", "method", "user_id"]
    a, b = live.set_index(key).sort_index(), filed.set_index(key).sort_index()
    assert list(a.index) == list(b.index), "the live run evaluated other users than the file"
    assert (a["cases"] == b["cases"]).all()
    diff = (a[METRICS] - b[METRICS]).abs()
    moved = diff[(diff > LIVE_ATOL).any(axis=1)]
    assert moved.empty, f"{len(moved)} (method, user) rows moved, e.g.\n{moved.head(8)}"


def _one_thread(fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the committed files were made on one thread
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ the files


def test_files_cover_both_releases_with_chapter_7s_settings(files):
    pu, runs = files["per_user"], files["runs"]
    assert runs["dataset"] == files["dataset"] and set(pu["dataset"]) == {files["dataset"]}
    assert runs["settings"] == json.loads(json.dumps(dataclasses.asdict(gpt.ItemGPTSettings())))  # frozen, unchanged
    assert runs["split"] == nextfilm.SPLIT and runs["k"] == 10 and runs["n_negatives"] == 100
    assert runs["dtype"] == "torch.float64" and runs["threads"] == 1 and runs["seeds"] == [0]
    assert list(pu.columns) == ["dataset", "seed", "method", "user_id", "cases", *METRICS]
    assert list(pu["method"].unique()) == list(nextfilm.NEXTFILM_METHODS)
    users = {m: list(d["user_id"]) for m, d in pu.groupby("method")}
    assert all(u == users["popularity"] for u in users.values()) and users["popularity"] == sorted(users["popularity"])
    [info] = runs["runs"]
    assert len(users["popularity"]) == info["users"]["test"] and (pu["cases"] == gpt.ItemGPTSettings().n_last).all()
    assert pu[METRICS].apply(lambda c: c.between(0, 1)).all().all()
    assert (pu["hr@10"] >= pu["ndcg@10"]).all() and (pu["sampled_hr@10"] >= pu["hr@10"]).all()
    assert info["cooc_window"] in runs["settings"]["cooc_windows"] and info["cooc_last"] in runs["settings"]["cooc_lasts"]
    assert 1 <= info["gpt_best_epoch"] <= info["gpt_epochs_run"] <= runs["settings"]["epochs"]


def test_report_is_the_aggregate_of_the_per_user_file(files):
    again = nextfilm.nextfilm_report(files["per_user"])
    pd.testing.assert_frame_equal(files["report"], again, check_exact=False, rtol=1e-9, atol=1e-12)
    assert set(files["report"]["users"]) == {files["runs"]["runs"][0]["users"]["test"]}


def test_report_intervals_are_chapter_7s(files):
    """With one seed, resampling users as clusters draws the same resamples as chapter 7's bootstrap over
    per-user values (``paired_bootstrap_ci(x, y, n_boot=2000, seed=0)``, no clusters): the same interval."""
    pu, rep = files["per_user"], files["report"].set_index(["metric", "a", "b"])
    for (metric, a, b), row in rep.iterrows():
        x, y = (pu[pu.method == m][metric].to_numpy() for m in (a, b))
        ci = metrics.paired_bootstrap_ci(x, y, n_boot=2000, seed=0)
        assert (row["difference"], row["low"], row["high"]) == pytest.approx((ci.estimate, ci.low, ci.high), abs=1e-12)
        assert row["verdict"] == metrics.verdict(ci, lower_is_better=False, a=a, b=b)


def _chapter7() -> tuple[dict, list[str], str]:
    """Chapter 7's glued values (name -> text/plain), the text outputs of its code cells, and its code."""
    nb = json.loads(CHAPTER7.read_text())
    glued, texts, code = {}, [], []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        code.append("".join(cell["source"]))
        for out in cell.get("outputs", []):
            name = out.get("metadata", {}).get("scrapbook", {}).get("name")
            data = {k.removeprefix(out["metadata"]["scrapbook"].get("mime_prefix", "")): v
                    for k, v in out.get("data", {}).items()} if name else out.get("data", {})
            text = "".join(out.get("text", "") or data.get("text/plain", ""))
            glued.update({name: text} if name else {})
            texts.append(text)
    return glued, texts, "\n".join(code)


def test_ml_latest_small_file_holds_chapter_7s_numbers():
    f = _files("ml-latest-small")
    glued, texts, _ = _chapter7()
    # the results table of the test users (three decimals)
    [table] = [t for t in texts if "full HR@10" in t and "sampled nDCG@10" in t]
    means = f["per_user"].groupby("method")[METRICS].mean()
    for line in table.splitlines()[1:]:
        name, *values = re.split(r"\s{2,}", line.strip())
        assert [float(v) for v in values] == list(means.loc[NAMES[name]].round(3)), name
    # what validation chose
    info = f["runs"]["runs"][0]
    assert any(f"window w = {info['cooc_window']}, last m = {info['cooc_last']}" in t for t in texts)
    assert any(f"best epoch {info['gpt_best_epoch']} of {info['gpt_epochs_run']}" in t for t in texts)
    # the glued verdicts and intervals of the chapter's prose
    rep = f["report"].set_index(["metric", "a", "b"])
    for short, (a, b) in {"gpt_pop": ("item_gpt", "popularity"), "gpt_cooc": ("item_gpt", "cooccurrence"),
                          "cooc_pop": ("cooccurrence", "popularity")}.items():
        row = rep.loc["ndcg@10", a, b]
        assert glued[f"ch07_{short}_ci"] == repr(f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]")
        words = {v: k for k, v in NAMES.items()}
        assert glued[f"ch07_{short}"] == repr(row["verdict"].replace(a, words[a]).replace(b, words[b]))


def test_the_benchmark_uses_chapter_7s_settings_split_and_protocol():
    """The chapter writes its pipeline inline; the parts the benchmark copies as constants are read back here."""
    _, _, code = _chapter7()
    calls = {}
    for node in ast.walk(ast.parse(re.sub(r"^(\s*)[%!].*$", r"\1pass", code, flags=re.M))):  # IPython magics
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            calls.setdefault(node.func.attr, []).append(node)
    [settings] = calls["ItemGPTSettings"]
    assert not settings.args and not settings.keywords  # the defaults, unchanged
    [split] = calls["make_split"]
    kw = {k.arg: ast.literal_eval(k.value) for k in split.keywords if k.arg != "seed"}
    assert {"scenario": ast.literal_eval(split.args[1]), **kw} == nextfilm.SPLIT
    [test_eval] = [c for c in calls["evaluate_next_item"] if any(k.arg == "n_negatives" and
                                                                 isinstance(k.value, ast.Constant) and k.value.value for k in c.keywords)]
    kw = {k.arg: k.value.value for k in test_eval.keywords if isinstance(k.value, ast.Constant)}
    assert (kw["k"], kw["n_negatives"]) == (nextfilm.K, nextfilm.N_NEGATIVES)
    assert "cooc_windows=SETTINGS.cooc_windows + (20, 50), cooc_lasts=SETTINGS.cooc_lasts + (20,)" in code  # WIDER_GRID
    assert nextfilm.WIDER_GRID == {"cooc_windows": (20, 50), "cooc_lasts": (20,)}


def test_run_all_script_and_command_line():
    text = (ROOT / "benchmarks" / "run_all.sh").read_text()
    assert "-m mrec_bench nextfilm" in text and "for ds in ml-latest-small $REPLICATION" in text
    args = cli.build_parser().parse_args(["nextfilm", "--dataset", "ml-100k", "--methods", "popularity", "item_gpt", "--out", "x"])
    assert args.dataset == "ml-100k" and args.methods == ["popularity", "item_gpt"] and args.seeds == [0] and args.out == "x"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["nextfilm", "--methods", "sasrec"])
    with pytest.raises(ValueError, match="duplicates"):
        nextfilm.nextfilm_benchmark("ml-100k", methods=["popularity", "popularity"])
    with pytest.raises(TypeError, match="ItemGPTSettings"):
        nextfilm.nextfilm_benchmark("ml-100k", settings={"epochs": 3})
    with pytest.raises(ValueError, match="columns"):
        nextfilm.nextfilm_report(pd.DataFrame({"method": ["item_gpt"]}))


# ------------------------------------------------------------------------------------------------ live


def test_live_baselines_of_ml_latest_small_match_the_file(movielens_dir, tmp_path):
    """Popularity and co-occurrence (with its validation choice) of chapter 7's run, through the command line."""
    rc = _one_thread(lambda: cli.main(["nextfilm", "--dataset", "ml-latest-small", "--methods", "popularity", "cooccurrence",
                                       "--data-dir", str(movielens_dir), "--no-progress", "--out", str(tmp_path)]))
    assert rc == 0
    filed = _files("ml-latest-small")
    live = pd.read_csv(tmp_path / "nextfilm_per_user.csv")
    _same_per_user(live, filed["per_user"][filed["per_user"].method != "item_gpt"])
    info, filed_info = json.loads((tmp_path / "nextfilm_runs.json").read_text())["runs"][0], filed["runs"]["runs"][0]
    assert (info["cooc_window"], info["cooc_last"]) == (filed_info["cooc_window"], filed_info["cooc_last"])
    grid, filed_grid = pd.DataFrame(info["cooc_grid"]), pd.DataFrame(filed_info["cooc_grid"])
    pd.testing.assert_frame_equal(grid, filed_grid, check_exact=False, rtol=0, atol=LIVE_ATOL)


def test_live_ml100k_matches_the_file(movielens_dir):
    """The whole ml-100k file: the item-GPT trained again (about 50 s on one thread), same choices, same users."""
    res = _one_thread(lambda: nextfilm.nextfilm_benchmark("ml-100k", data_dir=str(movielens_dir)))
    filed = _files("ml-100k")
    _same_per_user(res.per_user, filed["per_user"])
    info, filed_info = res.runs["runs"][0], filed["runs"]["runs"][0]
    for key in ("cooc_window", "cooc_last", "gpt_best_epoch", "gpt_epochs_run", "vocabulary", "users", "cases"):
        assert info[key] == filed_info[key], key
    assert info["gpt_losses"] == pytest.approx(filed_info["gpt_losses"], rel=1e-9)
    assert np.allclose(list(info["val ndcg@10"].values()), list(filed_info["val ndcg@10"].values()), rtol=0, atol=1e-12)
