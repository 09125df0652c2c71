#!/usr/bin/env bash
# The GPU check: on a CUDA machine, build the extension, run the GPU tests (plain
# and under compute-sanitizer), run the benchmarks, and write everything into the
# directory given as the first argument.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [bench families...]
#
# It fits one call of the project's device tool (10 minutes at most, of a 15-minute
# session): every step gets a share of GPU_CHECK_SECONDS (default 540) and whatever
# a step leaves is passed on; a step that runs out is cut, and the summary says so.
# GPU_CHECK_STEPS picks the steps after the build (default "tests sanitize bench"),
# e.g. GPU_CHECK_STEPS=bench for a second call that only times.
# The tests run on 4 processes when pytest-xdist is there (most of their time is
# Triton compiling kernels on the CPU).
#
# The default families leave out `sampling`, whose naive baseline alone takes
# about a minute per call at the issue's sizes: run it on its own with
# `pixelcnn-kernels bench sampling --warmup 1 --repeats 3`.
#
# Then copy OUT_DIR/summary.md into benchmarks/results/<date>-<gpu>.md: every GPU
# figure the README quotes comes from such a file.
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR [bench families...]}
shift
families=("$@")
[ ${#families[@]} -gt 0 ] || families=(gates dmol masked_conv models)
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
summary="$out/summary.md"
deadline=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-540} ))
step() { echo "== $1 ($(date +%T), $(( deadline - $(date +%s) )) s left)" | tee -a "$out/steps.log"; }
# The seconds a step may take: its share, but at most what is left after reserving $2 for the steps after it.
allowance() {
  local left=$(( deadline - $(date +%s) - $2 ))
  (( left < $1 )) && echo $(( left > 10 ? left : 10 )) || echo "$1"
}
# "exit N" for a finished command, "cut after N s" for one that timeout stopped.
outcome() { [ "$1" -eq 124 ] && echo "cut after $2 s" || echo "exit $1"; }

steps=" ${GPU_CHECK_STEPS:-tests sanitize bench} "
wants() { [[ $steps == *" $1 "* ]]; }
tests_rc=0 bench_rc=0

step "build"
start=$(date +%s)
python setup.py build_ext --inplace >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "extension built in $(( $(date +%s) - start )) s" | tee -a "$out/steps.log"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
  echo "# GPU check $(date -u +%Y-%m-%d)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -m pixelcnn_kernels info
  nvcc --version | tail -1
  echo '```'
} >"$summary" 2>&1

pytest_args=(-q -p no:cacheprovider -o addopts="")
python -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout 120)
parallel=()
python -c "import xdist" 2>/dev/null && parallel=(-n 4)

if wants tests; then
  step "gpu tests"
  limit=$(allowance 240 200)
  timeout "$limit" python -m pytest -m gpu "${parallel[@]}" "${pytest_args[@]}" >"$out/gpu_tests.log" 2>&1
  tests_rc=$?
  { echo; echo "## GPU tests (pytest -m gpu): $(outcome $tests_rc "$limit")"; echo '```'
    grep -E "^(FAILED|ERROR)" "$out/gpu_tests.log" | head -30; tail -3 "$out/gpu_tests.log"; echo '```'; } >>"$summary"
fi

if wants sanitize && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    limit=$(allowance 75 100)
    timeout "$limit" compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      python -m pytest -m "gpu and sanitize" "${pytest_args[@]}" >"$out/sanitizer_$tool.log" 2>&1
    rc=$?
    { echo; echo "## compute-sanitizer --tool $tool (pytest -m 'gpu and sanitize'): $(outcome $rc "$limit")"; echo '```'
      grep -E "ERROR SUMMARY|passed|failed" "$out/sanitizer_$tool.log" | tail -4; echo '```'; } >>"$summary"
  done
fi

if wants bench; then
  step "benchmarks"
  limit=$(allowance 300 5)
  timeout "$limit" python -m pixelcnn_kernels bench "${families[@]}" --out "$out/bench" >"$out/bench.log" 2>&1
  bench_rc=$?
  { echo; echo "## Benchmarks (pixelcnn-kernels bench ${families[*]}): $(outcome $bench_rc "$limit")"; echo '```'
    cat "$out/bench/table.txt" 2>/dev/null || tail -20 "$out/bench.log"; echo '```'; } >>"$summary"
fi

step "done"
cat "$summary"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
