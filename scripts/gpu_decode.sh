#!/usr/bin/env bash
# The paged decode kernel on a GPU machine, in one go: build, its tests, benchmarks.decode; logs and JSON to $1.
#   scripts/gpu_decode.sh OUT_DIR [BASELINE_DIR [NCU_CASES [SWEEP]]]
# BASELINE_DIR holds another version's csrc/attention/paged_decode* files: that version (its paged_decode* files
# in place of all of ours) is built in a copy of the tree and timed by the same benchmark in the same run, the
# only comparison that counts; a table of the two, row by row, closes the benchmarks, and the mixed rows are
# timed again with 8 calls a graph. NCU_CASES (benchmarks.decode --case values, space-separated; CASE@N profiles
# the launch after the first N, e.g. a graph replay) are profiled with ncu, both versions. SWEEP (settings
# separated by spaces, each "default" or VAR=VALUE[,VAR=VALUE...] of the MINIVLLM_DECODE_* overrides) reruns ours
# on a few rows under each setting, twice in turn so that drift shows. Steps are stamped with the seconds since
# the start and run in order of what matters most.
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_decode.sh OUT_DIR [BASELINE_DIR [NCU_CASES [SWEEP]]]}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/log"
. scripts/gpu_env.sh
base=/tmp/minivllm-baseline
if [ -n "${2:-}" ]; then
  rm -rf "$base" && mkdir -p "$base" && cp -a . "$base/"
  rm -f "$base"/csrc/attention/paged_decode* && cp "$2"/paged_decode* "$base/csrc/attention/"
  (cd "$base" && bash scripts/gpu_build.sh >/tmp/build_baseline.log 2>&1) &  # $OUT keeps 8 files: not this
  baseline_build=$!
fi
build_in_place
grep -E "paged_decode.*(registers|spill)|error" "$out/build.log" | head -20 | tee -a "$log"
python3 -m pytest -q -rf tests/gpu/test_paged_decode.py -k "not bad_inputs" 2>&1 | tail -40 | tee -a "$log"
status=${PIPESTATUS[0]}
# Other split sizes through the same code: smaller splits, more of them, and split batches of whole waves.
MINIVLLM_DECODE_CTA_COST=0.25 MINIVLLM_DECODE_GRID_WAVES=16 MINIVLLM_DECODE_UNSPLIT_WAVES=16 python3 -m pytest -q -rf \
  tests/gpu/test_paged_decode.py -k "mixed or edges or graph or total or split_kv" 2>&1 | tail -8 | tee -a "$log"
stamp "tested"
if [ -n "${2:-}" ]; then
  wait "$baseline_build" || { tail -30 /tmp/build_baseline.log; exit 1; }
fi
python3 -m benchmarks.decode --ours-only --json "$out/decode.json" >>"$log" 2>&1
stamp "benchmarked ours"
if [ -n "${2:-}" ]; then
  (cd "$base" && python3 -m benchmarks.decode --ours-only --json "$out/decode_baseline.json") >>"$log" 2>&1
  stamp "benchmarked baseline ($2)"
  python3 - "$out/decode.json" "$out/decode_baseline.json" <<'PY' | tee -a "$log"
import json, sys
ours, base = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{ours['gpu']}: copy {ours['copy_gbs']:.0f} GB/s (ours' run), {base['copy_gbs']:.0f} GB/s (baseline's)")
print(f"{'block':>5} {'batch':>5} {'context':>18} | {'ours us':>8} {'of copy':>7} | {'base us':>8} {'of copy':>7} | speed-up")
for a, b in zip(ours["rows"], base["rows"]):
    if a.get("us") is None or b.get("us") is None:
        continue
    print(f"{a['block']:>5} {a['batch']:>5} {a['context']:>18} | {a['us']:8.1f} {a['of copy']:7.3f} | "
          f"{b['us']:8.1f} {b['of copy']:7.3f} | {b['us'] / a['us']:.2f}")
PY
  for tree in . "$base"; do
    echo "=== $tree: mixed rows, at least 8 calls a graph" | tee -a "$log"
    (cd "$tree" && python3 -m benchmarks.decode --ours-only --mixed-only --min-calls 8) 2>&1 | tail -13 | tee -a "$log"
  done
  stamp "mixed rows, 8 calls a graph"
fi
if [ -n "${3:-}" ]; then
  stalls=$(printf 'smsp__average_warps_issue_stalled_%s_per_issue_active.ratio,' long_scoreboard short_scoreboard \
    barrier wait mio_throttle lg_throttle math_pipe_throttle not_selected selected no_instruction branch_resolving \
    dispatch_stall sleeping)
  profile() {  # profile TREE FILE CASE[@SKIP]: one launch of the decode kernel
    local case=${3%@*} skip=0 sections="--section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis"
    [ "$case" != "$3" ] && skip=${3#*@}
    (cd "$1" && timeout 100 ncu --clock-control none -k regex:paged_decode_kernel --launch-skip "$skip" -c 1 \
      $sections --metrics "${stalls%,},lts__t_sector_hit_rate.pct,dram__bytes_read.sum" \
      python3 -m benchmarks.decode --ours-only --case "$case") >"$2" 2>&1
    echo "=== ncu $(basename "$2") on $3" | tee -a "$log"
    grep -E "DRAM Throughput|Duration|SM Frequency|Registers Per|Achieved Occupancy|Issued Warp|No Eligible|Eligible Warps|Active Warps Per|issue_stalled_(long|short|wait|barrier|selected)|sector_hit|dram__bytes|Grid Size" \
      "$2" | sed 's/  */ /g' | head -40 | tee -a "$log"
  }
  n=0
  for case in $3; do
    n=$((n + 1))
    profile . "$out/ncu$n.txt" "$case"
    [ -n "${2:-}" ] && profile "$base" "$out/ncu${n}_baseline.txt" "$case"
    stamp "profiled $case"
  done
fi
rows="--batches 1,8,64,256 --contexts 1024,2048,8192"
for round in 1 2; do
  for setting in ${4:-}; do
    echo "=== ours, round $round, $setting" | tee -a "$log"
    env_args=()
    [ "$setting" != default ] && IFS=, read -ra env_args <<<"$setting"
    env ${env_args[@]+"${env_args[@]}"} python3 -m benchmarks.decode --ours-only $rows --json "/tmp/sweep_${round}_$setting.json" \
      >/dev/null 2>&1
  done
  stamp "sweep round $round"
  python3 - ${4:-} <<'PY' | tee -a "$log"
import json, os, sys
settings = sys.argv[1:]
files = {s: [f"/tmp/sweep_{r}_{s}.json" for r in (1, 2)] for s in settings}
runs = {s: [json.load(open(f)) for f in files[s] if os.path.exists(f)] for s in settings}
print("us per call, each setting's runs (round 1 / round 2)")
print(f"{'block':>5} {'batch':>5} {'context':>18} | " + " | ".join(f"{s.replace('MINIVLLM_DECODE_', ''):>24}" for s in settings))
first = runs[settings[0]][0]["rows"]
for i, row in enumerate(first):
    if row.get("us") is None:
        continue
    cells = [" / ".join(f"{r['rows'][i]['us']:.1f}" for r in runs[s]) for s in settings]
    print(f"{row['block']:>5} {row['batch']:>5} {row['context']:>18} | " + " | ".join(f"{c:>24}" for c in cells))
PY
done
exit "$status"
