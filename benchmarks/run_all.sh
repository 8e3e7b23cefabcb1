#!/usr/bin/env bash
# Reproduces every file in benchmarks/results/ (chapter 12 loads them; pip ships them as mrec_bench.results).
#
#   bash benchmarks/run_all.sh                                  # a local Dask cluster, one worker per core
#   WORKERS=8 bash benchmarks/run_all.sh                        # another number of local workers
#   SCHEDULER=tcp://host:8786 bash benchmarks/run_all.sh        # an existing Dask cluster (its workers need
#                                                               # this package, MREC_DATA_DIR and the LM)
#   SCHEDULER=serial bash benchmarks/run_all.sh                 # one job after the other, no Dask
#   REPLICATION= bash benchmarks/run_all.sh                     # without the ml-100k replication
#   SKIP_SPEED=1 bash benchmarks/run_all.sh                     # everything but the speed table
#
# The sweep (python -m mrec_bench sweep) runs one job per (data set, scenario, k, seed): chapter 5's ten
# methods fitted once, evaluated and timed, then the same episodes ranked by chapters 7 and 9's methods.
# Every job runs on one thread in float64 and seeds itself, so the files do not depend on where or in which
# order the jobs ran; tests/test_benchmark_results.py re-computes slices and compares them user by user.
# The replication on ml-100k (chapter 12) runs new users with k = 10 only, with the same settings, and chapter
# 7's next-film comparison (python -m mrec_bench nextfilm) runs on both releases with chapter 7's settings.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
REPLICATION=${REPLICATION-ml-100k}
OUTDIR=${OUTDIR:-benchmarks/results}
args=(--out "$OUTDIR")
[[ -n "${SCHEDULER:-}" ]] && args+=(--scheduler "$SCHEDULER")
[[ -n "${WORKERS:-}" ]] && args+=(--workers "$WORKERS")
time $PY -m mrec_bench sweep --datasets ml-latest-small "${args[@]}"
[[ -n "$REPLICATION" ]] && time $PY -m mrec_bench sweep --datasets "$REPLICATION" --scenarios user-cold --ks 10 "${args[@]}"

# Chapter 7's own claim, the next film (leave-last-out over the whole catalogue), with chapter 7's settings
# unchanged: its data set, then the replication's (about 2 and 1 minutes on one thread; nextfilm_* files).
for ds in ml-latest-small $REPLICATION; do
    time $PY -m mrec_bench nextfilm --dataset "$ds" --threads 1 --no-progress --out "$OUTDIR/$ds"
done

# Meta-training speed: vmap vs loop vs higher vs the hand-batched reference. Timings depend on the machine
# and its load; the file records the load averages before and after. Run it on a quiet machine.
[[ "${SKIP_SPEED:-0}" == "1" ]] && exit 0
$PY -m mrec_bench speed --out "$OUTDIR/speed.json"
$PY -c "import json, pandas as pd; pd.DataFrame(json.load(open('$OUTDIR/speed.json'))['results']).to_csv('$OUTDIR/speed.csv', index=False)"
