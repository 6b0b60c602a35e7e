"""One dense decoder for the Qwen3, Qwen2 and Llama families; they differ only in a few switches:
Qwen3 normalises q and k per head, Qwen2 has a bias on q/k/v, Llama optionally on every projection.

Module names follow the HF checkpoints, except that q/k/v and gate/up are packed into one matrix each
(`qkv_proj`, `gate_up_proj`); `packed_modules` tells the loader where each checkpoint tensor goes.
"""

import torch
from torch import nn
from transformers import PretrainedConfig

from minivllm import ops
from minivllm.distributed import TensorParallel
from minivllm.layers.attention import Attention, AttentionMetadata
from minivllm.layers.linear import ColumnParallelLinear, RowParallelLinear, Split
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding
from minivllm.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_head_split(num_kv_heads: int, tp: TensorParallel) -> Split:
    """The KV heads a rank holds: its share when they split over the ranks, else (fewer heads than ranks) the
    one head its query heads use, replicated on tp.size // num_kv_heads ranks."""
    if num_kv_heads >= tp.size:
        return Split(tp.size, tp.rank)
    return Split(num_kv_heads, tp.rank // (tp.size // num_kv_heads))


class DecoderAttention(nn.Module):
    def __init__(
        self, config: PretrainedConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool, rotary: RotaryEmbedding,
        tp: TensorParallel,
    ):
        super().__init__()
        self.head_dim = head_dim_of(config)
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        q_split, kv_split = Split(tp.size, tp.rank), kv_head_split(config.num_key_value_heads, tp)
        self.qkv_proj = ColumnParallelLinear(
            config.hidden_size, [q_size, kv_size, kv_size], qkv_bias, [q_split, kv_split, kv_split]
        )
        self.num_heads, kv_rows = self.qkv_proj.output_sizes[0] // self.head_dim, self.qkv_proj.output_sizes[1]
        self.num_kv_heads = kv_rows // self.head_dim
        self.o_proj = RowParallelLinear(q_size, config.hidden_size, o_bias, tp)
        self.norm_eps = config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, self.norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, self.norm_eps) if qk_norm else None
        self.rotary = rotary
        # Invariant numerics: the decode kernel cuts contexts as for the whole model's KV heads, as one GPU does
        split_kv_heads = config.num_key_value_heads if tp.invariant_splits else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, split_kv_heads)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention over the projected qkv [T, ...]: the heads' outputs [T, num_heads * head_dim], before o_proj."""
        self.write_qkv(positions, qkv, meta)
        return self.attention(qkv, meta)

    def write_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> None:
        """The q/k norms, rotary and the K/V cache write in one op, in place on qkv [T, ...]: token by token."""
        norm_weights = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)
        ops.qk_norm_rope_cache(
            qkv, positions, self.rotary.cos, self.rotary.sin, *norm_weights, self.norm_eps,
            self.attn.k_cache, self.attn.v_cache, meta.slot_mapping, self.num_heads, self.num_kv_heads,
        )

    def attention(self, qkv: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor | None = None) -> torch.Tensor:
        """Attention over qkv once write_qkv has run, q, k and v being views of it: [T, num_heads * head_dim]. out
        [T, num_heads, head_dim] (prefill only) receives the result."""
        q, k, v = qkv.split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.attn(q, k, v, meta, out).flatten(1, 2)


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, bias: bool, tp: TensorParallel):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported; minivllm supports 'silu'")
        size = config.intermediate_size
        split = Split(tp.size, tp.rank)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [size, size], bias, [split, split])
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, switches: dict, rotary: RotaryEmbedding, tp: TensorParallel):
        super().__init__()
        self.self_attn = DecoderAttention(
            config, switches["qkv_bias"], switches["o_bias"], switches["qk_norm"], rotary, tp
        )
        self.mlp = DecoderMLP(config, switches["mlp_bias"], tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def project_qkv(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata,
        qkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer up to attention: (qkv with its K/V in the cache, the residual stream). The input norm adds x
        into residual (layer 0: residual None, x starts it); qkv_out, if given, receives the qkv product."""
        if residual is None:
            x, residual = self.input_layernorm(x), x.float()
        else:
            x, residual = self.input_layernorm(x, residual)
        qkv = self.self_attn.qkv_proj(x, out=qkv_out)
        self.self_attn.write_qkv(positions, qkv, meta)
        return qkv, residual

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after attention: o_proj, the post-attention norm (adding into residual), the MLP."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out), residual)
        return self.mlp(x), residual

    def fused_forward(self, positions: torch.Tensor, residual: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The layer as four small-M kernels around attention: each norm folded into the product after it, each
        residual add into the product before it, SiLU-and-mul into gate_up. residual is the fp32 stream with
        everything before this layer added in; returns the next layer's."""
        attn, mlp = self.self_attn, self.mlp
        norm, qkv_proj = self.input_layernorm, attn.qkv_proj
        qkv = ops.norm_linear(residual, norm.weight, norm.eps, qkv_proj.weight, qkv_proj.bias)
        out = attn.attend(positions, qkv, meta)
        residual = ops.linear_add_residual(out, attn.o_proj.weight, residual, attn.o_proj.bias)
        norm, gate_up_proj = self.post_attention_layernorm, mlp.gate_up_proj
        x = ops.norm_gate_up_silu(residual, norm.weight, norm.eps, gate_up_proj.weight, gate_up_proj.bias)
        return ops.linear_add_residual(x, mlp.down_proj.weight, residual, mlp.down_proj.bias)

    def decode_layers_fit(self) -> bool:
        """Whether ops.decode_layers can run this layer (every layer has layer 0's shapes): no biases, head_dim
        128, 1, 2, 4 or 8 query heads a kv head, each product's K a multiple of DECODE_LAYERS_K_MULTIPLE, contiguous
        weights in the cache's half dtype."""
        attn, mlp = self.self_attn, self.mlp
        products = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        cache = attn.attn.k_cache
        return (
            cache.dim() == 4
            and cache.dtype in ops.KERNEL_DTYPES
            and attn.head_dim == 128
            and attn.num_heads % attn.num_kv_heads == 0
            and attn.num_heads // attn.num_kv_heads in (1, 2, 4, 8)
            and all(p.bias is None and p.weight.dtype == cache.dtype and p.weight.is_contiguous() for p in products)
            and all(p.weight.shape[1] % ops.DECODE_LAYERS_K_MULTIPLE == 0 for p in products)
            and ops.decode_layers_available(cache.device)
        )

    def decode_layers_row(self) -> list[int]:
        """This layer's device pointers in csrc/decode_layers.cu's column order (0: no q/k norm)."""
        attn, mlp = self.self_attn, self.mlp
        norms = (attn.q_norm.weight.data_ptr(), attn.k_norm.weight.data_ptr()) if attn.q_norm is not None else (0, 0)
        return [
            self.input_layernorm.weight.data_ptr(), attn.qkv_proj.weight.data_ptr(), *norms,
            attn.o_proj.weight.data_ptr(), self.post_attention_layernorm.weight.data_ptr(),
            mlp.gate_up_proj.weight.data_ptr(), mlp.down_proj.weight.data_ptr(),
            attn.attn.k_cache.data_ptr(), attn.attn.v_cache.data_ptr(),
        ]

    def fused_products_fit(self, num_tokens: int, device: torch.device) -> bool:
        """Whether the small-M kernel takes all four of fused_forward's products for a step of num_tokens."""
        products = (self.self_attn.qkv_proj, self.self_attn.o_proj, self.mlp.gate_up_proj, self.mlp.down_proj)
        return all(
            ops.small_m_weights_fit(num_tokens, device, p.weight, p.bias, ops.SMALL_M_FUSED_MAX_OUTPUTS)
            for p in products
        )


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, switches: dict, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        rotary = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(
            DecoderLayer(config, switches, rotary, tp) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.tp = tp
        # decode_layers_inputs' table and cache tensor, and the addresses of the first and last caches they hold
        self.decode_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decode_inputs_key = (-1, -1)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.runs_decode_layers(input_ids, meta):
            return self.norm(self.decode_layers(input_ids, positions, meta))
        if self.runs_fused(input_ids):
            residual = self.embed_tokens(input_ids).float()
            for layer in self.layers:
                residual = layer.fused_forward(positions, residual, meta)
            return self.norm(residual)
        out, residual = self.piece(0, positions, meta, input_ids)
        for i, layer in enumerate(self.layers):  # out: layer i's qkv; after the last piece, the hidden states
            out, residual = self.piece(i + 1, positions, meta, layer.self_attn.attention(out, meta), residual)
        return out

    def piece(
        self, index: int, positions: torch.Tensor, meta: AttentionMetadata, x: torch.Tensor,
        residual: torch.Tensor | None = None, qkv_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The work between attention index - 1 and attention index, where every token's row is computed on its
        own: a CUDA graph of it serves any step of up to its token count (engine/prefill_graphs.py). Piece 0
        embeds the token ids x; a later piece finishes the layer before from its attention output x and the
        residual. Each piece but the last ends in layer index's project_qkv (qkv, residual); the last in the
        final norm's hidden states (and None)."""
        if index == 0:
            x = self.embed_tokens(x)
        else:
            x, residual = self.layers[index - 1].finish(x, residual)
        if index == len(self.layers):
            return self.norm(x, residual)[0], None
        return self.layers[index].project_qkv(positions, x, residual, meta, qkv_out)

    def runs_decode_layers(self, x: torch.Tensor, meta: AttentionMetadata) -> bool:
        """Whether this step runs every layer in one persistent kernel (ops.decode_layers): a decode step of at
        most DECODE_LAYERS_MAX_ROWS sequences (ops.DECODE_LAYERS "auto": one; "0": none) on one sm_90 or later
        GPU, for layers the kernel takes. Shapes and the device only, as runs_fused (a CUDA graph holds one path
        while the context grows inside it); on one GPU for runs_fused's reasons."""
        if meta.is_prefill or not 1 <= x.shape[0] <= ops.DECODE_LAYERS_MAX_ROWS or ops.DECODE_LAYERS == "0":
            return False
        if ops.DECODE_LAYERS == "auto" and x.shape[0] != 1:
            return False
        return (
            self.tp.size == 1 and not self.tp.invariant_splits and self.layers[0].decode_layers_fit()
            and self.decode_layers_inputs() is not None
        )

    def decode_layers(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        timings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The residual stream [T, hidden] (fp32) after every layer, from ops.decode_layers (timings: its
        per-stage stamps, for benchmarks.decode_layers)."""
        residual = self.embed_tokens(input_ids).float()
        first = self.layers[0]
        attn, rotary = first.self_attn, first.self_attn.rotary
        table, kv_cache = self.decode_layers_inputs()
        ops.decode_layers(
            residual, table, kv_cache, positions, meta.slot_mapping, meta.context_lens, meta.block_tables,
            rotary.cos, rotary.sin, attn.num_heads, first.mlp.down_proj.weight.shape[1],
            attn.norm_eps, attn.attn.scale, timings,
        )
        return residual

    def kv_cache_tensor(self) -> torch.Tensor | None:
        """Every layer's cache as the one [2, layers, blocks, block_size, kv_heads, D] tensor that the runner
        allocates and hands out views of (ops.decode_layers maps it for TMA); None if the caches are not laid out so,
        or are not block_size-multiple-of-16 caches."""
        caches = [(layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache) for layer in self.layers]
        k0, v0 = caches[0]
        if k0.dim() != 4 or not k0.is_contiguous() or k0.shape[1] % 16 or v0.shape != k0.shape:
            return None
        size = k0.element_size()
        layer_stride = (caches[1][0].data_ptr() - k0.data_ptr()) // size if len(caches) > 1 else k0.numel()
        kv_stride = (v0.data_ptr() - k0.data_ptr()) // size
        if kv_stride < len(caches) * layer_stride or layer_stride < k0.numel():
            return None
        expected = [(k0.data_ptr() + i * layer_stride * size, k0.data_ptr() + (kv_stride + i * layer_stride) * size)
                    for i in range(len(caches))]
        if expected != [(k.data_ptr(), v.data_ptr()) for k, v in caches]:
            return None
        return torch.as_strided(k0, (2, len(caches), *k0.shape), (kv_stride, layer_stride, *k0.stride()))

    def decode_layers_inputs(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ops.decode_layers' layer table ([num_layers, 10] int64 device pointers) and the caches as one tensor
        (kv_cache_tensor), built on the first call and again only when the runner gives the layers new caches (the
        weights do not move); None where the caches are not one such tensor."""
        cache = self.layers[0].self_attn.attn.k_cache
        key = (cache.data_ptr(), self.layers[-1].self_attn.attn.v_cache.data_ptr())
        if self.decode_inputs_key != key:
            kv_cache = self.kv_cache_tensor()
            rows = [layer.decode_layers_row() for layer in self.layers]
            table = torch.tensor(rows, dtype=torch.int64, device=cache.device)
            self.decode_inputs = None if kv_cache is None else (table, kv_cache)
            self.decode_inputs_key = key
        return self.decode_inputs

    def runs_fused(self, x: torch.Tensor) -> bool:
        """Whether this step's layers run fused_forward: a step of at most SMALL_M_MAX_ROWS tokens (batch-1 decode
        is kernel-launch bound) whose products the kernel takes, on one GPU. Tensor parallelism all-reduces the
        row-parallel products, so a residual added by every rank would count tp.size times; tp_invariant sums
        fixed K slices in a tree that one fused product would not reproduce. The decision depends only on shapes
        and the device, so a captured CUDA graph holds one path; every layer has layer 0's shapes."""
        if self.tp.size > 1 or self.tp.invariant_splits:
            return False
        return self.layers[0].fused_products_fit(x.shape[0], x.device)


def family_switches(arch: str, config: PretrainedConfig) -> dict:
    attention_bias = bool(getattr(config, "attention_bias", False))
    return {
        "qk_norm": arch == "Qwen3ForCausalLM",
        "qkv_bias": arch == "Qwen2ForCausalLM" or attention_bias,
        "o_bias": arch != "Qwen2ForCausalLM" and attention_bias,
        "mlp_bias": bool(getattr(config, "mlp_bias", False)),
    }


class DecoderForCausalLM(nn.Module):
    # checkpoint name piece -> (our packed module name piece, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, arch: str, tp: TensorParallel | None = None):
        super().__init__()
        self.config = config
        tp = tp or TensorParallel()
        self.model = DecoderModel(config, family_switches(arch, config), tp)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of every token."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, vocab]; with tensor parallelism on rank 0 only (None on the others)."""
        return self.lm_head(hidden)
