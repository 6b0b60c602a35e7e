#!/usr/bin/env bash
# The online paths on a GPU machine against the offline engine, in one run: build, benchmarks.throughput (the
# offline baseline), run-batch --replicas 1 over the same requests, which processes hold the GPU while
# `minivllm serve` runs (the engine process alone: the server keeps no CUDA context), and benchmarks.serving
# (the same requests offline, then HTTP streaming at maximum concurrency, then a Poisson rate at half the
# requests/s it reached, each as a fraction of offline). Logs and JSON go to OUT_DIR. SERVING_OFFLINE=0 skips the
# build and benchmarks.throughput (when a script has just run them).
#   scripts/gpu_serving.sh OUT_DIR
set -uo pipefail
out=$(realpath -m "${1:?usage: scripts/gpu_serving.sh OUT_DIR}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
log="$out/serving.log"
. scripts/gpu_env.sh
if [ "${SERVING_OFFLINE:-1}" != 0 ]; then
  build_in_place
  timeout 120 python3 -m benchmarks.throughput --json "$out/throughput.json" 2>&1 | grep -v -i warn | tee -a "$log"
fi
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
timeout 400 python3 -m benchmarks.serving --json "$out/serving.json" 2>&1 | grep -v -i "warn\|it/s]" | tail -25 | tee -a "$log"
echo "=== GPU processes while minivllm serve runs (the server's own pid must not be among them)" | tee -a "$log"
python3 -m minivllm serve qwen3-0.6b --port 8123 --max-model-len 4096 --log-level warning >"$out/serve.log" 2>&1 &
server=$!
python3 - <<'PY'
import time, httpx
for _ in range(240):
    try:
        if httpx.get("http://127.0.0.1:8123/health", timeout=2).status_code == 200:
            break
    except httpx.TransportError:
        pass
    time.sleep(0.5)
PY
echo "server pid $server; its children (the engine process, multiprocessing's resource tracker): $(pgrep -P $server -f multiprocessing | tr '\n' ' ')" | tee -a "$log"
nvidia-smi --query-compute-apps=pid,used_memory --format=csv | tee -a "$log"
kill -TERM $server; wait $server; echo "server exit status $?" | tee -a "$log"
