#!/usr/bin/env bash
# The small-batch decode path on one GPU machine (issue 17): build; the small-M linear and engine GPU tests;
# benchmarks.small_m_linear; step_profile at batch 1 and 8 (context 1k), where each kernel's exposed time (what it
# adds to the step past the kernels before it) is what a faster step has to cut; benchmarks.latency with its plot.
# Logs go to OUT_DIR (the tests' whole output in pytest.log).
#   scripts/gpu_small_batch.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_small_batch.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/small_batch.log"
. scripts/gpu_env.sh
build_in_place
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_small_m_linear.py tests/gpu/test_engine_gpu.py \
  > "$out/pytest.log" 2>&1
rc=$?
grep -m 3 -B 2 -A 8 "Fatal Python error" "$out/pytest.log" | tee -a "$log"  # a crash's first frames
tail -8 "$out/pytest.log" | tee -a "$log"
(exit $rc)
stamp "GPU tests"
timeout 60 python3 -m benchmarks.small_m_linear 2>&1 | tee -a "$log"
stamp small_m_linear
for batch in 1 8; do
  timeout 60 python3 -m benchmarks.step_profile --num-seqs "$batch" --context 1024 --skip 20 --steps 50 --top 25 2>&1 \
    | grep -v -i "warn\|llm = LLM" | tee -a "$log"
  stamp "step_profile batch $batch"
done
timeout 120 python3 -m benchmarks.latency --plot "$out/latency.png" 2>&1 | grep -v -i "warn\|llm = LLM" | tee -a "$log"
stamp latency
finish
