#!/usr/bin/env bash
# Stream (c): class-incremental split-digits on vit-tiny (frozen random orthonormal class vectors, current-task
# logits in training, every seen class at test). Lambda sweeps on the validation split, then the chosen settings
# on test are run by the caller.
#   bash experiments/sweep_c.sh "0 1 2" > sweep_c.log
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0}
OUT=${OUT:-experiments/results/sweep_c_val.jsonl}
COMMON=(--stream split-digits --model vit-tiny --head fixed --train-logits task --test-logits seen --epochs 5
        --lr 3e-3 --validation 0.2 --out "$OUT")
export OMP_NUM_THREADS=1
for seed in $SEEDS; do
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method seqlora --tag val-c
  for search in lcb random last; do
    python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-c \
      --sweep "[{\"reg_lambda\":0.2,\"search\":\"$search\"},{\"reg_lambda\":2,\"search\":\"$search\"},{\"reg_lambda\":20,\"search\":\"$search\"},{\"reg_lambda\":200,\"search\":\"$search\"},{\"reg_lambda\":2000,\"search\":\"$search\"}]"
  done
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method seqlora-freeze-a --tag val-c
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method ewc --tag val-c \
    --sweep '[{"ewc_lambda":0.1},{"ewc_lambda":1},{"ewc_lambda":10},{"ewc_lambda":100},{"ewc_lambda":1000}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method olora --tag val-c \
    --sweep '[{"lambda_orth":0.05},{"lambda_orth":0.5},{"lambda_orth":5},{"lambda_orth":50},{"lambda_orth":500}]'
done
