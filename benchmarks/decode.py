"""Paged-attention decode: a naive per-sequence PyTorch loop, the vectorised PyTorch reference (gather
pages, then SDPA) and our kernel, against the GPU's own copy bandwidth measured in the same run.

Ours is timed as CUDA-graph replays of back-to-back calls (as the engine runs decode), each call on its
own copy of the pages, so working sets smaller than L2 are not served from it. The baselines run eagerly
on one copy (their host overhead is small next to their GPU time).

Besides uniform batches, two kinds of mixed batch: 64 contexts drawn from 128..8k, and the contexts of
benchmarks.throughput's workload at a few decode steps, with that benchmark's block tables (4096 tokens wide),
as the engine runs them.

    python -m benchmarks.decode [--json PATH] [--mixed-only] [--ours-only] [--case BLOCK,BATCH,CONTEXT]
                                [--batches 1,64] [--contexts 1024,8192] [--min-calls N] [--plot PATH]

--case BLOCK,workload,STEP measures the workload's batch at that decode step. --batches and --contexts keep
only those uniform rows (the mixed ones always run), for sweeps that need a few rows. --plot PATH draws the
fraction of copy bandwidth against context, ours and vectorised PyTorch, a panel per batch size, and the mixed
batches in a panel of their own.
"""

import math

import torch

from benchmarks.common import (
    copy_bandwidth_gbs,
    gpu_name,
    graph_time_ms,
    parser,
    print_table,
    require_cuda,
    time_cuda_ms,
    write_json,
)
from benchmarks.plot import Panel, add_plot_argument, line_chart
from benchmarks.workload import nano_vllm_workload
from minivllm.ops import paged_attention_decode, reference

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16  # Qwen3-0.6B
BATCHES = [1, 8, 32, 64, 128, 256]
CONTEXTS = [512, 1024, 2048, 8192, 32768]
BLOCK_SIZES = [16, 256]
L2_ROTATION_BYTES = 256 << 20  # rotate copies until a graph's calls together touch this much (L2: 50 MB)
MAX_CACHE_BYTES = 16 << 30  # K+V of one copy; larger rows are skipped
MAX_VECTORISED_BYTES = 20 << 30  # the reference's fp32, head-repeated temporaries
MAX_NAIVE_TOKENS = 1 << 20  # batch x context beyond which the per-sequence loop takes minutes
WORKLOAD_STEPS = [100, 400, 700, 850, 950]
WORKLOAD_TABLE_TOKENS = 4096  # benchmarks.throughput's max_model_len: the width of its graphs' block tables


def naive_decode(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One sequence at a time: gather its pages, attend."""
    out = torch.empty_like(q)
    for b, length in enumerate(context_lens.tolist()):
        k = reference.gather_pages(k_cache, block_tables[b], length)
        v = reference.gather_pages(v_cache, block_tables[b], length)
        out[b : b + 1] = reference.attend(q[b : b + 1], k, v, scale, causal=False)
    return out


def workload_contexts(step: int) -> list[int]:
    """The context of every sequence still decoding at decode step `step` of benchmarks.throughput's workload,
    when all of them run together."""
    prompts, params = nano_vllm_workload()
    return [len(p) + step for p, sp in zip(prompts, params) if step < sp.max_tokens]


def measure(
    block_size: int,
    lengths: list[int],
    copy_gbs: float,
    label: str,
    table_tokens: int = 0,
    baselines: bool = True,
    min_calls: int = 1,
) -> dict:
    batch, longest = len(lengths), max(lengths)
    blocks_per_seq = math.ceil(max(longest, table_tokens) / block_size)
    token_bytes = NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize * 2  # K and V of one token
    kv_bytes = sum(lengths) * token_bytes
    row = {"block": block_size, "batch": batch, "context": label}
    if batch * blocks_per_seq * block_size * token_bytes > MAX_CACHE_BYTES:
        return row | {"note": "skipped: caches over 16 GB"}

    copies = max(1, min(64, math.ceil(L2_ROTATION_BYTES / kv_bytes)))
    blocks_per_copy = batch * blocks_per_seq
    shape = (copies * blocks_per_copy, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    # Each copy's sequences own a random permutation of that copy's pages, as a long-running cache would.
    tables = [
        (c * blocks_per_copy + torch.randperm(blocks_per_copy, device="cuda")).view(batch, blocks_per_seq).int()
        for c in range(copies)
    ]
    lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    total = torch.tensor([sum(lengths)], dtype=torch.int64, device="cuda")  # as the engine passes it
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    scale = HEAD_DIM**-0.5

    calls = [tables[i % copies] for i in range(max(copies, min_calls))]  # copies repeat past the rotation
    ours_ms = graph_time_ms(
        [lambda t=t: paged_attention_decode(q, k_cache, v_cache, t, lens, scale, total) for t in calls]
    )
    gbs = kv_bytes / (ours_ms * 1e-3) / 1e9
    row |= {"us": ours_ms * 1e3, "KV GB/s": gbs, "of copy": gbs / copy_gbs}

    if not baselines:
        return row
    args = (q, k_cache, v_cache, tables[0], lens, scale)
    vectorised_bytes = batch * blocks_per_seq * block_size * NUM_KV_HEADS * HEAD_DIM * 2 * (2 + 4 + 4 * 2)
    if vectorised_bytes <= MAX_VECTORISED_BYTES:
        vec_ms = time_cuda_ms(lambda: reference.paged_attention_decode(*args), warmup=2, iters=5)
        row |= {"vectorised us": vec_ms * 1e3, "x vectorised": vec_ms / ours_ms}
    else:
        row["note"] = "vectorised skipped: temporaries over 20 GB"
    if batch * longest <= MAX_NAIVE_TOKENS:
        naive_ms = time_cuda_ms(lambda: naive_decode(*args), warmup=1, iters=3)
        row |= {"naive us": naive_ms * 1e3, "x naive": naive_ms / ours_ms}
    else:
        row["note"] = (row["note"] + "; " if "note" in row else "") + "naive skipped: minutes"
    return row


COLUMNS = [
    "block",
    "batch",
    "context",
    "us",
    "KV GB/s",
    "of copy",
    "vectorised us",
    "x vectorised",
    "naive us",
    "x naive",
    "note",
]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--case", metavar="BLOCK,BATCH,CONTEXT", help="measure only this row (e.g. to profile it)")
    p.add_argument("--mixed-only", action="store_true", help="only the mixed batches (both block sizes)")
    p.add_argument("--ours-only", action="store_true", help="skip the PyTorch baselines")
    p.add_argument("--batches", type=int_list, default=BATCHES, help="uniform rows of these batch sizes only")
    p.add_argument("--contexts", type=int_list, default=CONTEXTS, help="uniform rows of these contexts only")
    p.add_argument("--min-calls", type=int, default=1,
                   help="at least this many calls in each timed graph (repeating copies), so that a graph launch's "
                   "own latency weighs less on rows of one copy")
    add_plot_argument(p, "the fraction of copy bandwidth against context")
    args = p.parse_args()
    if args.case and args.plot:
        p.error("--plot draws the whole sweep: leave out --case")
    opts = {"baselines": not args.ours_only, "min_calls": args.min_calls}
    require_cuda()
    copy_gbs = copy_bandwidth_gbs()
    print(f"{gpu_name()}: device-to-device copy {copy_gbs:.0f} GB/s (read + written)")
    print(f"shape (Hq, Hkv, D) = ({NUM_HEADS}, {NUM_KV_HEADS}, {HEAD_DIM}), {DTYPE}")

    if args.case:
        block, batch, context = args.case.split(",")
        if batch == "workload":
            row = measure(int(block), workload_contexts(int(context)), copy_gbs, f"workload step {context}",
                          table_tokens=WORKLOAD_TABLE_TOKENS, **opts)
        else:
            row = measure(int(block), [int(context)] * int(batch), copy_gbs, context, **opts)
        print_table([row], "paged-attention decode")
        return

    rows = []
    for block_size in BLOCK_SIZES:
        for batch in [] if args.mixed_only else args.batches:
            for context in args.contexts:
                rows.append(measure(block_size, [context] * batch, copy_gbs, str(context), **opts))
                torch.cuda.empty_cache()  # the next row's caches may be much larger
        generator = torch.Generator().manual_seed(0)
        mixed = torch.randint(128, 8193, (64,), generator=generator).tolist()
        rows.append(measure(block_size, mixed, copy_gbs, "mixed 128..8k", **opts))
        for step in WORKLOAD_STEPS:
            rows.append(measure(block_size, workload_contexts(step), copy_gbs, f"workload step {step}",
                                table_tokens=WORKLOAD_TABLE_TOKENS, **opts))
    rows = [{c: row.get(c) for c in COLUMNS} for row in rows]
    print_table(rows, "paged-attention decode (us per call; KV GB/s counts K and V bytes read once)")
    write_json(args.json, {"gpu": gpu_name(), "copy_gbs": copy_gbs, "rows": rows})
    if args.plot:
        draw(args.plot, rows, gpu_name(), copy_gbs)


def draw(path: str, rows: list[dict], gpu: str, copy_gbs: float) -> None:
    """Fraction of copy bandwidth, ours and vectorised PyTorch (where it ran): against context, a panel per batch
    size; the mixed and workload batches as markers in a last panel."""
    uniform = [row for row in rows if row["context"].isdigit()]
    panels = [
        Panel(f"batch {batch}", "context (tokens)",
              fraction_series([row for row in uniform if row["batch"] == batch], lambda row: int(row["context"])),
              logx=True)
        for batch in sorted({row["batch"] for row in uniform})
    ]
    mixed = [row for row in rows if not row["context"].isdigit()]
    if mixed:
        panels.append(Panel("mixed contexts", "batch",
                            fraction_series(mixed, lambda row: row["context"].replace("workload ", "")),
                            markers_only=True))
    line_chart(path, panels, title=f"paged-attention decode, (Hq, Hkv, D) = ({NUM_HEADS}, {NUM_KV_HEADS}, "
               f"{HEAD_DIM}), {DTYPE}", gpu=gpu, baseline=f"copy bandwidth {copy_gbs:.0f} GB/s measured in this run",
               ylabel="fraction of copy bandwidth", ceiling=1.0, ceiling_label="copy bandwidth")


def fraction_series(rows: list[dict], x_of) -> dict[str, tuple[list, list[float | None]]]:
    """Ours and the vectorised reference, a series each for every block size among the rows."""
    series = {}
    for block in sorted({row["block"] for row in rows}):
        mine = [row for row in rows if row["block"] == block]
        xs = [x_of(row) for row in mine]
        series[f"ours, block {block}"] = (xs, [row.get("of copy") for row in mine])
        series[f"vectorised PyTorch, block {block}"] = (
            xs, [row["of copy"] / row["x vectorised"] if row.get("x vectorised") else None for row in mine])
    return series


if __name__ == "__main__":
    main()
