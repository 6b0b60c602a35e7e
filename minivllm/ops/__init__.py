"""Where Python meets the CUDA kernels.

Each op runs its CUDA kernel when the extension `minivllm._C` was built and the tensors are on a GPU in a
dtype and head size the kernels support; everything else runs the torch reference in `reference.py` (for
`linear`, torch's own matrix product).
"""

import functools
import os

import torch
import torch.nn.functional as F

from minivllm.ops import reference

try:
    from minivllm import _C  # noqa: F401  (registers torch.ops.minivllm)

    KERNELS_BUILT = True
except ImportError:
    KERNELS_BUILT = False

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)
SMALL_M_MAX_ROWS = 16  # kMaxM of csrc/small_m_linear.cu
# Beyond this many outputs cuBLAS streams the weights faster than the small-M kernel (benchmarks.small_m_linear, one
# H200 run, M = 1: 6.06 against 6.39 us at N = 6144, 80.9 against 106 us for the lm_head's 151,936); at 4096 and
# below the kernel is ahead (qkv 4.85 against 5.39, o 3.26 against 13.4, down 4.17 against 7.6).
SMALL_M_MAX_OUTPUTS = 4096
# The fused products (norm_linear, norm_gate_up_silu, linear_add_residual) run the kernel up to gate_up's 6144 rows
# (Qwen3-0.6B): there cuBLAS is 0.33 us ahead on the product, but the fusion saves the kernel it replaces (SiLU-and-
# mul, ~1.1 us) and a launch gap. Beyond it cuBLAS's lead grows with N and was not measured against a fusion.
SMALL_M_FUSED_MAX_OUTPUTS = 6144

DECODE_LAYERS_MAX_ROWS = 8  # kMaxRows of csrc/decode_layers.cu
DECODE_LAYERS_K_MULTIPLE = 1024  # kSlotK: every product's K is a whole number of ring slots
# When decode steps run ops.decode_layers (MINIVLLM_DECODE_LAYERS): "auto", where one H200 run measured it faster
# than the per-layer path: one sequence (benchmarks.latency, ms a token: 0.965 against 0.979 at context 128, 1.01
# against 1.05 at 1k, 1.10 against 1.18 at 4k, 1.52 against 1.72 at 16k, 2.12 against 2.24 at 32k; slower at batch 8,
# 1.76 against 1.33 at 1k); "1": every step of 1..DECODE_LAYERS_MAX_ROWS sequences it takes; "0": never.
DECODE_LAYERS = os.environ.get("MINIVLLM_DECODE_LAYERS", "auto")
if DECODE_LAYERS not in ("auto", "0", "1"):
    raise ValueError(f"MINIVLLM_DECODE_LAYERS={DECODE_LAYERS!r} is not one of auto, 0, 1; unset it for auto")


def use_kernels(t: torch.Tensor, head_dim: int | None = None) -> bool:
    """True when this tensor's op would run on our CUDA kernels rather than the torch reference; head_dim
    defaults to t's last dimension."""
    head_dim = t.shape[-1] if head_dim is None else head_dim
    return KERNELS_BUILT and t.is_cuda and t.dtype in KERNEL_DTYPES and head_dim in KERNEL_HEAD_DIMS


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if use_kernels(k_cache):
        torch.ops.minivllm.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)
    else:
        reference.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping)


def qk_norm_rope_cache(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> None:
    """In place on qkv [T, (num_heads + 2 * num_kv_heads) * D]: q/k RMSNorm per head, rotary, then k and v
    into the caches (see reference.qk_norm_rope_cache)."""
    args = (qkv, positions, cos, sin, q_weight, k_weight, eps, k_cache, v_cache, slot_mapping, num_heads,
            num_kv_heads)
    if use_kernels(qkv, head_dim=cos.shape[-1]):
        torch.ops.minivllm.qk_norm_rope_cache(*args)
    else:
        reference.qk_norm_rope_cache(*args)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool = True,
    block_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.flash_attn_varlen's attention; with out (q's shape and dtype) written there, as a CUDA graph that
    reads the result needs (rows no sequence covers are left as they were)."""
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal, block_table, out)
    if use_kernels(q):
        return torch.ops.minivllm.flash_attn_varlen(*args)
    return reference.flash_attn_varlen(*args)


def flash_prefill_sm90_available() -> bool:
    """Whether flash_attn_varlen runs its sm_90a TMA + wgmma kernel on the current GPU (unless the environment has
    MINIVLLM_PREFILL_SM90=0); otherwise it runs the mma.sync kernel."""
    return KERNELS_BUILT and torch.cuda.is_available() and torch.ops.minivllm.flash_prefill_sm90_available()


def naive_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
) -> torch.Tensor:
    """Our naive CUDA prefill kernel: causal attention over packed q, k, v through one row of fp32 scores per
    (query, head), [total_q, Hq, max_seqlen_k] in all. A baseline for the benchmarks and tests, not used by the
    engine, so it has no torch fallback; reference.flash_attn_varlen(..., causal=True) computes the same.
    max_seqlen_q and max_seqlen_k must bound every sequence's lengths.
    """
    if not KERNELS_BUILT:
        raise RuntimeError("naive_attention_varlen needs the CUDA extension minivllm._C, which is not built")
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale)
    return torch.ops.minivllm.naive_attention_varlen(*args)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    total_context_len: torch.Tensor | None = None,
    split_kv_heads: int | None = None,
) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D], against its context_lens[b] cached keys. The kernel cuts long
    contexts into splits sized from the batch's total context: pass it as total_context_len (one int64 on the
    device, the sum of context_lens) when many calls share the lengths, as a step's layers do; without it the
    kernel sums context_lens itself. It sizes the splits for the cache's KV heads, or for split_kv_heads: a
    tensor-parallel rank passes the whole model's count to cut contexts where one GPU does, so that its heads
    come out bit for bit the same. The reference needs neither."""
    args = (q, k_cache, v_cache, block_tables, context_lens, scale)
    if use_kernels(q):
        return torch.ops.minivllm.paged_attention_decode(*args, total_context_len, split_kv_heads)
    return reference.paged_attention_decode(*args)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fp32_out: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias), in x's dtype, or in fp32 when fp32_out (logits, tp_invariant sums).

    A decode step's 1..SMALL_M_MAX_ROWS rows run our small-M kernel where it beats cuBLAS (up to
    SMALL_M_MAX_OUTPUTS outputs); larger batches and wider products stay with cuBLAS, and the CPU with torch.
    out (contiguous [rows, N] in x's dtype; not with fp32_out): written in place, the same product as without.
    """
    rows = x.reshape(-1, x.shape[-1])
    if out is not None:
        return linear_into(rows, weight, bias, out).view(*x.shape[:-1], weight.shape[0])
    if small_m_kernel_fits(rows, weight, bias):
        out = torch.ops.minivllm.small_m_linear(rows, weight, bias, fp32_out)
        return out.view(*x.shape[:-1], weight.shape[0])
    if fp32_out and x.is_cuda and x.dtype in KERNEL_DTYPES:
        out = torch.mm(rows, weight.t(), out_dtype=torch.float32)
        if bias is not None:
            out += bias
        return out.view(*x.shape[:-1], weight.shape[0])
    out = F.linear(x, weight, bias)
    return out.float() if fp32_out else out


def linear_into(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """linear()'s product of rows [M, K] written into out [M, N]: the small-M kernel's result copied there, else
    cuBLAS's mm (addmm with a bias) into it, the call F.linear makes."""
    if small_m_kernel_fits(rows, weight, bias):
        return out.copy_(torch.ops.minivllm.small_m_linear(rows, weight, bias, False))
    if bias is None:
        return torch.mm(rows, weight.t(), out=out)
    return torch.addmm(bias, rows, weight.t(), out=out)


def small_m_kernel_fits(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    max_outputs: int = SMALL_M_MAX_OUTPUTS,
    norm_weight: torch.Tensor | None = None,
) -> bool:
    """Whether small_m_linear runs rows [M, K] @ weight^T: M and N where it is the faster, dtypes and the 16-byte
    row alignment it needs. With norm_weight (the RMSNorm prologue) rows may be the fp32 residual stream."""
    rows_dtype_fits = rows.dtype == weight.dtype or (norm_weight is not None and rows.dtype == torch.float32)
    return (
        small_m_weights_fit(rows.shape[0], rows.device, weight, bias, max_outputs)
        and rows_dtype_fits
        and rows.shape[1] == weight.shape[1]
        and rows_aligned(rows)
        and (norm_weight is None or vector_fits(norm_weight, weight.dtype))
    )


def small_m_weights_fit(
    num_rows: int, device: torch.device, weight: torch.Tensor, bias: torch.Tensor | None, max_outputs: int
) -> bool:
    """The part of small_m_kernel_fits known before the activations exist (how a model decides a step's path):
    the row count, the device, and the weight and bias."""
    return (
        1 <= num_rows <= SMALL_M_MAX_ROWS
        and KERNELS_BUILT
        and device.type == "cuda"
        and weight.dtype in KERNEL_DTYPES
        and weight.dim() == 2
        and weight.shape[0] <= max_outputs
        and (bias is None or (bias.dtype == weight.dtype and bias.is_contiguous()))
        and weight.shape[1] > 0
        and weight.shape[1] % 8 == 0
        and rows_aligned(weight)
    )


def vector_fits(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A norm weight the kernel reads in 16-byte chunks."""
    return t.dtype == dtype and t.dim() == 1 and t.is_contiguous() and t.data_ptr() % 16 == 0


def rows_aligned(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """rms_norm(x, norm_weight, eps) @ weight^T (+ bias) in the weight's dtype; x [..., K] is the fp32 residual
    stream or in the weight's dtype. 1..SMALL_M_MAX_ROWS rows run one small-M kernel with the norm folded into the
    product (csrc/small_m_linear.cu), everything else reference.norm_linear."""
    rows = x.reshape(-1, x.shape[-1])
    if small_m_kernel_fits(rows, weight, bias, SMALL_M_FUSED_MAX_OUTPUTS, norm_weight):
        out = torch.ops.minivllm.small_m_linear(rows, weight, bias, False, norm_weight, eps)
        return out.view(*x.shape[:-1], weight.shape[0])
    return reference.norm_linear(x, norm_weight, eps, weight, bias)


def norm_gate_up_silu(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """silu(gate) * up [..., I] for [gate, up] = norm_linear(x, norm_weight, eps, weight, bias), weight [2I, K]
    packed as gate_up_proj is; on the kernel computed in fp32 and rounded once, else reference.norm_gate_up_silu."""
    rows = x.reshape(-1, x.shape[-1])
    if small_m_kernel_fits(rows, weight, bias, SMALL_M_FUSED_MAX_OUTPUTS, norm_weight) and weight.shape[0] % 2 == 0:
        out = torch.ops.minivllm.small_m_linear(rows, weight, bias, False, norm_weight, eps, None, True)
        return out.view(*x.shape[:-1], weight.shape[0] // 2)
    return reference.norm_gate_up_silu(x, norm_weight, eps, weight, bias)


def linear_add_residual(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """residual + x @ weight^T (+ bias) in fp32 [..., N]: the new residual stream, residual fp32 [..., N]. On the
    kernel the product is added unrounded, else reference.linear_add_residual."""
    rows = x.reshape(-1, x.shape[-1])
    residual_fits = residual.dtype == torch.float32 and residual.is_contiguous() and residual.device == x.device
    if residual_fits and residual.shape == (*x.shape[:-1], weight.shape[0]) and small_m_kernel_fits(
        rows, weight, bias, SMALL_M_FUSED_MAX_OUTPUTS
    ):
        out = torch.ops.minivllm.small_m_linear(rows, weight, bias, True, None, 0.0, residual.view(rows.shape[0], -1))
        return out.view(residual.shape)
    return reference.linear_add_residual(x, weight, residual, bias)


def norm_rows_fit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the norm kernels (csrc/norm_act.cu) take x [..., N] and weight [N]: on a GPU, a half-precision weight,
    N a multiple of 8, rows and weight in 16-byte chunks. Anything else takes the torch reference."""
    return (
        KERNELS_BUILT
        and x.is_cuda
        and x.dtype in (torch.float32, *KERNEL_DTYPES)
        and x.shape[-1] % 8 == 0
        and x.is_contiguous()
        and x.data_ptr() % 16 == 0
        and vector_fits(weight, weight.dtype)
        and weight.dtype in KERNEL_DTYPES
        and weight.shape == x.shape[-1:]
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x [..., N] (half precision or the fp32 residual stream) in the weight's dtype, as reference.rms_norm
    computes it."""
    if norm_rows_fit(x, weight):
        return torch.ops.minivllm.rms_norm(x.view(-1, x.shape[-1]), weight, eps).view(x.shape)
    return reference.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), the sum in fp32 (residual: the fp32 stream [..., N]). The kernel adds
    x into residual in place and returns it; the reference returns a new tensor."""
    residual_fits = residual.dtype == torch.float32 and residual.shape == x.shape and norm_rows_fit(residual, weight)
    if residual_fits and x.dtype in KERNEL_DTYPES and norm_rows_fit(x, weight):
        rows = residual.view(-1, x.shape[-1])
        out = torch.ops.minivllm.add_rms_norm(x.view(-1, x.shape[-1]), rows, weight, eps)
        return out.view(x.shape), residual
    return reference.add_rms_norm(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up [..., I] for gate_up [..., 2I] = [gate | up] (gate_up_proj's output), SiLU rounded to the
    dtype before the multiply as reference.silu_and_mul does in half precision."""
    rows = gate_up.view(-1, gate_up.shape[-1]) if gate_up.is_contiguous() else None
    if KERNELS_BUILT and gate_up.is_cuda and gate_up.dtype in KERNEL_DTYPES and rows is not None and (
        gate_up.shape[-1] % 16 == 0 and rows_aligned(rows)
    ):
        return torch.ops.minivllm.silu_and_mul(rows).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)
    return reference.silu_and_mul(*gate_up.chunk(2, dim=-1))


def sampler_kernels_fit(logits: torch.Tensor) -> bool:
    """Whether the sampler kernels (csrc/sampler.cu) take these logits: fp32 [B, V], contiguous, on a GPU. Other
    logits (the CPU, a bf16 lm_head) take the torch reference, eagerly."""
    return KERNELS_BUILT and logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2 and (
        logits.is_contiguous())


def sampler_gumbel_argmax(
    logits: torch.Tensor, noise: torch.Tensor, temperatures: torch.Tensor, *penalties: torch.Tensor
) -> torch.Tensor:
    """Each row's token [B] int64: argmax of penalized(logits) / max(T, 1e-5) - log(noise), the first index on
    ties; penalties as reference.sampler_gumbel_argmax takes them (Penalties.tables()), all or none."""
    if sampler_kernels_fit(logits):
        return torch.ops.minivllm.sampler_gumbel_argmax(logits, noise, temperatures, *penalties)
    return reference.sampler_gumbel_argmax(logits, noise, temperatures, *penalties)


def sampler_logsumexp_rank(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's fp32 log-sum-exp [B] and the count [B] int64 of its logits above logits[b, tokens[b]]."""
    if sampler_kernels_fit(logits):
        return torch.ops.minivllm.sampler_logsumexp_rank(logits, tokens)
    return reference.sampler_logsumexp_rank(logits, tokens)


@functools.cache
def decode_layers_available(device: torch.device) -> bool:
    """Whether ops.decode_layers runs on this device: the extension is built and the GPU is sm_90 or later."""
    if not (KERNELS_BUILT and device.type == "cuda"):
        return False
    with torch.cuda.device(device):
        return torch.ops.minivllm.decode_layers_available()


def decode_layers(
    residual: torch.Tensor, layers: torch.Tensor, kv_cache: torch.Tensor, positions: torch.Tensor,
    slot_mapping: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, num_heads: int, intermediate: int, eps: float, scale: float,
    timings: torch.Tensor | None = None,
) -> None:
    """Every decoder layer of a decode step of 1..DECODE_LAYERS_MAX_ROWS sequences in one persistent kernel (see
    csrc/ops.h): residual [M, hidden] fp32, the embeddings, becomes the stream after the last layer, and each
    layer's cache gets this step's K/V. layers and kv_cache (every layer's cache as one [2, layers, blocks,
    block_size, kv_heads, 128] tensor): as DecoderModel.decode_layers_inputs builds them. The per-layer path
    (DecoderLayer.fused_forward) is its reference. timings: see csrc/ops.h."""
    torch.ops.minivllm.decode_layers(
        residual, layers, kv_cache, positions, slot_mapping, context_lens, block_tables, cos, sin, num_heads,
        intermediate, eps, scale, timings,
    )
