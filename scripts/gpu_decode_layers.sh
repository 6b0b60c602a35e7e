#!/usr/bin/env bash
# The persistent decode kernel (issue 17) on one GPU machine: build; its tests (with FULL=1 the engine and paged
# decode GPU tests too, for regressions: paged decode shares its online softmax); benchmarks.decode_layers
# --stages; benchmarks.latency with it on (B) and off (A, MINIVLLM_DECODE_LAYERS=0) in the order PASSES gives
# (default "B A"), graphs only; step_profile at batch 1, context 1k, with it on.
# Logs go to OUT_DIR (the tests' whole output in pytest.log).
# PROFILE=1 instead: benchmarks.decode_layers, then one launch at batch 1, context 1k, under ncu (the SASS with each
# instruction's stall samples in ncu_source.csv.gz).
#   [FULL=1] [PASSES="B A B A"] [PROFILE=1] scripts/gpu_decode_layers.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_decode_layers.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/decode_layers.log"
. scripts/gpu_env.sh
build_in_place
if [ "${PROFILE:-0}" = 1 ]; then  # only: one launch at batch 1, context 1k under ncu, with per-instruction stalls
  driver="from benchmarks.decode_layers import *
model = random_model(1024, 3072, 16, 8, 28, torch.bfloat16, max_position=4096)
step = random_step(model, [1024], 16, torch.bfloat16)
for _ in range(25): model.model.decode_layers(*step)
torch.cuda.synchronize()"
  timeout 100 python3 -m benchmarks.decode_layers 2>&1 | tee -a "$log"
  stamp "benchmarks.decode_layers"
  timeout 240 ncu --clock-control none -k regex:decode_layers_kernel --launch-skip 20 -c 1 --import-source no \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    -o "$out/layers" python3 -c "$driver" > "$out/ncu_run.log" 2>&1
  stamp "ncu"
  ncu -i "$out/layers.ncu-rep" --page details > "$out/ncu_details.txt" 2>&1
  ncu -i "$out/layers.ncu-rep" --page source --csv --print-source sass > "$out/ncu_source.csv" 2>&1
  grep -E "Duration|SM Frequency|Issued Warp|No Eligible|Eligible Warps|Active Warps|Stall|stall" \
    "$out/ncu_details.txt" | sed 's/  */ /g' | head -40 | tee -a "$log"
  gzip -f "$out/ncu_source.csv"
  finish
  exit
fi
tests=(tests/gpu/test_decode_layers.py)
[ "${FULL:-0}" = 1 ] && tests+=(tests/gpu/test_engine_gpu.py tests/gpu/test_paged_decode.py)
timeout 300 python3 -m pytest -q -p no:cacheprovider "${tests[@]}" > "$out/pytest.log" 2>&1
rc=$?
grep -m 3 -B 2 -A 8 "Fatal Python error" "$out/pytest.log" | tee -a "$log"
grep -m 30 -E "^E |FAILED|Error" "$out/pytest.log" | tee -a "$log"
tail -4 "$out/pytest.log" | tee -a "$log"
(exit $rc)
stamp "GPU tests"
timeout 150 python3 -m benchmarks.decode_layers --stages --json "$out/decode_layers.json" 2>&1 | tee -a "$log"
stamp "benchmarks.decode_layers"
for pass in ${PASSES:-B A}; do
  flag=$([ $pass = B ] && echo 1 || echo 0)
  MINIVLLM_DECODE_LAYERS=$flag timeout 100 python3 -m benchmarks.latency --graphs-only --repeats 2 2>&1 \
    | grep -v -i "warn\|llm = LLM" | tee -a "$log"
  stamp "latency $pass"
done
timeout 60 python3 -m benchmarks.step_profile --num-seqs 1 --context 1024 --skip 20 --steps 50 --top 6 2>&1 \
  | grep -v -i "warn\|llm = LLM" | tee -a "$log"
stamp "step_profile batch 1"
finish
