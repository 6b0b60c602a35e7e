"""Parity with HF transformers on tiny random checkpoints of every family and several shapes.

(a) fp32 prefill logits of our model (reference ops, a packed batch of prompts) against HF's forward;
(b) greedy tokens of the paged engine (LLM.generate over a mixed-length batch) against HF's generate.
`pytest -s tests/test_parity.py` prints a summary of the figures (max logit error per shape, tokens compared).
"""

import json

import pytest
import torch
from transformers import GenerationConfig

from minivllm import SamplingParams
from minivllm.engine.model_runner import build_model
from minivllm.layers.attention import AttentionMetadata
from minivllm.model_loader import resolve_model
from tests.conftest import LLM, completions, random_prompts, token_prompts, write_checkpoint

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

# name -> (family, config overrides); heads / kv heads give the GQA ratio
SHAPES = {
    "qwen3-gqa2-hd64": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen3-mqa4-hd128-tied": (
        "qwen3",
        dict(num_attention_heads=4, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True),
    ),
    "qwen3-mha-hd32": ("qwen3", dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32, rope_theta=10000.0)),
    "qwen2-gqa2-hd64-bias": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64)),
    "qwen2-mha-hd32-tied": (
        "qwen2",
        dict(num_attention_heads=2, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    ),
    "llama-gqa4-hd64-llama3rope": (
        "llama",
        dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64, rope_parameters=LLAMA3_ROPE),
    ),
    "llama-mha-hd128-bias-tied": (
        "llama",
        dict(
            num_attention_heads=2, num_key_value_heads=2, head_dim=128, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=True,
        ),
    ),
    "llama-mqa2-hd-default": ("llama", dict(num_attention_heads=2, num_key_value_heads=1, head_dim=None)),
    "llama-gqa2-hd64-linear-rope": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    ),
    "qwen3-gqa2-hd64-attention-bias": ("qwen3", dict(attention_bias=True)),
}

PROMPT_LENGTHS = [1, 9, 16, 33, 60]
NEW_TOKENS = 16
LOGIT_TOLERANCE = 1e-4

SUMMARY: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def print_summary():
    yield
    if SUMMARY:
        print("\nHF parity summary (fp32, CPU reference ops):")
        print(json.dumps(SUMMARY, indent=1))


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    family, overrides = SHAPES[request.param]
    seed = sum(map(ord, request.param))
    path, hf_model = write_checkpoint(tmp_path_factory.mktemp(request.param), family, seed=seed, **overrides)
    return request.param, path, hf_model


def prompts_for(name: str) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return [torch.randint(2, 512, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def test_prefill_logits_match_hf(checkpoint):
    name, path, hf_model = checkpoint
    prompts = prompts_for(name)
    model = build_model(resolve_model(path), torch.float32, torch.device("cpu"), seed=0)
    lengths = [len(p) for p in prompts]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(
        is_prefill=True, slot_mapping=torch.full((sum(lengths),), -1, dtype=torch.int64), cu_seqlens_q=cu,
        cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths),
    )
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lengths])
    with torch.inference_mode():
        ours = model.compute_logits(model(input_ids, positions, meta))
        theirs = torch.cat([hf_model(torch.tensor([p])).logits[0] for p in prompts])
    assert ours.shape == theirs.shape
    max_err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    SUMMARY.setdefault(name, {}).update(
        max_logit_error=float(f"{max_err:.3g}"), max_abs_logit=round(scale, 2), prefill_tokens=sum(lengths)
    )
    assert scale > 1.0, "logits too flat to tell models apart"
    assert max_err < LOGIT_TOLERANCE, f"{name}: max |logit difference| {max_err:.3g}"


def test_greedy_tokens_match_hf_generate(checkpoint):
    name, path, hf_model = checkpoint
    prompts = prompts_for(name)
    # a small token budget and block size 16 make the engine chunk the 60-token prompt and page every prompt
    llm = LLM(path, max_model_len=128, max_num_batched_tokens=48)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = completions(llm.generate(token_prompts(prompts), params, use_tqdm=False))
    # no eos, so HF also runs all NEW_TOKENS steps without banning any token (as ignore_eos does)
    greedy_config = GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0)
    theirs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=greedy_config)
            theirs.append(out[0, len(prompt) :].tolist())
    matched = sum(a == b for o, t in zip(ours, theirs) for a, b in zip(o, t))
    SUMMARY.setdefault(name, {}).update(
        sequences=len(prompts), tokens_compared=len(prompts) * NEW_TOKENS, tokens_equal=matched
    )
    assert ours == theirs


def test_random_prompts_helper_is_varied():
    """Guards the helpers the parity tests rely on: prompts differ and lengths vary."""
    prompts = random_prompts(8, 1, 40, seed=3)
    assert len({len(p) for p in prompts}) > 1 and len({tuple(p) for p in prompts}) == 8
