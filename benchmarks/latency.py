"""Batch-1 latency on the Qwen3-0.6B preset: decode ms per token at contexts 128, 1k, 4k, 16k and 32k with CUDA
graphs on and off, a batch of 8 at context 1k (ms per decode step), and time to first token for those prompts.

Beside each decode figure, the weight-and-KV floor: every weight read once a step plus each sequence's K/V at its
context, at the copy bandwidth measured in this run; of_floor is the floor over our time.

python -m benchmarks.latency [--model qwen3-0.6b] [--graphs-only] [--json PATH] [--plot PATH]
"""

import gc
import random
import statistics

import torch

from benchmarks.common import copy_bandwidth_gbs, gpu_name, parser, print_table, require_cuda, write_json
from benchmarks.plot import Panel, add_plot_argument, line_chart
from benchmarks.workload import streamed_bytes
from minivllm import LLM, SamplingParams

CONTEXTS = (128, 1024, 4096, 16384, 32768)
BATCH, BATCH_CONTEXT = 8, 1024  # issue 17's batch row


def measure(llm: LLM, context: int, new_tokens: int, repeats: int, batch: int = 1) -> tuple[float, float]:
    """(median ms per decode step, median ms to first token) for `batch` requests of `context` prompt tokens."""
    decode_ms, ttft_ms = [], []
    for _ in range(repeats):
        prompts = [{"prompt_token_ids": [random.randrange(1000, 20000) for _ in range(context)]} for _ in range(batch)]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        for output in llm.generate(prompts, params, use_tqdm=False):
            metrics = output.metrics
            ttft_ms.append((metrics.first_token_time - metrics.arrival_time) * 1e3)
            decode_ms.append((metrics.finished_time - metrics.first_token_time) * 1e3 / (new_tokens - 1))
    return statistics.median(decode_ms), statistics.median(ttft_ms)


def floor_ms(weight_bytes: int, kv_bytes_per_token: int, contexts: list[int], copy_gbs: float) -> float:
    """The least a decode step can take: every weight read once and each sequence's K/V at its context, at the
    copy bandwidth (GB/s, as copy_bandwidth_gbs counts it)."""
    return (weight_bytes + kv_bytes_per_token * sum(contexts)) / (copy_gbs * 1e9) * 1e3


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--graphs-only", action="store_true", help="skip the eager rows (half the time, for A/B runs)")
    add_plot_argument(p, "ms per token against context, graphs, eager and the floor")
    args = p.parse_args()
    require_cuda()
    random.seed(0)
    bandwidth = copy_bandwidth_gbs()
    rows = []
    for eager in (False,) if args.graphs_only else (False, True):
        # prefix caching off: repeated prompts must not turn time-to-first-token into a cache lookup
        llm = LLM(args.model, enforce_eager=eager, enable_prefix_caching=False, max_num_seqs=BATCH,
                  max_model_len=max(CONTEXTS) + args.new_tokens, gpu_memory_utilization=0.5)
        weight_bytes, kv_bytes_per_token = streamed_bytes(llm.llm_engine.runner)
        measure(llm, 128, 8, 1)  # warm-up
        for batch, context in [(1, c) for c in CONTEXTS] + [(BATCH, BATCH_CONTEXT)]:
            decode, ttft = measure(llm, context, args.new_tokens, args.repeats, batch)
            floor = floor_ms(weight_bytes, kv_bytes_per_token, [context] * batch, bandwidth)
            rows.append({"graphs": not eager, "context": context, "decode_ms_per_token": decode, "ttft_ms": ttft,
                         "batch": batch, "floor_ms": floor, "of_floor": floor / decode})
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU {gpu_name()}, copy bandwidth {bandwidth:.0f} GB/s, weights {weight_bytes / 1e9:.2f} GB, "
          f"KV {kv_bytes_per_token} bytes a token")
    print_table(rows, "decode latency (batch 8: ms per step, a token for each) and time to first token")
    write_json(args.json, {"gpu": gpu_name(), "rows": rows, "copy_gbs": bandwidth, "weight_bytes": weight_bytes,
                           "kv_bytes_per_token": kv_bytes_per_token})
    if args.plot:
        draw(args.plot, rows, gpu_name(), bandwidth)


def draw(path: str, rows: list[dict], gpu: str, bandwidth: float) -> None:
    """ms per token against context at batch 1: graphs, eager and the floor; the batch row as points."""
    series = {}
    for batch in sorted({row["batch"] for row in rows}):
        of_batch = [row for row in rows if row["batch"] == batch]
        for graphs in (True, False):
            mine = [row for row in of_batch if row["graphs"] == graphs]
            if mine:
                series[f"batch {batch}, {'CUDA graphs' if graphs else 'eager'}"] = (
                    [row["context"] for row in mine], [row["decode_ms_per_token"] for row in mine])
        floors = [row for row in of_batch if row["graphs"]]
        series[f"batch {batch}, weight + KV floor"] = ([row["context"] for row in floors],
                                                       [row["floor_ms"] for row in floors])
    line_chart(path, [Panel("decode", "context (tokens)", series, logx=True, logy=True)],
               title="decode ms per token (a step at batch > 1)", gpu=gpu,
               baseline=f"floor at copy bandwidth {bandwidth:.0f} GB/s measured in this run", ylabel="ms")


if __name__ == "__main__":
    main()
