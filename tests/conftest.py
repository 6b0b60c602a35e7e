"""Shared fixtures: tiny random checkpoints written with save_pretrained, built once per session.

Every checkpoint is small enough (hidden 64, 2 layers, vocab 512) that the CPU reference path runs it in
milliseconds per step. The initializer range is larger than HF's default 0.02 so that the logits of a
random model are spread out: greedy comparisons then do not hinge on near-ties.
"""

import contextlib
import functools
import json
import os
import shutil

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import minivllm
from minivllm.engine import model_runner
from minivllm.presets import qwen3_tokenizer_dir

# The tiny models' matrices are far too small to split across threads: on a shared 2-core machine intra-op
# threads only wait on each other (10-20x slower per op), so the CPU suite runs single-threaded. (On a GPU
# machine the GPU tests' CPU-side work is left as it is.)
if not torch.cuda.is_available():
    torch.set_num_threads(1)

# The CPU suite runs on the CPU even where a GPU is visible (device=None would pick CUDA, and bf16 with it).
LLM = functools.partial(minivllm.LLM, device="cpu")

FAMILIES = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
}

TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)


def build_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random HF model of the family, fp32, in eval mode."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # random norm weights too, so a model that ignored a norm would be caught
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model


def write_checkpoint(path: str, family: str = "qwen3", seed: int = 0, **overrides) -> tuple[str, torch.nn.Module]:
    model = build_hf_model(family, seed, **overrides)
    model.save_pretrained(path)
    return str(path), model


def with_config(src: str, dst: str, **changes) -> str:
    """A copy of the checkpoint at src whose config.json has `changes` applied."""
    shutil.copytree(src, dst)
    config_path = os.path.join(dst, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(changes)
    with open(config_path, "w") as f:
        json.dump(config, f)
    return str(dst)


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    """A tiny Qwen3 checkpoint without tokenizer files (prompts are token ids)."""
    path, _ = write_checkpoint(tmp_path_factory.mktemp("qwen3_tiny"), "qwen3", seed=1)
    return path


@pytest.fixture(scope="session")
def tokenizer_model_dir(tmp_path_factory) -> str:
    """A tiny Qwen3 checkpoint with the real Qwen3 tokenizer (its vocab covers the tokenizer's ids)."""
    path, _ = write_checkpoint(
        tmp_path_factory.mktemp("qwen3_tok"), "qwen3", seed=2, vocab_size=151936, tie_word_embeddings=True,
        eos_token_id=151645, bos_token_id=151643,
    )
    for name in os.listdir(qwen3_tokenizer_dir()):
        shutil.copy(os.path.join(qwen3_tokenizer_dir(), name), path)
    return path


@pytest.fixture(scope="session")
def llm(qwen3_dir) -> minivllm.LLM:
    """One shared engine for tests that do not change engine settings (it must keep serving after errors)."""
    return LLM(qwen3_dir, max_model_len=128, max_num_seqs=32)


@pytest.fixture(scope="session")
def tok_llm(tokenizer_model_dir) -> minivllm.LLM:
    return LLM(tokenizer_model_dir, max_model_len=128, max_num_seqs=16)


def random_prompts(count: int, min_len: int, max_len: int, seed: int, vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def token_prompts(prompts: list[list[int]]) -> list[dict]:
    return [{"prompt_token_ids": p} for p in prompts]


def completions(outputs) -> list[list[int]]:
    """Token ids of every completion of every request, in order."""
    return [c.token_ids for out in outputs for c in out.outputs]


@contextlib.contextmanager
def recorded_logits():
    """Inside: every step's logits as rank 0 samples from them (all ranks' vocabulary under tensor parallelism),
    appended to the list it yields. Make the LLM before: its sampler warm-up samples too."""
    seen, sample = [], model_runner.sample
    model_runner.sample = lambda logits, batch: sample(seen.append(logits.clone()) or logits, batch)
    try:
        yield seen
    finally:
        model_runner.sample = sample


# The top of a script whose engine step raises once the file named by $MINIVLLM_TEST_FAIL exists: an engine
# failure on demand in the engine-core process, which imports the script as multiprocessing imports a main script.
FAILING_STEP_PRELUDE = """import asyncio, json, os, sys
from minivllm.engine import llm_engine
step = llm_engine.LLMEngine.step_deltas  # the engine-core process's step
def failing_step(self):
    if os.path.exists(os.environ["MINIVLLM_TEST_FAIL"]):
        raise RuntimeError("injected step failure")
    return step(self)
llm_engine.LLMEngine.step_deltas = failing_step
"""
