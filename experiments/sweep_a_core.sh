#!/usr/bin/env bash
# The core of sweep_a.sh (used for the third seed when the machine was loaded): TreeLoRA's full lambda grid, the
# selection baselines at lambda 200, and the middle of EWC's and O-LoRA's grids.
#   bash experiments/sweep_a_core.sh "2" > sweep_a_core.log
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-2}
OUT=${OUT:-experiments/results/sweep_a_val.jsonl}
COMMON=(--stream wordnet-classil --head label --train-logits task --test-logits seen --validation 0.2 --out "$OUT")
export OMP_NUM_THREADS=1
for seed in $SEEDS; do
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method seqlora --tag val-a
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-a \
    --sweep '[{"reg_lambda":2},{"reg_lambda":20},{"reg_lambda":60},{"reg_lambda":200},{"reg_lambda":600},{"reg_lambda":2000}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-a \
    --sweep '[{"reg_lambda":200,"search":"random"},{"reg_lambda":200,"search":"last"}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora-oracle --tag val-a --sweep '[{"reg_lambda":200}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method ewc --tag val-a \
    --sweep '[{"ewc_lambda":0.1},{"ewc_lambda":1},{"ewc_lambda":10},{"ewc_lambda":100}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method olora --tag val-a \
    --sweep '[{"lambda_orth":0.5},{"lambda_orth":5},{"lambda_orth":50}]'
done
