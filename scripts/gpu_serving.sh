#!/usr/bin/env bash
# The online paths on a GPU machine against the offline engine, in one run: build, benchmarks.throughput (the
# offline baseline), run-batch --replicas 1 over the same requests, and benchmarks.serving (HTTP streaming at
# maximum concurrency, then a Poisson rate at half the requests/s it reached). Logs and JSON go to OUT_DIR.
#   scripts/gpu_serving.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_serving.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/serving.log"
. scripts/gpu_env.sh
bash scripts/gpu_build.sh >"$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
timeout 120 python3 -m benchmarks.throughput --json "$out/throughput.json" 2>&1 | grep -v -i warn | tee -a "$log"
python3 - "$out/batch.jsonl" <<'PY'
import json, sys
from benchmarks.workload import nano_vllm_workload
prompts, params = nano_vllm_workload()
with open(sys.argv[1], "w") as f:
    for i, (ids, sp) in enumerate(zip(prompts, params)):
        body = {"model": "qwen3-0.6b", "prompt": ids, "max_tokens": sp.max_tokens, "temperature": sp.temperature,
                "ignore_eos": True}
        f.write(json.dumps({"custom_id": str(i), "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
PY
echo "=== run-batch --replicas 1 (the throughput workload)" | tee -a "$log"
timeout 120 python3 -m minivllm run-batch -i "$out/batch.jsonl" -o /tmp/batch_out.jsonl --model qwen3-0.6b \
  --max-model-len 4096 --log-level info 2>&1 | grep "run-batch" | tee -a "$log"
echo "=== benchmarks.serving" | tee -a "$log"
timeout 200 python3 -m benchmarks.serving --json "$out/serving.json" 2>&1 | grep -v -i "warn\|it/s]" | tail -25 | tee -a "$log"
