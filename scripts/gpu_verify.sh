#!/usr/bin/env bash
# Verify treelora on a CUDA GPU in one go: build the CUDA extension, run every test (the requires_cuda ones run for
# real on CUDA tensors: Triton kernels, the CUDA C++ backend, against the float64 references), run the benchmarks,
# and collect everything under $OUT (default: gpu-results/).
#
#   bash scripts/gpu_verify.sh                 # everything (tens of minutes on an H100)
#   TESTS_ONLY=1 bash scripts/gpu_verify.sh    # build + tests
#   BENCH=bench/bench_lora.py bash scripts/gpu_verify.sh   # one benchmark module
#
# Works offline: nothing is downloaded. The extension build needs nvcc, cmake and pybind11 already installed
# (`pip install --no-build-isolation` uses them from the environment); without them the tests still run on the
# Triton and torch backends and the log says why the CUDA backend was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
status=0

{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
  $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>&1
  nvcc --version 2>&1 | tail -1
  git rev-parse HEAD 2>/dev/null
} | tee "$OUT/environment.txt"

if ! $PY -c "import treelora._C" 2>/dev/null; then
  echo "== building treelora._C" | tee "$OUT/build.log"
  TREELORA_BUILD_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . >>"$OUT/build.log" 2>&1 ||
    { echo "extension build failed (see build.log); continuing without it" | tee -a "$OUT/build.log"; status=1; }
fi
$PY -m treelora info 2>&1 | tee "$OUT/info.txt"

echo "== tests" | tee "$OUT/tests.log"
$PY -m pytest tests -m "not interpreter" -q -ra -p no:cacheprovider --junitxml="$OUT/tests.xml" >>"$OUT/tests.log" 2>&1 ||
  status=1
tail -n 40 "$OUT/tests.log"

if [ -z "${TESTS_ONLY:-}" ]; then
  echo "== benchmarks" | tee "$OUT/bench.log"
  # shellcheck disable=SC2086
  $PY -m pytest ${BENCH:-bench} --benchmark-only -q -s -p no:cacheprovider >>"$OUT/bench.log" 2>&1 || status=1
  tail -n 60 "$OUT/bench.log"
  cp -r bench/results "$OUT/bench-results" 2>/dev/null
fi
echo "exit status $status; results in $OUT"
exit $status
