#!/usr/bin/env bash
# Where a step's host time goes, with and without the sampler's extras, on a GPU machine: build,
# benchmarks.throughput plain and with logprobs=5 + presence and repetition penalties on every request, then
# benchmarks.step_profile both ways (host ms a decode step per phase, GPU busy share, kernels). Logs and JSON to
# OUT_DIR, with the host's hottest Python functions (cProfile) of each step_profile run. HOST_SERVING=1 then runs
# benchmarks.serving at maximum concurrency, its clients in 4 processes, then in one. Further arguments run
# scripts/gpu_decode.sh after it, with the same OUT_DIR and those arguments.
#   scripts/gpu_host.sh OUT_DIR [GPU_DECODE_ARGS...]
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_host.sh OUT_DIR [GPU_DECODE_ARGS...]}")
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/host.log"
. scripts/gpu_env.sh
build_in_place
extras="--logprobs 5 --presence-penalty 0.5 --repetition-penalty 1.1"
for name in plain extras; do
  flags=""; [ $name = extras ] && flags=$extras
  echo "=== benchmarks.throughput ($name) at ${SECONDS}s" | tee -a "$log"
  timeout 120 python3 -m benchmarks.throughput $flags 2>&1 \
    | grep -v -i "warn\|llm = LLM" | tee -a "$log"
done
for name in plain extras; do
  flags=""; [ $name = extras ] && flags=$extras
  echo "=== benchmarks.step_profile ($name) at ${SECONDS}s" | tee -a "$log"
  timeout 120 python3 -m benchmarks.step_profile $flags --json "$out/step_$name.json" --cprofile "$out/cprofile_$name.txt" 2>&1 \
    | grep -v -i "warn\|llm = LLM" | tee -a "$log"
done
if [ "${HOST_SERVING:-0}" = 1 ]; then
  for procs in 4 1; do  # the clients in 4 processes, then in one (as before: does parsing the streams set the pace?)
    echo "=== benchmarks.serving --no-poisson --client-procs $procs at ${SECONDS}s" | tee -a "$log"
    timeout 200 python3 -m benchmarks.serving --no-poisson --client-procs $procs 2>&1 | grep -v -i "warn\|it/s]" \
      | tail -6 | tee -a "$log"
  done
fi
echo "=== done at ${SECONDS}s" | tee -a "$log"
[ $# -gt 0 ] && bash scripts/gpu_decode.sh "$out" "$@"
exit 0
