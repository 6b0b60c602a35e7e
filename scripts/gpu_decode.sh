#!/usr/bin/env bash
# The paged decode kernel on a GPU machine, in one go: build, its tests, benchmarks.decode; logs and JSON to $1.
#   scripts/gpu_decode.sh OUT_DIR [BASELINE_DIR [NCU_CASE]]
# BASELINE_DIR holds another version's csrc/attention/paged_decode* files: that version is built in a copy of
# the tree and timed by the same benchmark in the same run, the only comparison that counts. NCU_CASE (a
# benchmarks.decode --case) is then profiled with ncu, ours only.
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_decode.sh OUT_DIR [BASELINE_DIR [NCU_CASE]]}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/log"
. scripts/gpu_env.sh
base=/tmp/minivllm-baseline
if [ -n "${2:-}" ]; then
  rm -rf "$base" && mkdir -p "$base" && cp -a . "$base/" && cp "$2"/paged_decode* "$base/csrc/attention/"
  (cd "$base" && bash scripts/gpu_build.sh >"$out/build_baseline.log" 2>&1) &
  baseline_build=$!
fi
bash scripts/gpu_build.sh >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python3 -m pytest -q tests/gpu/test_paged_decode.py -k "not bad_inputs" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
python3 -m pytest -q tests/gpu/test_paged_decode.py -k "bad_inputs" 2>&1 | tail -3 | tee -a "$log"
if [ -n "${2:-}" ]; then
  wait "$baseline_build" || { tail -30 "$out/build_baseline.log"; exit 1; }
fi
python3 -m benchmarks.decode --ours-only --json "$out/decode.json" 2>&1 | tee -a "$log"
if [ -n "${2:-}" ]; then
  echo "=== baseline ($2) ===" | tee -a "$log"
  (cd "$base" && python3 -m benchmarks.decode --ours-only --json "$out/decode_baseline.json") 2>&1 | tee -a "$log"
fi
if [ -n "${3:-}" ]; then
  timeout 120 ncu --clock-control none -k regex:paged_decode_kernel -c 1 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
    python3 -m benchmarks.decode --ours-only --case "$3" >"$out/ncu.txt" 2>&1
  grep -E "DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Issued Warp|No Eligible|Eligible Warps|Stall" \
    "$out/ncu.txt" | head -30 | tee -a "$log"
fi
exit "$status"
