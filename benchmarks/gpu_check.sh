#!/usr/bin/env bash
# The GPU check: on a CUDA machine, build the extension, run the GPU tests (plain
# and under compute-sanitizer), run the benchmarks, and write everything into the
# directory given as the first argument. Budget: under 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [bench families...]
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
step() { echo "== $1 ($(date +%T))" | tee -a "$out/steps.log"; }

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

step "gpu tests"
timeout 240 python -m pytest -m gpu -q -p no:cacheprovider -x >"$out/gpu_tests.log" 2>&1
tests_rc=$?
{ echo; echo "## GPU tests (pytest -m gpu): exit $tests_rc"; echo '```'; tail -5 "$out/gpu_tests.log"; echo '```'; } >>"$summary"

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 20 \
      python -m pytest -m "gpu and sanitize" -q -p no:cacheprovider >"$out/sanitizer_$tool.log" 2>&1
    rc=$?
    { echo; echo "## compute-sanitizer --tool $tool (pytest -m 'gpu and sanitize'): exit $rc"; echo '```'; grep -E "ERROR SUMMARY|passed|failed" "$out/sanitizer_$tool.log" | tail -4; echo '```'; } >>"$summary"
  done
fi

step "benchmarks"
timeout 300 python -m pixelcnn_kernels bench "${families[@]}" --out "$out/bench" >"$out/bench.log" 2>&1
bench_rc=$?
{ echo; echo "## Benchmarks (pixelcnn-kernels bench ${families[*]}): exit $bench_rc"; echo '```'; cat "$out/bench/table.txt" 2>/dev/null || tail -20 "$out/bench.log"; echo '```'; } >>"$summary"

step "done"
cat "$summary"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
