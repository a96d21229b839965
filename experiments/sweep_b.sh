#!/usr/bin/env bash
# Stream (b): class-incremental instruction stream on SmolLM2-135M (4 tasks, same question, task-specific answers,
# 16-way multiple choice). Lambda sweep on the validation split (seed 0: a run takes ~5 minutes on one thread).
#   bash experiments/sweep_b.sh "0" > sweep_b.log
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0}
OUT=${OUT:-experiments/results/sweep_b_val.jsonl}
COMMON=(--stream wordnet-instruct-classil --model smollm2-135m --epochs 1 --batch-size 8 --lr 3e-3 --max-length 32
        --validation 0.2 --out "$OUT")
export OMP_NUM_THREADS=1
for seed in $SEEDS; do
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method seqlora --tag val-b
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-b \
    --sweep '[{"reg_lambda":2},{"reg_lambda":20},{"reg_lambda":200},{"reg_lambda":2000}]'
done
