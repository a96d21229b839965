#!/usr/bin/env bash
# Lambda sweeps on the validation split of stream (a): class-incremental WordNet supersenses on MiniLM, frozen
# label-embedding head, current-task logits in training, every seen class at test. One seed per pass so that partial
# results are usable; one single-threaded process at a time.
#   bash experiments/sweep_a.sh "0 1 2" > sweep_a.log
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0}
OUT=${OUT:-experiments/results/sweep_a_val.jsonl}
COMMON=(--stream wordnet-classil --head label --train-logits task --test-logits seen --validation 0.2 --out "$OUT")
export OMP_NUM_THREADS=1
for seed in $SEEDS; do
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method seqlora --tag val-a
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-a \
    --sweep '[{"reg_lambda":2},{"reg_lambda":20},{"reg_lambda":60},{"reg_lambda":200},{"reg_lambda":600},{"reg_lambda":2000}]'
  for search in random last; do
    python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-a \
      --sweep "[{\"reg_lambda\":60,\"search\":\"$search\"},{\"reg_lambda\":200,\"search\":\"$search\"},{\"reg_lambda\":600,\"search\":\"$search\"}]"
  done
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora-oracle --tag val-a \
    --sweep '[{"reg_lambda":60},{"reg_lambda":200},{"reg_lambda":600}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method ewc --tag val-a \
    --sweep '[{"ewc_lambda":1},{"ewc_lambda":10},{"ewc_lambda":100},{"ewc_lambda":1000},{"ewc_lambda":10000},{"ewc_lambda":100000}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method olora --tag val-a \
    --sweep '[{"lambda_orth":0.05},{"lambda_orth":0.5},{"lambda_orth":5},{"lambda_orth":50},{"lambda_orth":500}]'
done
