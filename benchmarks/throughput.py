"""End-to-end offline throughput on nano-vllm's workload: 256 requests of random token ids, prompts of
100..1024 tokens, 100..1024 output tokens each (ignore_eos, temperature 0.6), Qwen3-0.6B preset in bf16.

python -m benchmarks.throughput [--model qwen3-0.6b] [--tensor-parallel-size N] [--tp-invariant N] [--compare-hf]
                                [--logprobs K] [--presence-penalty X] [--repetition-penalty X] [--json PATH]
                                [--breakdown] [--plot PATH]
The sampling extras (--logprobs, the penalties) apply to every request, to measure what they cost.
--breakdown (or --plot PATH, which draws it) runs the workload a second time after the timed run, on the same
engine, with a few decode steps under torch.profiler every so often, and prints where a decode step's time goes
(attention, matrix products, the rest of the GPU, host wait) as the batch shrinks over the run.
"""

import time
from collections import defaultdict

import torch

from benchmarks.common import (
    add_sampling_extras,
    copy_bandwidth_gbs,
    gpu_name,
    parser,
    print_table,
    require_cuda,
    with_sampling_extras,
    write_json,
)
from benchmarks.plot import add_plot_argument, stacked_bars
from benchmarks.step_profile import KERNEL_KINDS, StepClock, Window, profile_run, time_by_kind
from benchmarks.workload import decode_floor_bytes, nano_vllm_workload, streamed_bytes
from minivllm import LLM, SamplingParams

BREAKDOWN_EVERY, BREAKDOWN_STEPS, BREAKDOWN_BIN = 25, 4, 100  # 4 decode steps profiled every 25, binned by 100


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split the model over")
    p.add_argument("--tp-invariant", type=int, default=0, help="LLM(tp_invariant=N): bitwise the same at every TP size")
    p.add_argument("--compare-hf", action="store_true", help="also time HF transformers' generate on a slice")
    add_sampling_extras(p)
    p.add_argument("--breakdown", action="store_true",
                   help="then a second, profiled pass: where each decode step's time goes over the run")
    add_plot_argument(p, "the breakdown as stacked bars (implies --breakdown)")
    args = p.parse_args()
    for flag, wanted in (("--compare-hf", args.compare_hf), ("--breakdown/--plot", args.breakdown or args.plot)):
        if wanted and args.tensor_parallel_size > 1:
            p.error(f"{flag} needs the whole model in this process: use --tensor-parallel-size 1")
    require_cuda()
    bandwidth = copy_bandwidth_gbs()

    prompts, params = nano_vllm_workload(args.num_seqs)
    params, extras = with_sampling_extras(params, args)
    expected_tokens = sum(sp.max_tokens for sp in params)
    start = time.perf_counter()
    llm = LLM(args.model, max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
              tensor_parallel_size=args.tensor_parallel_size, tp_invariant=args.tp_invariant)
    startup = time.perf_counter() - start
    llm.generate(["Benchmark: "], SamplingParams(), use_tqdm=False)  # warm-up request

    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == expected_tokens, f"produced {produced} tokens, the workload asks for {expected_tokens}"

    runner = llm.llm_engine.runner
    weight_bytes, kv_bytes_per_token = streamed_bytes(runner)
    floor_bytes = decode_floor_bytes(
        [len(ids) for ids in prompts], [sp.max_tokens for sp in params], kv_bytes_per_token, weight_bytes,
    )
    floor_s = floor_bytes / (bandwidth * 1e9)
    row = {
        "engine": "minivllm",
        "tensor_parallel_size": args.tensor_parallel_size,
        "tp_invariant": args.tp_invariant,
        "sampling_extras": ", ".join(f"{k}={v}" for k, v in extras.items() if v not in (None, 0.0, 1.0)) or "-",
        "requests": len(prompts),
        "output_tokens": produced,
        "seconds": elapsed,
        "tokens_per_s": produced / elapsed,
        "floor_s": floor_s,
        "fraction_of_floor": floor_s / elapsed,
        "preemptions": llm.llm_engine.scheduler.num_preemptions,
    }
    rows = [row]
    print(f"GPU {gpu_name()}, copy bandwidth {bandwidth:.0f} GB/s, KV blocks {runner.num_kv_blocks} "
          f"(block {runner.block_size}), startup {startup:.1f} s, graph capture {runner.graph_capture_seconds:.1f} s "
          f"({len(runner.captured_graphs)} graphs, {runner.graph_memory_bytes / 2**20:.0f} MiB held)")
    if args.compare_hf:
        rows += compare_hf(llm, prompts, params)
    print_table(rows, "throughput (nano-vllm workload)")
    payload = {"gpu": gpu_name(), "copy_gbs": bandwidth, "rows": rows}
    if args.breakdown or args.plot:
        payload["breakdown"] = breakdown(llm, prompts, params)
    write_json(args.json, payload)
    if args.plot:
        draw(args.plot, payload["breakdown"], row["tokens_per_s"], gpu_name(), bandwidth)


def breakdown(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[dict]:
    """The workload again on the same engine, BREAKDOWN_STEPS decode steps profiled every BREAKDOWN_EVERY; the
    printed table of breakdown_rows. (Its prompts hit the prefix cache the timed run filled; windows hold decode.)"""
    starts = list(range(0, max(sp.max_tokens for sp in params), BREAKDOWN_EVERY))
    windows = profile_run(llm.llm_engine, StepClock(llm.llm_engine), prompts, params, starts, BREAKDOWN_STEPS)
    rows = breakdown_rows(windows, BREAKDOWN_BIN)
    print_table(rows, f"where a decode step's time goes, ms per decode step ({BREAKDOWN_STEPS} decode steps under "
                f"torch.profiler every {BREAKDOWN_EVERY}; each kind's exposed GPU time; host wait = wall minus the "
                "GPU's busy span)")
    return rows


def draw(path: str, rows: list[dict], tokens_per_s: float, gpu: str, bandwidth: float) -> None:
    """breakdown_rows as stacked bars: ms per decode step by kind, a bar a bin of decode steps."""
    stacked_bars(path, [f"{row['decode steps']}\nbatch {row['batch']}" for row in rows],
                 {kind: [row[f"{kind} ms"] for row in rows] for kind in (*KERNEL_KINDS, "host wait")},
                 title=f"where a decode step's time goes, nano-vllm workload ({tokens_per_s:,.0f} output tokens/s "
                 "unprofiled)", gpu=gpu, baseline=f"copy bandwidth {bandwidth:.0f} GB/s measured in this run",
                 xlabel="decode steps (sampled under torch.profiler)", ylabel="ms per decode step")


def breakdown_rows(windows: list[Window], bin_steps: int) -> list[dict]:
    """Profiled windows binned by the decode-step index they start at: the decode steps they cover, the batch at
    their starts, and per decode step: wall ms, GPU ms by kernel kind (the kernels' exposed times: what each adds
    to the GPU's busy span, so that a kernel launched early under PDL, waiting inside for the one before it, is not
    counted twice), host wait (wall minus the busy span)."""
    bins: dict[int, list[Window]] = defaultdict(list)
    for window in windows:
        if window.decode_steps:
            bins[window.first_step // bin_steps].append(window)
    rows = []
    for group in (bins[b] for b in sorted(bins)):
        steps = sum(w.decode_steps for w in group)
        wall_ms = sum(w.wall_ms for w in group) / steps
        gpu_ms = dict.fromkeys(KERNEL_KINDS, 0.0)
        for window in group:
            for kind, us in time_by_kind(window.kernels.exposed_us).items():
                gpu_ms[kind] += us / 1e3 / steps
        batches = [w.batch for w in group]
        rows.append({
            "decode steps": f"{group[0].first_step}..{group[-1].first_step + group[-1].decode_steps - 1}",
            "batch": f"{max(batches)}..{min(batches)}" if len(set(batches)) > 1 else str(batches[0]),
            "profiled steps": steps,
            "wall ms": wall_ms,
            **{f"{kind} ms": ms for kind, ms in gpu_ms.items()},
            "host wait ms": wall_ms - sum(gpu_ms.values()),
            "prefill steps": sum(w.prefill_steps for w in group),
        })
    return rows


def compare_hf(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], size: int = 16) -> list[dict]:
    """HF transformers' generate and minivllm on the same slice of the workload, same weights, one batch."""
    from transformers import AutoModelForCausalLM

    slice_prompts, new_tokens = prompts[:size], 256
    hf = AutoModelForCausalLM.from_config(llm.hf_config, dtype=torch.bfloat16).cuda().eval()
    hf.load_state_dict(hf_state_dict(llm), strict=False)
    width = max(map(len, slice_prompts))
    ids = torch.tensor([[0] * (width - len(x)) + x for x in slice_prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in slice_prompts], device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, temperature=0.6, top_k=0)
    hf.generate(ids[:1, -8:], attention_mask=mask[:1, -8:], max_new_tokens=4)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf.generate(ids, attention_mask=mask, **kwargs)
    torch.cuda.synchronize()
    hf_s = time.perf_counter() - start
    del hf
    sp = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=new_tokens)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": x} for x in slice_prompts], sp, use_tqdm=False)
    ours_s = time.perf_counter() - start
    tokens = size * new_tokens
    return [
        {"engine": f"hf-generate (slice of {size})", "requests": size, "output_tokens": tokens, "seconds": hf_s,
         "tokens_per_s": tokens / hf_s},
        {"engine": f"minivllm (slice of {size})", "requests": size, "output_tokens": tokens, "seconds": ours_s,
         "tokens_per_s": tokens / ours_s},
    ]


def hf_state_dict(llm: LLM) -> dict[str, torch.Tensor]:
    """Our weights under HF's names: packed qkv and gate_up split back into their checkpoint matrices."""
    model = llm.llm_engine.runner.model
    unpack = {}
    for piece, (packed, shard) in model.packed_modules.items():
        unpack.setdefault(packed, []).append((shard, piece))
    state = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        packed = module_name.rpartition(".")[2]
        if packed in unpack:
            module = model.get_submodule(module_name)
            for shard, piece in unpack[packed]:
                state[f"{module_name.rpartition('.')[0]}.{piece}.{leaf}"] = module.shard(tensor, shard)
        else:
            state[name] = tensor
    return state


if __name__ == "__main__":
    main()
