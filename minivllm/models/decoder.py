"""One dense decoder for the Qwen3, Qwen2 and Llama families; they differ only in a few switches:
Qwen3 normalises q and k per head, Qwen2 has a bias on q/k/v, Llama optionally on every projection.

Module names follow the HF checkpoints, except that q/k/v and gate/up are packed into one matrix each
(`qkv_proj`, `gate_up_proj`); `packed_modules` tells the loader where each checkpoint tensor goes.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from minivllm.layers.attention import Attention, AttentionMetadata
from minivllm.layers.norm import RMSNorm
from minivllm.layers.rotary import RotaryEmbedding


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class PackedLinear(nn.Linear):
    """A linear layer whose output rows are several checkpoint matrices stacked: shard i has output_sizes[i] rows."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes

    def shard(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        start = sum(self.output_sizes[:index])
        return tensor.narrow(0, start, self.output_sizes[index])


class DecoderAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = PackedLinear(config.hidden_size, [q_size, kv_size, kv_size], bias=qkv_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.output_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.flatten(1, 2))


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, bias: bool):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported; minivllm supports 'silu'")
        size = config.intermediate_size
        self.gate_up_proj = PackedLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, switches: dict, rotary: RotaryEmbedding):
        super().__init__()
        self.self_attn = DecoderAttention(config, switches["qkv_bias"], switches["o_bias"], switches["qk_norm"], rotary)
        self.mlp = DecoderMLP(config, switches["mlp_bias"])
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, switches: dict):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        rotary = RotaryEmbedding(config, head_dim_of(config), config.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(config, switches, rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


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

    def __init__(self, config: PretrainedConfig, arch: str):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config, family_switches(arch, config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of every token."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
