"""What the sampling extras cost on the GPU, one decode step's sampler at a time: a temperature draw alone, then
with presence/repetition penalties (counts kept on the device), with logprobs, and both; and the top-k that
logprobs need, torch.topk against ours (minivllm.layers.sampler.top_k). fp32 logits [rows, vocab] as the lm_head
makes them; median GPU milliseconds a call over CUDA events, the copy bandwidth of this run beside them.

Then the sampler kernels (csrc/sampler.cu) against the torch.compile'd functions they are to replace, at 1, 8, 64
and 256 rows (--kernel-rows): the temperature + Gumbel argmax with and without penalties (penalized() then
temperature_gumbel_max()) and the log-sum-exp + rank of logprobs; GB/s of the bytes each must read (logits and
noise; the penalty tables' rows; the logits alone), as a fraction of the copy bandwidth.

python -m benchmarks.sampler [--rows 256] [--vocab 151936] [--logprobs 5] [--kernel-rows 1 8 64 256] [--json PATH]
"""

import torch

from benchmarks.common import copy_bandwidth_gbs, gpu_name, parser, print_table, require_cuda, time_cuda_ms, write_json
from minivllm import ops
from minivllm.layers.fusion import fused_on_gpu
from minivllm.layers.penalties import Penalties, PenaltyCounts, penalized
from minivllm.layers.sampler import SamplingBatch, sample, top_k
from minivllm.ops import reference

# the torch.compile'd functions that the engine ran before the kernels, for kernel_rows()
temperature_gumbel_max = fused_on_gpu(reference.temperature_gumbel_max)
log_sum_exp_and_count_above = fused_on_gpu(reference.log_sum_exp_and_count_above)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--logprobs", type=int, default=5)
    p.add_argument("--kernel-rows", type=int, nargs="+", default=[1, 8, 64, 256])
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
    kernels = kernel_rows(args.kernel_rows, vocab, bandwidth) if ops.KERNELS_BUILT else []
    if kernels:
        print_table(kernels, "the sampler kernels against the compiled functions")
    write_json(args.json, {"gpu": gpu_name(), "copy_gbs": bandwidth, "rows": rows, "vocab": vocab, "results": results,
                           "kernels": kernels})


def kernel_rows(row_counts: list[int], vocab: int, bandwidth: float) -> list[dict]:
    """Ours (torch.ops.minivllm) and the compiled functions, one row each a (reduction, rows): ms and GB/s of the
    bytes the reduction must read."""
    return [row for rows in row_counts for row in kernel_rows_at(rows, vocab, bandwidth)]


def kernel_rows_at(rows: int, vocab: int, bandwidth: float) -> list[dict]:
    device = torch.device("cuda")
    logits = torch.randn(rows, vocab, device=device) * 3
    noise = torch.empty(rows, vocab, device=device).exponential_()
    temperatures = torch.full((rows,), 0.6, device=device)
    counts = torch.randint(0, 3, (rows, vocab), device=device, dtype=torch.int32)
    counts *= torch.rand(rows, vocab, device=device) < 0.01
    in_prompt = torch.rand(rows, vocab, device=device) < 0.01
    slots = torch.arange(rows, device=device)
    per_row = [torch.full((rows,), v, device=device) for v in (0.5, 0.1, 1.1)]  # presence, frequency, repetition
    tables = (counts, in_prompt, slots, *per_row)
    tokens = temperature_gumbel_max(logits, temperatures, noise)
    chosen = logits.gather(1, tokens.unsqueeze(1)).squeeze(1)
    elements = rows * vocab
    cases = [  # what, bytes read, compiled, ours
        ("temperature + gumbel argmax", 8 * elements,
         lambda: temperature_gumbel_max(logits, temperatures, noise),
         lambda: torch.ops.minivllm.sampler_gumbel_argmax(logits, noise, temperatures)),
        ("+ penalties", 13 * elements,
         lambda: temperature_gumbel_max(penalized(logits, *tables), temperatures, noise),
         lambda: torch.ops.minivllm.sampler_gumbel_argmax(logits, noise, temperatures, *tables)),
        ("log-sum-exp + rank", 4 * elements,
         lambda: log_sum_exp_and_count_above(logits, chosen),
         lambda: torch.ops.minivllm.sampler_logsumexp_rank(logits, tokens)),
    ]
    results = []
    for what, num_bytes, compiled, ours in cases:
        compiled_ms, ours_ms = time_cuda_ms(compiled), time_cuda_ms(ours)
        gbs = num_bytes / ours_ms / 1e6
        results.append({"what": what, "rows": rows, "compiled ms": compiled_ms, "ours ms": ours_ms, "ours GB/s": gbs,
                        "x copy": gbs / bandwidth, "ours / compiled": ours_ms / compiled_ms})
    return results


if __name__ == "__main__":
    main()
