#!/usr/bin/env bash
# A/B of two versions on one GPU machine, in one run (the only comparison that counts): each source tree is built
# in place, the GPU tests run on B, and benchmarks.throughput and benchmarks.latency run on both, interleaved
# (B A ... A B) so that drift of the machine shows. Logs and JSON go to OUT_DIR.
#   scripts/gpu_ab.sh OUT_DIR A_DIR B_DIR [pytest -k expression]
# AB_EXTRAS="--logprobs 5 ..." adds throughput runs with those arguments on both trees (A B, twice); AB_LATENCY=0 skips
# the latency runs, AB_LATENCY_ARGS="--graphs-only" passes arguments to them; AB_ROUNDS=1 stops after the first round
# (B A, then A B with the extras).
# Make the trees with `git archive REV | tar -x -C DIR` into a folder .git/info/exclude ignores, and carry it.
# Packages the machine lacks can travel as wheels in .whl/ (see scripts/gpu_check.sh).
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_ab.sh OUT_DIR A_DIR B_DIR [pytest -k expression]}")
a=$(realpath "${2:?A_DIR}") b=$(realpath "${3:?B_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/ab.log"
. scripts/gpu_env.sh
if diff -rq "$a/csrc" "$b/csrc" >/dev/null && cmp -s "$a/setup.py" "$b/setup.py"; then
  echo "same kernels in A and B: one build" | tee -a "$log"
  (cd "$b" && bash scripts/gpu_build.sh >"$out/build.log" 2>&1) || { tail -50 "$out/build.log"; exit 1; }
  cp "$b"/minivllm/_C*.so "$a/minivllm/"
else
  for tree in "$a" "$b"; do
    (cd "$tree" && MAX_JOBS=8 bash scripts/gpu_build.sh >"$out/build_$(basename "$tree").log" 2>&1) &
  done
  wait || { tail -50 "$out"/build_*.log; exit 1; }
fi

bench() {  # bench TREE NAME ARGS...: one benchmark in one tree, bounded in time
  local tree=$1 name=$2
  shift 2
  echo "=== $(basename "$tree"): $name $*" | tee -a "$log"
  (cd "$tree" && timeout 200 python3 -m benchmarks."$name" "$@" --json "$out/${name}_$(basename "$tree")_$SECONDS.json") \
    2>&1 | grep -v "it/s]" | tee -a "$log"
}

bench "$b" throughput
(cd "$b" && timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu ${4:+-k "$4"}) 2>&1 | tail -15 | tee -a "$log"
bench "$a" throughput
if [ -n "${AB_EXTRAS:-}" ]; then
  bench "$a" throughput $AB_EXTRAS
  bench "$b" throughput $AB_EXTRAS
fi
[ "${AB_ROUNDS:-2}" = 1 ] && exit 0
if [ "${AB_LATENCY:-1}" != 0 ]; then
  bench "$a" latency ${AB_LATENCY_ARGS:-}
  bench "$b" latency ${AB_LATENCY_ARGS:-}
fi
bench "$a" throughput
bench "$b" throughput
if [ -n "${AB_EXTRAS:-}" ]; then
  bench "$a" throughput $AB_EXTRAS
  bench "$b" throughput $AB_EXTRAS
fi
