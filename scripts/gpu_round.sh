#!/usr/bin/env bash
# A session's closing device call, in the order of what matters most should the device time run out (every
# step logs to OUT_DIR as it goes): build; the GPU tests of the sampler, the engine and paged decode;
# benchmarks.throughput plain, then with logprobs and penalties on every request; benchmarks.sampler; then the
# online paths of scripts/gpu_serving.sh against that plain throughput run.
#   scripts/gpu_round.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_round.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/round.log"
. scripts/gpu_env.sh
bash scripts/gpu_build.sh >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sampler_gpu.py tests/gpu/test_engine_gpu.py \
  tests/gpu/test_paged_decode.py 2>&1 | tail -8 | tee -a "$log"
for extras in "" "--logprobs 5 --presence-penalty 0.5 --repetition-penalty 1.1"; do
  echo "=== benchmarks.throughput $extras" | tee -a "$log"
  timeout 120 python3 -m benchmarks.throughput $extras 2>&1 | grep -v -i "warn\|llm = LLM" | tee -a "$log"
done
timeout 90 python3 -m benchmarks.sampler 2>&1 | tee -a "$log"
SERVING_OFFLINE=0 bash scripts/gpu_serving.sh "$out"
