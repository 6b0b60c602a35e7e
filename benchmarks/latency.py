"""Batch-1 latency on the Qwen3-0.6B preset: decode ms per token at context 128, 1k and 4k with CUDA
graphs on and off, and time to first token for 128, 1k and 4k token prompts.

python -m benchmarks.latency [--model qwen3-0.6b] [--json PATH]
"""

import gc
import random
import statistics

import torch

from benchmarks.common import gpu_name, parser, print_table, require_cuda, write_json
from minivllm import LLM, SamplingParams

CONTEXTS = (128, 1024, 4096)


def measure(llm: LLM, context: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(median ms per decode token, median ms to first token) for one request of `context` prompt tokens."""
    decode_ms, ttft_ms = [], []
    for _ in range(repeats):
        prompt = [random.randrange(1000, 20000) for _ in range(context)]
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        metrics = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].metrics
        ttft_ms.append((metrics.first_token_time - metrics.arrival_time) * 1e3)
        decode_ms.append((metrics.finished_time - metrics.first_token_time) * 1e3 / (new_tokens - 1))
    return statistics.median(decode_ms), statistics.median(ttft_ms)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    require_cuda()
    random.seed(0)
    rows = []
    for eager in (False, True):
        # prefix caching off: repeated prompts must not turn time-to-first-token into a cache lookup
        llm = LLM(args.model, enforce_eager=eager, enable_prefix_caching=False, max_num_seqs=8,
                  max_model_len=8192, gpu_memory_utilization=0.5)
        measure(llm, 128, 8, 1)  # warm-up
        for context in CONTEXTS:
            decode, ttft = measure(llm, context, args.new_tokens, args.repeats)
            rows.append({"graphs": not eager, "context": context, "decode_ms_per_token": decode, "ttft_ms": ttft})
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    print(f"GPU {gpu_name()}")
    print_table(rows, "batch-1 latency")
    write_json(args.json, {"gpu": gpu_name(), "rows": rows})


if __name__ == "__main__":
    main()
