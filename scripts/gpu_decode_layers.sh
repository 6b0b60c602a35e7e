#!/usr/bin/env bash
# The persistent decode kernel (issue 17) on one GPU machine: build; its tests (with FULL=1 the engine GPU tests
# too, for regressions); benchmarks.decode_layers --stages; benchmarks.latency with it on (B) and off
# (A, MINIVLLM_DECODE_LAYERS=0) in the order PASSES gives (default "B A"), graphs only; step_profile at batch 1,
# context 1k, with it on.
# Logs go to OUT_DIR (the tests' whole output in pytest.log).
#   [FULL=1] [PASSES="B A B A"] scripts/gpu_decode_layers.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_decode_layers.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/decode_layers.log"
. scripts/gpu_env.sh
build_in_place
tests=(tests/gpu/test_decode_layers.py)
[ "${FULL:-0}" = 1 ] && tests+=(tests/gpu/test_engine_gpu.py)
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
