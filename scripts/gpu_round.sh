#!/usr/bin/env bash
# A session's closing device call, in the order of what matters most should the device time run out (every
# step logs to OUT_DIR as it goes, the GPU tests' whole output to gpu_tests.log; at most 6 files, under the
# device's limit): build; the GPU tests of the sampler, the engine, the input staging, paged decode, the small-M
# linear and the sampler kernels; benchmarks.throughput plain (with its plot), with logprobs and penalties on every
# request, again with them, plain again; then, in the time that is left, benchmarks.sampler, step_profile with the
# extras, benchmarks.small_m_linear, benchmarks.serving at maximum concurrency and at a Poisson rate of half that,
# benchmarks.latency with its plot, benchmarks.decode with its plot.
#   scripts/gpu_round.sh OUT_DIR [SECONDS]    (SECONDS: the call's limit, 600 by default)
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_round.sh OUT_DIR [SECONDS]}")
limit=${2:-600}
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/round.log"
. scripts/gpu_env.sh
build_in_place
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_sampler_gpu.py tests/gpu/test_engine_gpu.py \
  tests/gpu/test_step_inputs_gpu.py tests/gpu/test_paged_decode.py tests/gpu/test_small_m_linear.py \
  tests/gpu/test_sampler_kernels.py >"$out/gpu_tests.log" 2>&1
stamp "GPU tests"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu_tests.log" | tail -12 | tee -a "$log"
extras="--logprobs 5 --presence-penalty 0.5 --repetition-penalty 1.1"
# throughput NAME FLAGS...: one benchmarks.throughput run. Plain, extras, extras, plain: two same-run pairs, so the
# extras' ratio comes with its spread
throughput() {
  local name=$1; shift
  timeout 150 python3 -m benchmarks.throughput "$@" 2>&1 | grep -v -i "warn\|llm = LLM" | tee -a "$log"
  stamp "throughput $name"
}
throughput plain --plot "$out/throughput.png"
throughput extras $extras
throughput extras $extras
throughput plain
# the rest only in the time that is left, each given what it needs
if [ $((limit - 15 - SECONDS)) -gt 30 ]; then
  timeout 30 python3 -m benchmarks.sampler 2>&1 | tee -a "$log"
  stamp sampler
fi
if [ $((limit - 15 - SECONDS)) -gt 35 ]; then
  timeout 35 python3 -m benchmarks.step_profile $extras --top 8 2>&1 | grep -v -i "warn\|llm = LLM" | tee -a "$log"
  stamp "step_profile extras"
fi
if [ $((limit - 15 - SECONDS)) -gt 40 ]; then
  timeout 40 python3 -m benchmarks.small_m_linear 2>&1 | tee -a "$log"
  stamp small_m_linear
fi
if [ $((limit - 15 - SECONDS)) -gt 240 ]; then
  timeout 240 python3 -m benchmarks.serving 2>&1 | grep -v -i "warn\|it/s]" | tail -7 | tee -a "$log"
  stamp serving
fi
if [ $((limit - 15 - SECONDS)) -gt 90 ]; then  # latency took 62 s in one run and was cut at 70 s in the next
  timeout 90 python3 -m benchmarks.latency --plot "$out/latency.png" 2>&1 | tee -a "$log"
  stamp latency
fi
if [ $((limit - 15 - SECONDS)) -gt 20 ]; then
  timeout 20 python3 -m benchmarks.decode --ours-only --plot "$out/decode.png" 2>&1 | tee -a "$log"
  stamp decode
fi
finish
