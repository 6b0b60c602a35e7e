"""The attention layer: attend through our ops, over this step's K/V and the paged cache."""

from dataclasses import dataclass

import torch
from torch import nn

from minivllm import ops


@dataclass
class AttentionMetadata:
    """Everything the attention layers need to know about the batch, built once per step by the runner.

    Prefill: tokens of several sequences packed back to back (cu_seqlens_q), each attending to
    cu_seqlens_k[i+1] - cu_seqlens_k[i] keys; block_tables is set when some sequence has keys already in
    the cache (a prefix hit or an earlier chunk), and then keys are read from the pages.
    Decode: one token per sequence, context_lens keys each, read from the pages through block_tables;
    total_context_len (their sum, on the device) sizes the decode kernel's context splits.
    """

    is_prefill: bool
    slot_mapping: torch.Tensor  # [T] cache slot of each new token; -1 skips
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    total_context_len: torch.Tensor | None = None


class Attention(nn.Module):
    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, split_kv_heads: int | None = None
    ):
        """split_kv_heads: see ops.paged_attention_decode (None: this layer's num_kv_heads)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.split_kv_heads = split_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])  # views into the engine's KV cache, set by the runner

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k and v [T, Hkv, D] -> [T, Hq, D]. This step's k and v must already be in the cache
        (ops.qk_norm_rope_cache writes them); k and v, views of one qkv buffer, share their strides as the
        prefill kernel needs. out (prefill only): where the result goes, see ops.flash_attn_varlen."""
        if not meta.is_prefill:
            return ops.paged_attention_decode(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale,
                meta.total_context_len, self.split_kv_heads,
            )
        if meta.block_tables is not None:
            k, v = self.k_cache, self.v_cache
        return ops.flash_attn_varlen(
            q, k, v, meta.cu_seqlens_q, meta.cu_seqlens_k, meta.max_seqlen_q, meta.max_seqlen_k,
            self.scale, causal=True, block_table=meta.block_tables, out=out,
        )
