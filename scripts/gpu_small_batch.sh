#!/usr/bin/env bash
# The small-batch decode path on one GPU machine (issue 17): build; the small-M linear GPU tests; batch-1 latency
# with the small-M products' resident schedule (MINIVLLM_SMALL_M_RESIDENT=1) against the streaming one, the two
# interleaved twice in the same run; benchmarks.small_m_linear; step_profile at batch 1 and 8 (context 1k), where
# each kernel's share is what a faster step has to cut. Logs and JSON go to OUT_DIR.
#   scripts/gpu_small_batch.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_small_batch.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/small_batch.log"
. scripts/gpu_env.sh
build_in_place
# with the resident schedule switched on, so that "auto" (the engine's decode among the tests) takes it too
MINIVLLM_SMALL_M_RESIDENT=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_small_m_linear.py 2>&1 \
  | tail -15 | tee -a "$log"
stamp "GPU tests"
for pass in 1 2; do
  for resident in 1 0; do
    echo "--- latency, MINIVLLM_SMALL_M_RESIDENT=$resident, pass $pass" | tee -a "$log"
    MINIVLLM_SMALL_M_RESIDENT=$resident timeout 100 python3 -m benchmarks.latency --graphs-only \
      --json "$out/latency_resident${resident}_$pass.json" 2>&1 | grep -v -i "warn\|llm = LLM" | tee -a "$log"
    stamp "latency resident=$resident pass $pass"
  done
done
timeout 60 python3 -m benchmarks.small_m_linear --json "$out/small_m_linear.json" 2>&1 | tee -a "$log"
stamp small_m_linear
for batch in 1 8; do
  timeout 60 python3 -m benchmarks.step_profile --num-seqs "$batch" --context 1024 --skip 20 --steps 50 --top 25 2>&1 \
    | grep -v -i "warn\|llm = LLM" | tee -a "$log"
  stamp "step_profile batch $batch"
done
finish
