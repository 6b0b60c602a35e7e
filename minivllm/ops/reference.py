"""Torch reference implementations of the custom ops.

They are the CPU path of the engine and the oracle the CUDA kernels are tested against, so they favour
clarity over speed and always accumulate in fp32.
"""

import torch
import torch.nn.functional as F


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key/value [T, Hkv, D] into the paged caches [num_blocks, block_size, Hkv, D] at slot_mapping[T].

    A slot below zero is padding (a CUDA-graph batch filled up to its captured size) and is skipped.
    """
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[valid].to(v_cache.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension as HF computes it: in fp32, rounded to the weight's dtype (the model's,
    which x has too unless it is the fp32 residual stream) before the weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x), the sum in fp32."""
    x = residual + x.float()
    return rms_norm(x, weight, eps), x


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# The fused small-M products' references: the unfused ops they replace, in the same order and dtypes, so that
# on the CPU they give the unfused decoder's numbers bit for bit.
def norm_linear(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """rms_norm(x) @ weight^T (+ bias), the normalised x rounded to the weight's dtype."""
    return F.linear(rms_norm(x, norm_weight, eps), weight, bias)


def norm_gate_up_silu(
    x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """silu(gate) * up for [gate, up] = norm_linear(...) along the last dimension (weight = [gate; up] rows)."""
    gate, up = norm_linear(x, norm_weight, eps, weight, bias).chunk(2, dim=-1)
    return silu_and_mul(gate, up)


def linear_add_residual(
    x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """residual + x @ weight^T (+ bias) in fp32, the product rounded to x's dtype first as the unfused path does."""
    return residual + F.linear(x, weight, bias).float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


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
    """In place on the fused qkv projection output [T, (num_heads + 2 * num_kv_heads) * D]: q and k heads get
    the per-head RMSNorm (when their weight is given) and the neox rotary embedding (rotate_half) from the
    fp32 tables cos/sin [max_position, D] at positions[T], computed in fp32 and rounded once; then k and v go
    into the caches at slot_mapping as reshape_and_cache writes them, unless the caches are empty.
    """
    head_dim = cos.shape[-1]
    q, k, v = qkv.unflatten(-1, (-1, head_dim)).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    for x, weight in ((q, q_weight), (k, k_weight)):
        if weight is not None:
            x.copy_(rms_norm(x, weight, eps))
        xf = x.float()
        x.copy_(xf * cos + rotate_half(xf) * sin)
    if k_cache.numel():
        reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens [length, Hkv, D] of one sequence from its pages in the cache."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    pages = cache[block_table[:num_blocks].long()]
    return pages.reshape(-1, *cache.shape[2:])[:length]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Attention of one sequence: q [Lq, Hq, D] over k, v [Lk, Hkv, D], computed in fp32.

    The causal mask aligns bottom-right: query i sees keys 0 .. Lk - Lq + i, so new queries placed after a
    cached prefix see the whole prefix.
    """
    lq, lk = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    qf = q.float().transpose(0, 1)
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    mask = None
    if causal:
        rows = torch.arange(lq, device=q.device).unsqueeze(1)
        cols = torch.arange(lk, device=q.device).unsqueeze(0)
        mask = cols <= rows + (lk - lq)
    out = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)


def flash_attn_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    causal: bool,
    block_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over a packed batch: q [Tq, Hq, D]; sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1].

    Without block_table, k and v are packed [Tk, Hkv, D] like q. With block_table [B, max_blocks], k and v
    are the paged caches and sequence i reads its first cu_seqlens_k[i+1] - cu_seqlens_k[i] keys from its
    pages. max_seqlen_q and max_seqlen_k are only hints for the kernels. out, if given, receives the result.
    """
    out = torch.empty_like(q) if out is None else out
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(starts_q) - 1):
        q0, q1 = starts_q[i], starts_q[i + 1]
        k0, k1 = starts_k[i], starts_k[i + 1]
        if block_table is None:
            ki, vi = k[k0:k1], v[k0:k1]
        else:
            ki = gather_pages(k, block_table[i], k1 - k0)
            vi = gather_pages(v, block_table[i], k1 - k0)
        out[q0:q1] = attend(q[q0:q1], ki, vi, scale, causal)
    return out


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D], against its context_lens[b] cached keys.

    Vectorised over the batch: every sequence's pages are gathered to the longest table and the tail masked.
    Entries of block_tables past a sequence's last page are never used and may hold any value.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    table = block_tables.long().clamp(0, k_cache.shape[0] - 1)  # past a sequence's pages: masked below
    keys = k_cache[table].reshape(batch, -1, num_kv_heads, head_dim).float()
    values = v_cache[table].reshape(batch, -1, num_kv_heads, head_dim).float()
    group = num_heads // num_kv_heads
    keys = keys.repeat_interleave(group, dim=2).permute(0, 2, 1, 3)  # [B, Hq, L, D]
    values = values.repeat_interleave(group, dim=2).permute(0, 2, 1, 3)
    positions = torch.arange(keys.shape[2], device=q.device)
    mask = (positions.unsqueeze(0) < context_lens.unsqueeze(1)).view(batch, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(2), keys, values, attn_mask=mask, scale=scale)
    return out.squeeze(2).to(q.dtype)


def penalized(logits: torch.Tensor, output_counts: torch.Tensor, in_prompt: torch.Tensor, slots: torch.Tensor,
              presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """As vLLM: repetition over prompt and output tokens (positive logits divided, negative multiplied), then
    frequency (times the count) and presence (once) over output tokens; each row reads the tables at its slot."""
    counts = output_counts[slots]
    seen = in_prompt[slots] | (counts > 0)
    repetition = repetition.unsqueeze(1)
    logits = torch.where(seen, torch.where(logits > 0, logits / repetition, logits * repetition), logits)
    return logits - frequency.unsqueeze(1) * counts - presence.unsqueeze(1) * (counts > 0)


def gumbel_max(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """argmax(softmax(logits) / noise), taken in log space: the softmax's normaliser is the same for a whole row."""
    return (logits - noise.log()).argmax(dim=-1)


def temperature_gumbel_max(logits: torch.Tensor, temperatures: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return gumbel_max(logits.float() / temperatures.clamp(min=1e-5).unsqueeze(1), noise)


def sampler_gumbel_argmax(
    logits: torch.Tensor, noise: torch.Tensor, temperatures: torch.Tensor, *penalties: torch.Tensor
) -> torch.Tensor:
    """Each row's token [B] int64: the Gumbel-max draw at its temperature from the logits [B, V], penalized first
    when penalties are given: penalized()'s arguments after the logits (output_counts, in_prompt, slots, presence,
    frequency, repetition, as Penalties.tables() gives them), all of them or none."""
    if penalties:
        logits = penalized(logits.float(), *penalties)
    return temperature_gumbel_max(logits, temperatures, noise)


def log_sum_exp_and_count_above(logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's fp32 log-sum-exp and the count of its logits above chosen [B]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1), (logits > chosen.unsqueeze(1)).sum(dim=-1)


def sampler_logsumexp_rank(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log_sum_exp_and_count_above, the chosen logit of each row at tokens [B]."""
    return log_sum_exp_and_count_above(logits, logits.gather(1, tokens.unsqueeze(1)).squeeze(1).float())
