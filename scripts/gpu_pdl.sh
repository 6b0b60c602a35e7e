#!/usr/bin/env bash
# Programmatic dependent launch on one GPU machine (issue 17), in one run: build; the GPU tests of the kernels
# that launch with PDL and of the engine; then the same benchmarks with PDL on and off (MINIVLLM_PDL=0), in turn,
# as far as the time allows: benchmarks.latency's graph rows, benchmarks.small_m_linear, benchmarks.throughput
# plain; step_profile at batch 1 (context 1k) with PDL off. Logs to OUT_DIR.
#   scripts/gpu_pdl.sh OUT_DIR [SECONDS]    (SECONDS: the call's limit, 600 by default)
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_pdl.sh OUT_DIR [SECONDS]}")
limit=${2:-600}
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/pdl.log"
. scripts/gpu_env.sh
build_in_place
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_small_m_linear.py \
  tests/gpu/test_qk_norm_rope_cache.py tests/gpu/test_paged_decode.py tests/gpu/test_engine_gpu.py \
  tests/gpu/test_sampler_gpu.py tests/gpu/test_flash_prefill.py >"$out/gpu_tests.log" 2>&1
stamp "GPU tests"
grep -E "^(FAILED|ERROR)|passed|failed" "$out/gpu_tests.log" | tail -12 | tee -a "$log"
# bench NAME SECONDS PDL ARGS...: one benchmark with MINIVLLM_PDL=PDL, if the call's time allows
bench() {
  local name=$1 seconds=$2 pdl=$3
  shift 3
  [ $((limit - 15 - SECONDS)) -gt "$seconds" ] || { echo "--- $name PDL=$pdl skipped (time)" | tee -a "$log"; return; }
  echo "=== $name, MINIVLLM_PDL=$pdl" | tee -a "$log"
  MINIVLLM_PDL=$pdl timeout "$seconds" python3 -m "$@" 2>&1 | grep -v -i "warn\|llm = LLM" | tee -a "$log"
  stamp "$name PDL=$pdl"
}
for pdl in 1 0 0 1; do bench latency 40 $pdl benchmarks.latency --graphs-only; done
for pdl in 1 0; do bench small_m_linear 40 $pdl benchmarks.small_m_linear; done
for pdl in 0 1; do bench throughput 60 $pdl benchmarks.throughput; done
# by kernel with PDL off: with it on, a kernel's span includes its wait for the one before
bench step_profile 60 0 benchmarks.step_profile --num-seqs 1 --context 1024 --skip 20 --steps 50 --top 25
finish
