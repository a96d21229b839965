#!/usr/bin/env bash
# Variants of TreeLoRA on the validation split of stream (a) (same protocol as sweep_a.sh): the stacked-adapter
# reading, the official preset, a gradient-space (A-GEM-style) regularizer, the anchor's choice (first task) and the
# A-frozen limit; plus the low end of EWC's lambda grid.
#   bash experiments/sweep_v.sh "0" > sweep_v.log
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${1:-0}
OUT=${OUT:-experiments/results/sweep_v_val.jsonl}
COMMON=(--stream wordnet-classil --head label --train-logits task --test-logits seen --validation 0.2 --out "$OUT")
export OMP_NUM_THREADS=1
for seed in $SEEDS; do
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-v \
    --sweep '[{"adapter":"stacked","reg_lambda":2},{"adapter":"stacked","reg_lambda":20},{"adapter":"stacked","reg_lambda":200}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora --tag val-v \
    --sweep '[{"preset":"official","reg_lambda":0.05},{"preset":"official","reg_lambda":0.5},{"preset":"official","reg_lambda":5}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora-agem --tag val-v \
    --sweep '[{"agem_strength":1},{"agem_strength":1,"agem_target":"all"},{"agem_strength":10}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora-first --tag val-v --sweep '[{"reg_lambda":200}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method seqlora-freeze-a --tag val-v
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora-diag --tag val-v-diag \
    --sweep '[{"reg_lambda":200},{"reg_lambda":200,"lcb_c":0.1}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method treelora-greedy --tag val-v-diag \
    --sweep '[{"reg_lambda":200}]'
  python experiments/run.py "${COMMON[@]}" --seeds "$seed" --method ewc --tag val-a \
    --sweep '[{"ewc_lambda":0.01},{"ewc_lambda":0.1}]' --out experiments/results/sweep_a_val.jsonl
done
