"""What the sampling extras cost on the GPU, one decode step's sampler at a time: a temperature draw alone, then
with presence/repetition penalties (counts kept on the device), with logprobs, and both; and the top-k that
logprobs need, torch.topk against ours (minivllm.layers.sampler.top_k). fp32 logits [rows, vocab] as the lm_head
makes them; median GPU milliseconds a call over CUDA events, the copy bandwidth of this run beside them.

python -m benchmarks.sampler [--rows 256] [--vocab 151936] [--logprobs 5] [--json PATH]
"""

import torch

from benchmarks.common import copy_bandwidth_gbs, gpu_name, parser, print_table, require_cuda, time_cuda_ms, write_json
from minivllm.layers.penalties import Penalties, PenaltyCounts
from minivllm.layers.sampler import SamplingBatch, sample, top_k


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--logprobs", type=int, default=5)
    args = p.parse_args()
    require_cuda()
    bandwidth = copy_bandwidth_gbs()
    rows, vocab, device = args.rows, args.vocab, torch.device("cuda")
    logits = torch.randn(rows, vocab, device=device) * 3
    counts = PenaltyCounts(vocab, rows, device)
    counts.fill(rows, None, None, None)
    counts.count(torch.arange(rows, device=device).repeat(64), torch.randint(0, vocab, (64 * rows,), device=device))
    slots = torch.arange(rows, device=device)
    penalties = Penalties(slots, slots, torch.full((rows,), 0.5, device=device), torch.zeros(rows, device=device),
                          torch.full((rows,), 1.1, device=device), counts)

    def batch(with_penalties: bool, num_logprobs: int) -> SamplingBatch:
        return SamplingBatch(torch.full((rows,), 0.6, device=device), None, None, None, [], all_greedy=False,
                             any_greedy=False, penalties=penalties if with_penalties else None,
                             num_logprobs=num_logprobs)

    cases = {
        "temperature": batch(False, -1),
        "+ penalties": batch(True, -1),
        f"+ logprobs={args.logprobs}": batch(False, args.logprobs),
        f"+ penalties + logprobs={args.logprobs}": batch(True, args.logprobs),
    }
    results = [{"what": f"sample, {name}", "ms": time_cuda_ms(lambda b=b: sample(logits, b))}
               for name, b in cases.items()]
    k = args.logprobs
    results.append({"what": f"torch.topk(k={k})", "ms": time_cuda_ms(lambda: logits.topk(k))})
    results.append({"what": f"top_k(k={k}), ours", "ms": time_cuda_ms(lambda: top_k(logits, k))})
    base = results[0]["ms"]
    for row in results:
        row["x temperature alone"] = row["ms"] / base
    print(f"GPU {gpu_name()}, copy bandwidth {bandwidth:.0f} GB/s; fp32 logits [{rows}, {vocab}] "
          f"({rows * vocab * 4 / 1e6:.0f} MB, {rows * vocab * 4 / bandwidth / 1e6:.3f} ms to read at that rate)")
    print_table(results, "the sampler, one step")
    write_json(args.json, {"gpu": gpu_name(), "copy_gbs": bandwidth, "rows": rows, "vocab": vocab, "results": results})


if __name__ == "__main__":
    main()
