"""Causal prefill attention at 16k tokens a batch: naive PyTorch (full score matrix), our naive CUDA kernel
(one row of fp32 scores per query), torch SDPA's FlashAttention-2 and cuDNN backends, and our flash kernel
(minivllm.ops.flash_attn_varlen: on an sm_90 GPU its TMA + wgmma kernel, with the mma.sync one, which it runs
elsewhere, in a row of its own), the last also with K/V read from a paged cache (`ours_paged`, the path of a
cached prefix and of chunked prefill: the same sequences in shuffled cache blocks through a block table).

    python -m benchmarks.prefill [--json PATH] [--plot PATH] [--block-size N]

TFLOP/s count causal work: half of 4 * L^2 * D * Hq per sequence. GQA baselines get K/V heads expanded
(repeat_interleave) outside the timed region. The mixed-length batch runs the SDPA baselines one sequence
at a time, as SDPA has no varlen entry. --plot PATH draws TFLOP/s against sequence length, a panel per head shape
(the mixed batch is in the table only).
"""

import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import common
from benchmarks.plot import Panel, add_plot_argument, line_chart
from minivllm import ops

TOKENS = 16384
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
HEADS = ((16, 8, 128), (32, 8, 128), (9, 3, 64))  # (Hq, Hkv, D): Qwen3-0.6B, Llama-3-8B, a small Llama
MIXED_LENGTHS = (3000, 160, 4096, 700, 1500, 2600, 64, 1024, 2048, 1200)  # about 16k tokens
NAIVE_MAX_SCORE_BYTES = 4 << 30  # the naive paths' fp32 scores; larger ones are skipped
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
METHOD_NAMES = {"ours": "ours (flash)", "ours_paged": "ours (flash, paged K/V)", "ours_mma": "ours (mma.sync)",
                "cudnn": "SDPA cuDNN", "fa2": "SDPA FlashAttention-2", "naive_cuda": "our naive CUDA",
                "naive": "naive PyTorch"}  # measure()'s methods, as plotted
SM90_SWITCH = "MINIVLLM_PREFILL_SM90"  # "0": flash_attn_varlen keeps an sm_90 GPU on the mma.sync kernel


def causal_flops(lengths: list[int], num_heads: int, head_dim: int) -> float:
    return sum(2 * n * n * head_dim * num_heads for n in lengths)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, L, D] attention through the whole [L, L] score matrix, softmax in fp32."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    n = q.shape[-2]
    mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def sdpa(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def paged_cache(
    k: torch.Tensor, v: torch.Tensor, lengths: list[int], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed k, v [T, Hkv, D] copied into caches of [blocks, block_size, Hkv, D] in shuffled block order, as an
    engine's cache holds them, and the block table [B, max blocks] that finds each sequence's blocks."""
    per_seq = [-(-n // block_size) for n in lengths]
    order = torch.randperm(sum(per_seq), device=k.device)
    caches = [t.new_zeros(sum(per_seq), block_size, *t.shape[1:]) for t in (k, v)]
    table = torch.zeros(len(lengths), max(per_seq), dtype=torch.int32, device=k.device)
    start = used = 0
    for i, (n, blocks) in enumerate(zip(lengths, per_seq)):
        ids = order[used:used + blocks]
        table[i, :blocks] = ids.int()
        for cache, t in zip(caches, (k, v)):
            padded = t.new_zeros(blocks * block_size, *t.shape[1:])
            padded[:n] = t[start:start + n]
            cache[ids] = padded.view(blocks, block_size, *t.shape[1:])
        start, used = start + n, used + blocks
    return caches[0], caches[1], table


def measure(
    lengths: list[int], num_heads: int, num_kv_heads: int, head_dim: int, label: str, dtype: torch.dtype,
    block_size: int,
) -> dict:
    total = sum(lengths)
    scale = head_dim**-0.5
    q = torch.randn(total, num_heads, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(total, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(total, num_kv_heads, head_dim, device="cuda", dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    group = num_heads // num_kv_heads

    def ours():
        return ops.flash_attn_varlen(q, k, v, cu, cu, max(lengths), max(lengths), scale, True)

    k_cache, v_cache, table = paged_cache(k, v, lengths, block_size)

    def ours_paged():
        return ops.flash_attn_varlen(q, k_cache, v_cache, cu, cu, max(lengths), max(lengths), scale, True, table)

    def ours_mma_sync():
        previous = os.environ.get(SM90_SWITCH)
        os.environ[SM90_SWITCH] = "0"
        try:
            return ours()
        finally:
            if previous is None:
                del os.environ[SM90_SWITCH]
            else:
                os.environ[SM90_SWITCH] = previous

    def naive_cuda():
        return ops.naive_attention_varlen(q, k, v, cu, cu, max(lengths), max(lengths), scale)

    # Per sequence [1, H, L, D] views for SDPA, K/V heads expanded to Hq; equal lengths form one batch.
    starts = cu.tolist()
    k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if len(set(lengths)) == 1:
        b, n = len(lengths), lengths[0]
        batches = [tuple(t.view(b, n, num_heads, head_dim).transpose(1, 2) for t in (q, k_full, v_full))]
    else:
        batches = [
            tuple(t[a:e].unsqueeze(0).transpose(1, 2) for t in (q, k_full, v_full))
            for a, e in zip(starts[:-1], starts[1:])
        ]

    def run_each(fn):
        return lambda: [fn(*qkv) for qkv in batches]

    flops = causal_flops(lengths, num_heads, head_dim)
    row = {"heads": f"{num_heads}/{num_kv_heads}/{head_dim}", "batch": label}
    methods = {
        "naive": run_each(lambda *qkv: naive_attention(*qkv, scale)),
        "naive_cuda": naive_cuda,
        "fa2": run_each(lambda *qkv: sdpa(SDPBackend.FLASH_ATTENTION, *qkv, scale)),
        "cudnn": run_each(lambda *qkv: sdpa(SDPBackend.CUDNN_ATTENTION, *qkv, scale)),
        "ours": ours,
        "ours_paged": ours_paged,
        "ours_mma": ours_mma_sync if ops.flash_prefill_sm90_available() else None,  # else "ours" is mma.sync
    }
    # fp32 scores at once: naive PyTorch's matrix per batch of SDPA views; the naive CUDA kernel's scratch,
    # a row of max(lengths) per query and head (its run time grows with it too).
    score_bytes = {
        "naive": max(qkv[0].shape[0] * qkv[0].shape[2] ** 2 for qkv in batches) * num_heads * 4,
        "naive_cuda": total * num_heads * max(lengths) * 4,
    }
    for name, fn in methods.items():
        row[f"{name}_ms"] = row[f"{name}_tflops"] = None
        if fn is None or score_bytes.get(name, 0) > NAIVE_MAX_SCORE_BYTES:
            continue  # printed as "-": not on this GPU, or the scores would not fit comfortably
        try:
            ms = common.time_cuda_ms(fn, warmup=3, iters=15 if name in score_bytes else 30)
        except RuntimeError as e:  # e.g. a backend that refuses this shape
            print(f"  {name} failed for {row['heads']} {label}: {str(e).splitlines()[0]}")
            continue
        row[f"{name}_ms"] = ms
        row[f"{name}_tflops"] = flops / (ms * 1e-3) / 1e12
    row["ours/fa2"] = row["fa2_ms"] / row["ours_ms"] if row["fa2_ms"] and row["ours_ms"] else None
    row["ours/cudnn"] = row["cudnn_ms"] / row["ours_ms"] if row["cudnn_ms"] and row["ours_ms"] else None
    row["paged/packed"] = row["ours_ms"] / row["ours_paged_ms"] if row["ours_ms"] and row["ours_paged_ms"] else None

    # Agreement with the FA2 backend on these inputs (both bf16), so the timed kernel is the right one.
    out = ours()
    ref = torch.cat(
        [
            o.transpose(1, 2).reshape(-1, num_heads, head_dim)
            for o in run_each(lambda *qkv: sdpa(SDPBackend.FLASH_ATTENTION, *qkv, scale))()
        ]
    )
    row["err_vs_fa2"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    row["paged_err"] = ((ours_paged().float() - out.float()).norm() / out.float().norm()).item()
    return row


def main() -> None:
    p = common.parser(__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--heads", nargs="+", default=[f"{h}/{kv}/{d}" for h, kv, d in HEADS], help="Hq/Hkv/D rows")
    p.add_argument("--seqlens", nargs="+", type=int, default=SEQLENS, help="sequence lengths (16k tokens a batch)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed-length batch")
    p.add_argument("--block-size", type=int, default=16, help="cache block size of the paged rows")
    add_plot_argument(p, "TFLOP/s against sequence length")
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    common.require_cuda()
    torch.manual_seed(0)
    bandwidth = common.copy_bandwidth_gbs()
    print(
        f"{common.gpu_name()}: copy bandwidth {bandwidth:.0f} GB/s (measured now), {args.dtype}, causal, "
        f"{TOKENS} tokens a batch"
    )
    print(
        f"naive PyTorch and naive CUDA skipped ('-') where their fp32 scores exceed {NAIVE_MAX_SCORE_BYTES >> 30} GiB "
        "(PyTorch: the score matrix of a batch; naive CUDA: its scratch, a row of max(lengths) scores per query and "
        "head, which its run time grows with too)"
    )
    rows = []
    for num_heads, num_kv_heads, head_dim in (tuple(map(int, h.split("/"))) for h in args.heads):
        for n in args.seqlens:
            lengths, label = [n] * (TOKENS // n), f"{TOKENS // n}x{n}"
            rows.append(measure(lengths, num_heads, num_kv_heads, head_dim, label, dtype, args.block_size))
        if not args.no_mixed:
            mixed = list(MIXED_LENGTHS)
            rows.append(measure(mixed, num_heads, num_kv_heads, head_dim, "mixed", dtype, args.block_size))
        torch.cuda.empty_cache()
    common.print_table(rows, "prefill attention: ms and causal TFLOP/s")
    common.write_json(
        args.json, {"gpu": common.gpu_name(), "copy_bandwidth_gbs": bandwidth, "dtype": args.dtype, "rows": rows}
    )
    if args.plot:
        draw(args.plot, rows, common.gpu_name(), bandwidth, args.dtype)


def draw(path: str, rows: list[dict], gpu: str, bandwidth: float, dtype: str) -> None:
    """Causal TFLOP/s of every method against sequence length (16k tokens a batch), a panel per head shape."""
    panels = []
    for heads in dict.fromkeys(row["heads"] for row in rows):
        uniform = [row for row in rows if row["heads"] == heads and row["batch"] != "mixed"]
        lengths = [int(row["batch"].split("x")[1]) for row in uniform]
        series = {name: (lengths, [row[f"{key}_tflops"] for row in uniform]) for key, name in METHOD_NAMES.items()}
        panels.append(Panel(f"(Hq, Hkv, D) = ({heads.replace('/', ', ')})", "sequence length (tokens)", series,
                            logx=True))
    line_chart(path, panels, title=f"causal prefill attention, {dtype}, {TOKENS} tokens a batch", gpu=gpu,
               baseline=f"copy bandwidth {bandwidth:.0f} GB/s measured in this run", ylabel="TFLOP/s")


if __name__ == "__main__":
    main()
