#!/usr/bin/env bash
# Verify treelora on one CUDA GPU in a single call of at most 5 minutes: build the CUDA extension if it does not
# import, run the kernel correctness tests on the GPU, benchmark the target shapes only, and write at most 8 files to
# $OUT (default gpu-results/), each step's results as soon as the step ends.
#
#   bash scripts/gpu_verify.sh             # on a GPU machine
#   DRY_RUN=1 bash scripts/gpu_verify.sh   # anywhere: every step checks what it would run (pytest --collect-only)
#
# Steps and their time limits in seconds (each runs under `timeout`, and never past the overall limit TOTAL_S):
#   build   BUILD_S=120  `pip install --no-build-isolation --no-deps -e .` with the machine's nvcc, only when
#                        treelora._C does not import (copying a prebuilt treelora/_C*.so along skips it); the
#                        architecture is the GPU's own (TREELORA_CUDA_ARCHS) and TREELORA_BUILD_JOBS the core count
#   tests   TESTS_S=85   the requires_cuda / Triton kernel tests of the three op families, pytest -n 8 (pytest-xdist)
#   lora    LORA_S=45    LoRA fwd+bwd at M=8192, K=N=4096, r=16, bf16: every provider (torch-base, PEFT, treelora on
#                        each backend) and the side-by-side ratios against the base linear and PEFT
#   sim     SIM_S=25     similarity of a 7B model's signature bank (T=10, L=32, D=1.25M), full and gathered
#   masked  MASKED_S=30  masked AdamW over a 7B model's 448 LoRA tensors at density 0.01 and 1 vs torch's AdamW
#
# Files in $OUT: summary.txt (machine, versions, command, then one line per step with its status, seconds and key
# numbers), build.log (only when building), tests.log, tests.xml (JUnit), bench.log, bench_lora.json,
# bench_similarity.json, bench_masked_update.json. The benchmark JSON files are also written to
# bench/results/<device>/ (bench/conftest.py) and the summary is copied there as gpu_verify.txt.
#
# Offline: nothing is downloaded. Without a GPU (or with DRY_RUN=1) the GPU steps do not run; each says so in the
# summary and collects its selection instead, so a broken selection shows up on any machine.
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${OUT:-gpu-results}"
TOTAL_S="${TOTAL_S:-295}"
BUILD_S="${BUILD_S:-120}"
TESTS_S="${TESTS_S:-85}"
LORA_S="${LORA_S:-45}"
SIM_S="${SIM_S:-25}"
MASKED_S="${MASKED_S:-30}"
# The kernel test files (the requires_cuda and Triton tests of the LoRA, similarity and masked-update families).
KERNEL_TESTS=(tests/test_lora_triton.py tests/test_cuda_lora.py tests/test_similarity.py tests/test_cuda_similarity.py
  tests/test_masked_update.py tests/test_cuda_masked_update.py tests/test_cuda_extension.py)
KERNEL_MARKS="requires_cuda or interpreter"
LORA_SELECT="(test_lora_layer and M8192-K4096-N4096-r16 and full) or test_side_by_side_gpu"
SIM_SELECT="gpu-T10-L32-D1250000"
MASKED_SELECT="(test_masked_adamw and (rho0.01 or rho1) and not eager) or test_torch_adamw"

mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
status=0

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }
# The limit of a step: its own budget, cut to what is left of TOTAL_S (at least 5 s, so a late step still reports).
limit() {
  local left=$((TOTAL_S - $(elapsed)))
  ((left < 5)) && left=5
  ((left < $1)) && echo "$left" || echo "$1"
}
# run_step NAME BUDGET LOG CMD...: the command under `timeout` (SIGINT first, so pytest writes its report, then
# SIGKILL 10 s later), output appended to LOG, one summary line with status and seconds.
run_step() {
  local name=$1 budget=$2 log=$3
  shift 3
  local t0 lim rc
  t0=$(date +%s)
  lim=$(limit "$budget")
  echo "== $name (limit ${lim}s): $*" >>"$log"
  timeout --signal=INT --kill-after=10 "$lim" "$@" >>"$log" 2>&1
  rc=$?
  local verdict=ok
  if ((rc == 124 || rc == 137)); then
    verdict="TIMED OUT after ${lim}s"
  elif ((rc != 0)); then
    verdict="FAILED (exit $rc)"
  fi
  [ "$verdict" = ok ] || status=1
  say "$name: $verdict, $(($(date +%s) - t0)) s (see $(basename "$log"))"
  return 0
}

gpu=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
dry="${DRY_RUN:-0}"
if [ "$gpu" != 1 ] && [ "$dry" != 1 ]; then
  dry=1
  dry_reason="no CUDA GPU visible to torch"
else
  dry_reason="DRY_RUN=1"
fi
device=$($PY -c "import sys; sys.path.insert(0, 'bench'); from conftest import device_name; print(device_name())" 2>/dev/null || echo unknown)

{
  echo "# treelora GPU verification, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "command: OUT=$OUT bash scripts/gpu_verify.sh (DRY_RUN=$dry)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "device: $device"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  else
    echo "gpu: none (nvidia-smi not found)"
  fi
  $PY -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda)" 2>&1
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  echo "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
} >>"$SUMMARY"
cat "$SUMMARY"
[ "$dry" = 1 ] && say "DRY RUN ($dry_reason): the GPU steps are not run; each collects its selection instead"

# --- 1. the CUDA extension ------------------------------------------------------------------------------------------
if $PY -c "from treelora import _cpp_lib; raise SystemExit(0 if _cpp_lib.available() else 1)" 2>/dev/null; then
  say "build: skipped, treelora._C imports ($($PY -c "from treelora import _cpp_lib; print(_cpp_lib.status().get('archs', ''))" 2>/dev/null))"
elif [ "$dry" = 1 ]; then
  say "build: skipped ($dry_reason); would run pip install --no-build-isolation --no-deps -e . with TREELORA_BUILD_CUDA=1"
else
  arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  [ "$arch" = 90 ] && arch=90a # wgmma needs the arch-specific target
  run_step build "$BUILD_S" "$OUT/build.log" env TREELORA_BUILD_CUDA=1 TREELORA_CUDA_ARCHS="${TREELORA_CUDA_ARCHS:-${arch:-80;90a}}" \
    TREELORA_BUILD_JOBS="${TREELORA_BUILD_JOBS:-$(nproc)}" $PY -m pip install --no-build-isolation --no-deps -e .
fi

# --- 2. kernel correctness tests ------------------------------------------------------------------------------------
if [ "$dry" = 1 ]; then
  run_step "tests (collect only)" "$TESTS_S" "$OUT/tests.log" $PY -m pytest -p no:cacheprovider --collect-only -q \
    -m "$KERNEL_MARKS" "${KERNEL_TESTS[@]}"
else
  workers=()
  $PY -c "import xdist" 2>/dev/null && workers=(-n 8)
  run_step tests "$TESTS_S" "$OUT/tests.log" $PY -m pytest -p no:cacheprovider -q -rfE "${workers[@]}" \
    -m "$KERNEL_MARKS" --junitxml="$OUT/tests.xml" "${KERNEL_TESTS[@]}"
fi
say "tests: $(grep -E '([0-9]+ (passed|failed|error|skipped|selected|tests collected))' "$OUT/tests.log" | tail -1)"

# --- 3. benchmarks of the target shapes -----------------------------------------------------------------------------
# Prints, per benchmark of a pytest-benchmark JSON file, the median and the ratios its targets are stated on.
summarise() {
  $PY - "$1" <<'PYEOF'
import json, sys
keys = ("ratios", "meets_target", "time_over_fused_adamw", "time_over_foreach_adamw", "fraction_of_copy_bandwidth",
        "speedup_vs_eager_reference", "achieved_gbps")
for bench in json.load(open(sys.argv[1]))["benchmarks"]:
    extra = bench.get("extra_info", {})
    shown = ", ".join(f"{k}={extra[k]}" for k in keys if extra.get(k) is not None)
    print(f"  {bench['name']}: median {bench['stats']['median'] * 1e3:.3f} ms" + (f", {shown}" if shown else ""))
PYEOF
}

bench_step() {
  local name=$1 budget=$2 module=$3 select=$4
  if [ "$dry" = 1 ]; then
    run_step "$name (collect only)" "$budget" "$OUT/bench.log" $PY -m pytest -p no:cacheprovider --collect-only -q \
      "bench/$module.py" -k "$select"
    say "  $(grep -E 'tests? collected' "$OUT/bench.log" | tail -1)"
    return
  fi
  run_step "$name" "$budget" "$OUT/bench.log" $PY -m pytest -p no:cacheprovider "bench/$module.py" --benchmark-only \
    -q -s -k "$select"
  local json="bench/results/$device/$module.json"
  if [ -s "$json" ]; then
    cp "$json" "$OUT/$module.json"
    summarise "$json" 2>&1 | tee -a "$SUMMARY"
  else
    say "  no results in $json"
  fi
  cp "$SUMMARY" "bench/results/$device/gpu_verify.txt" 2>/dev/null
}

bench_step lora "$LORA_S" bench_lora "$LORA_SELECT"
bench_step similarity "$SIM_S" bench_similarity "$SIM_SELECT"
bench_step masked-adamw "$MASKED_S" bench_masked_update "$MASKED_SELECT"

say "total: $(elapsed) s, exit status $status; $(find "$OUT" -maxdepth 1 -type f | wc -l) files in $OUT"
exit $status
