#!/usr/bin/env bash
# The sm_90 prefill kernel on one GPU machine (issue 16), in one run, each step under a timeout (a barrier bug
# hangs): build; the first shapes (each in a process of its own if the set hangs); the kernel switch; the whole
# prefill test file; benchmarks.prefill, then paged at 16-token and 256-token blocks for (16, 8, 128);
# compute-sanitizer on the first shapes. Logs to OUT_DIR (more than the device returns: tar them).
#   scripts/gpu_prefill.sh OUT_DIR [SECONDS]    (SECONDS: the time this script may take, 600 by default)
# PREFILL_SKIP_BUILD=1 uses the extension already built in place. PREFILL_BASELINE=DIR (from the repo root; a
# `git archive` of another revision) is built beside this tree and benchmarked after it in the same run, the
# A/B that counts.
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_prefill.sh OUT_DIR [SECONDS]}")
limit=${2:-600}
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/prefill.log"
. scripts/gpu_env.sh
baseline=${PREFILL_BASELINE:+$(realpath "$PREFILL_BASELINE")}
if [ -n "$baseline" ]; then
  (cd "$baseline" && MAX_JOBS=8 bash scripts/gpu_build.sh >"$out/build_baseline.log" 2>&1) &
  baseline_build=$!
fi
if [ "${PREFILL_SKIP_BUILD:-0}" != 1 ]; then
  MAX_JOBS=${baseline:+8} build_in_place
  grep -o "archs[^ ]*.*" "$out/build.log" | head -2 | tee -a "$log"
fi
[ -z "$baseline" ] || wait "$baseline_build" || { tail -50 "$out/build_baseline.log"; exit 1; }
file=tests/gpu/test_flash_prefill.py
pytest_step() {  # pytest_step NAME SECONDS ARGS...: one pytest process, its failures and summary in the log
  local name=$1 seconds=$2
  shift 2
  [ $((limit - 10 - SECONDS)) -gt "$seconds" ] || { echo "--- $name skipped (time)" | tee -a "$log"; return 1; }
  timeout "$seconds" python3 -m pytest -q -p no:cacheprovider -rf "$@" >"$out/$name.log" 2>&1
  local rc=$?
  [ $rc = 0 ] || failed="$failed, $name"
  [ $rc = 124 ] && echo "$name: TIMED OUT after ${seconds}s (a hang?)" | tee -a "$log"
  grep -E "^(FAILED|ERROR)|AssertionError|passed|failed|error" "$out/$name.log" | tail -15 | tee -a "$log"
  echo "--- $name (rc $rc) at ${SECONDS}s" | tee -a "$log"
  return $rc
}
pytest_step first_shapes 120 -v "$file" -k "first_shapes and sm90"
first=$?
if [ $first = 124 ]; then  # a hang: each shape alone, so that the ones after it still report
  for name in $(python3 -c "import sys; sys.path.insert(0, 'tests/gpu'); import test_flash_prefill as t; print(*t.FIRST_SHAPES)"); do
    pytest_step "shape_$name" 40 "$file" -k "first_shapes and sm90 and $name"
  done
fi
pytest_step switch 60 "$file" -k switch
if [ $first = 0 ]; then
  pytest_step whole_file 150 -x "$file"
  timeout 100 python3 -m benchmarks.prefill --json "$out/prefill.json" 2>&1 | tee -a "$log"
  stamp "benchmarks.prefill"
  if [ -n "$baseline" ]; then
    echo "=== the baseline, $baseline" | tee -a "$log"
    (cd "$baseline" && timeout 100 python3 -m benchmarks.prefill --json "$out/prefill_baseline.json") 2>&1 | tee -a "$log"
    stamp "benchmarks.prefill (baseline)"
  fi
  for block in 16 256; do  # is the paged path bound by its boxes a tile (8 at block 16, 1 at 256)?
    timeout 60 python3 -m benchmarks.prefill --heads 16/8/128 --no-mixed --block-size $block \
      --json "$out/prefill_block_$block.json" 2>&1 | tail -9 | tee -a "$log"
    stamp "benchmarks.prefill, block $block"
  done
fi
for tool in memcheck racecheck synccheck; do
  [ $((limit - 70 - SECONDS)) -gt 0 ] || { echo "--- $tool skipped (time)" | tee -a "$log"; continue; }
  timeout 60 compute-sanitizer --tool $tool --error-exitcode 1 python3 -m pytest -q -p no:cacheprovider -x "$file" \
    -k "first_shapes and sm90 and (one_tile_d128 or varlen_gqa or paged_block_16)" >"$out/$tool.log" 2>&1
  stamp "$tool"
  grep -E "ERROR SUMMARY|passed|failed|Error" "$out/$tool.log" | head -8 | tee -a "$log"
done
finish
