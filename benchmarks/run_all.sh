#!/usr/bin/env bash
# Reproduces every file in benchmarks/results/ (chapter 10 loads them).
#
#   bash benchmarks/run_all.sh                      # ml-latest-small, sequential
#   PARALLEL=1 bash benchmarks/run_all.sh           # one process per (scenario, k)
#   SKIP_SPEED=1 bash benchmarks/run_all.sh         # everything but the speed table
#   DATASET=ml-100k OUTDIR=benchmarks/results-ml-100k bash benchmarks/run_all.sh
#   SKIP_RANKING=1 bash benchmarks/run_all.sh       # without chapters 7 and 8 (the ranking runs)
#   ONLY_RANKING=1 bash benchmarks/run_all.sh       # only the ranking runs (after a change to chapter 7 or 8's code)
#
# Every run uses one thread (--threads 1): single-threaded CPU runs are bit-reproducible, and
# tests/test_benchmark_results.py re-computes one slice and compares it with the files.
# All ten methods of chapter 5 run in every scenario, in two passes per (scenario, k): METHODS, then
# MORE (the order does not change any number: every method is seeded on its own). MORE= skips the
# second pass (a quicker sweep of six methods).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATASET=${DATASET:-ml-latest-small}
OUTDIR=${OUTDIR:-benchmarks/results}
SEEDS="0 1 2"
METHODS=${METHODS:-"global_mean item_mean mf_foldin net net_finetune melu"}
mkdir -p "$OUTDIR"

# A setting the release cannot supply (on ml-latest-small: user+item-cold with k = 20, where one
# seed leaves a single validation user with 20 + 10 ratings of new films) fails with a message
# and is skipped; the report covers the files that exist.
run_one() {  # scenario, file slug, k
    $PY -m mrec_utils.benchmark coldstart --dataset "$DATASET" --scenario "$1" --shots "$3" --seeds $SEEDS \
        --methods $METHODS --threads 1 --no-progress \
        --out "$OUTDIR/coldstart_$2_k$3.json" --per-user "$OUTDIR/coldstart_$2_k$3""_per_user.csv" \
        || echo "skipped $1 k=$3 (see the error above)"
}

cost() {
    $PY -m mrec_utils.benchmark cost --dataset "$DATASET" --scenario user-cold --shots 10 --seeds 0 \
        --methods $METHODS $MORE --threads 1 --out "$OUTDIR/cost.csv"
}

# Chapter 5's other four meta-learners run as a second pass with files of their own (same seeds,
# hence the same episodes; the report merges the two).
MORE=${MORE:-"maml fomaml reptile protonet"}
run_more() {  # scenario, file slug, k
    [[ -n "$MORE" ]] || return 0
    $PY -m mrec_utils.benchmark coldstart --dataset "$DATASET" --scenario "$1" --shots "$3" --seeds $SEEDS \
        --methods $MORE --threads 1 --no-progress \
        --out "$OUTDIR/coldstart_$2-more_k$3.json" --per-user "$OUTDIR/coldstart_$2-more_k$3""_per_user.csv" \
        || echo "skipped $1 k=$3 (see the error above)"
}

SETTINGS="user-cold:user-cold item-cold:item-cold user+item-cold:user-item-cold"
if [[ "${ONLY_RANKING:-0}" == "1" ]]; then
    :  # chapter 5's runs are kept as they are
elif [[ "${PARALLEL:-0}" == "1" ]]; then  # one process per (scenario, k) and one for the cost table
    for sc in $SETTINGS; do
        for k in 5 10 20; do
            run_one "${sc%%:*}" "${sc##*:}" "$k" > "$OUTDIR/log_${sc##*:}_k$k.txt" 2>&1 &
        done
    done
    cost > "$OUTDIR/log_cost.txt" 2>&1 &
    wait
    for sc in $SETTINGS; do
        for k in 5 10 20; do
            run_more "${sc%%:*}" "${sc##*:}" "$k" > "$OUTDIR/log_${sc##*:}-more_k$k.txt" 2>&1 &
        done
    done
    wait
else
    for sc in $SETTINGS; do
        for k in 5 10 20; do run_one "${sc%%:*}" "${sc##*:}" "$k"; done
    done
    for sc in $SETTINGS; do
        for k in 5 10 20; do run_more "${sc%%:*}" "${sc##*:}" "$k"; done
    done
    cost
fi

# The results table of chapter 10 (mean and 95% interval per scenario x k x method).
[[ "${ONLY_RANKING:-0}" == "1" ]] || $PY -m mrec_utils.benchmark report --results "$OUTDIR" --out "$OUTDIR/coldstart_report.csv"

# Chapters 5, 7 and 8 on the same episodes: every method ranks each test user's query films
# (in-query nDCG@3, like/dislike AUC). Same scenarios, k and seeds as above, hence the same episodes;
# chapter 8's LM text embeddings are cached on disk (MREC_CACHE_DIR).
run_ranking() {  # scenario, file slug, k
    $PY -m mrec_utils.benchmark ranking --dataset "$DATASET" --scenario "$1" --shots "$3" --seeds $SEEDS \
        --threads 1 --no-progress \
        --out "$OUTDIR/ranking_$2_k$3.json" --per-user "$OUTDIR/ranking_$2_k$3""_per_user.csv" \
        || echo "skipped ranking $1 k=$3 (see the error above)"
}
if [[ "${SKIP_RANKING:-0}" != "1" ]]; then
    if [[ "${PARALLEL:-0}" == "1" ]]; then
        for sc in $SETTINGS; do
            for k in 5 10 20; do
                run_ranking "${sc%%:*}" "${sc##*:}" "$k" > "$OUTDIR/log_ranking_${sc##*:}_k$k.txt" 2>&1 &
            done
        done
        wait
    else
        for sc in $SETTINGS; do
            for k in 5 10 20; do run_ranking "${sc%%:*}" "${sc##*:}" "$k"; done
        done
    fi
    $PY -m mrec_utils.benchmark ranking-report --results "$OUTDIR" --out "$OUTDIR/ranking_report.csv"
fi

# Meta-training speed: vmap vs loop vs higher (timings depend on the machine and its load; the
# JSON records the load averages and `uptime`).
[[ "${SKIP_SPEED:-0}" == "1" || "${ONLY_RANKING:-0}" == "1" ]] && exit 0
$PY -m mrec_utils.benchmark speed --out "$OUTDIR/speed.json"
$PY - "$OUTDIR" "$(uptime)" <<'PYEOF'
import json, sys, pandas as pd
out, up = sys.argv[1], sys.argv[2]
doc = json.load(open(f"{out}/speed.json"))
doc["meta"]["uptime_after"] = up.strip()
json.dump(doc, open(f"{out}/speed.json", "w"), indent=2)
pd.DataFrame(doc["results"]).to_csv(f"{out}/speed.csv", index=False)
PYEOF
