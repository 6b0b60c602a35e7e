"""Finding and loading models: sharded safetensors, the local HF cache, presets, legacy config forms,
tokenizer overrides, and checkpoints whose tensors do not fit the model."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file, save_file

from minivllm import SamplingParams
from minivllm.engine.model_runner import build_model
from minivllm.model_loader import resolve_model
from minivllm.presets import PRESETS, qwen3_tokenizer_dir
from tests.conftest import LLM, build_hf_model, completions, random_prompts, token_prompts, with_config
from tests.test_parity import LLAMA3_ROPE

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = token_prompts(random_prompts(3, 2, 30, seed=80))


def generate(path: str, **kwargs) -> list[list[int]]:
    return completions(LLM(path, max_model_len=64, **kwargs).generate(PROMPTS, GREEDY, use_tqdm=False))


@pytest.fixture(scope="module")
def expected(qwen3_dir) -> list[list[int]]:
    return generate(qwen3_dir)


def test_multi_shard_checkpoint_loads(qwen3_dir, expected, tmp_path):
    model = build_hf_model("qwen3", seed=1)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(tmp_path)
    assert generate(str(tmp_path)) == expected


def fake_hf_cache(cache: str, repo_id: str, checkpoint: str) -> str:
    """Lay out a checkpoint as huggingface_hub caches it: blobs, a snapshot of symlinks, refs/main."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(snapshot)
    os.makedirs(os.path.join(repo, "refs"))
    for name in os.listdir(checkpoint):
        with open(os.path.join(checkpoint, name), "rb") as f:
            blob = os.path.join(repo, "blobs", hashlib.sha256(f.read()).hexdigest())
        shutil.copy(os.path.join(checkpoint, name), blob)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, name))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_repo_id_found_in_local_hf_cache(qwen3_dir, expected, tmp_path, monkeypatch):
    """huggingface_hub reads HF_HUB_CACHE / HF_HOME once, into constants.HF_HUB_CACHE, when imported, and
    try_to_load_from_cache reads that constant on every call: patching it is setting the variable."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = fake_hf_cache(str(tmp_path), "tiny-org/tiny-qwen3", qwen3_dir)
    source = resolve_model("tiny-org/tiny-qwen3")
    assert os.path.samefile(source.weights_dir, snapshot)
    assert generate("tiny-org/tiny-qwen3") == expected
    with pytest.raises(ValueError, match="not found") as err:
        resolve_model("tiny-org/not-cached")
    assert str(tmp_path) in str(err.value)


def test_preset_resolves_without_building(monkeypatch):
    source = resolve_model("qwen3-0.6b")
    config = source.config
    assert source.weights_dir is None and source.tokenizer_dir == qwen3_tokenizer_dir()
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (1024, 3072, 28)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (16, 8, 128)
    assert config.vocab_size == 151936 and config.tie_word_embeddings
    assert resolve_model("Qwen3-0.6B").name == "qwen3-0.6b"
    assert os.path.exists(os.path.join(source.tokenizer_dir, "tokenizer.json"))


@pytest.mark.parametrize(
    "name, shape",
    [
        ("qwen3-1.7b", (2048, 6144, 28, 16, True)),
        ("qwen3-4b", (2560, 9728, 36, 32, True)),
        ("qwen3-8b", (4096, 12288, 36, 32, False)),
    ],
)
def test_other_presets_follow_the_published_configs(name, shape):
    if name not in PRESETS:
        pytest.skip(f"{name} is not a preset")
    config = resolve_model(name).config
    got = (config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.num_attention_heads,
           config.tie_word_embeddings)
    assert got == shape and config.num_key_value_heads == 8 and config.head_dim == 128


def test_tiny_preset_runs_with_random_seeded_weights(monkeypatch):
    """A one-layer preset of the same family goes the whole preset path: random weights, real tokenizer."""
    monkeypatch.setitem(PRESETS, "qwen3-test-tiny", (64, 128, 1, 8, True))
    with pytest.warns(UserWarning, match="RANDOM"):
        llm = LLM("qwen3-test-tiny", max_model_len=64, max_num_seqs=4)
    out = llm.generate("Hello, my name is", GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("Hello, my name is")
    assert len(out.outputs[0].token_ids) == 8 and isinstance(out.outputs[0].text, str)
    source = resolve_model("qwen3-test-tiny")
    with pytest.warns(UserWarning):
        same = build_model(source, torch.float32, torch.device("cpu"), seed=0)
        other = build_model(source, torch.float32, torch.device("cpu"), seed=1)
    ours = dict(llm.llm_engine.runner.model.named_parameters())
    for name, param in same.named_parameters():
        assert torch.equal(param, ours[name]), name
    assert not torch.equal(other.model.embed_tokens.weight, same.model.embed_tokens.weight)


def test_legacy_rope_config_forms(tmp_path):
    """`rope_theta` / `rope_scaling` at the top level (older checkpoints) load like `rope_parameters`."""
    model = build_hf_model("llama", seed=3, rope_parameters=LLAMA3_ROPE)
    model.save_pretrained(tmp_path / "new")
    params = dict(LLAMA3_ROPE)
    legacy = with_config(str(tmp_path / "new"), tmp_path / "legacy", rope_theta=params.pop("rope_theta"),
                         rope_scaling=params, rope_parameters=None)
    with open(os.path.join(legacy, "config.json")) as f:
        assert json.load(f)["rope_scaling"]["rope_type"] == "llama3"
    expected = generate(str(tmp_path / "new"))
    assert generate(legacy) == expected
    plain = with_config(str(tmp_path / "new"), tmp_path / "plain", rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500000.0})
    assert generate(plain) != expected, "llama3 rope scaling should change the tokens of this model"


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ],
)
def test_unsupported_rope_type_is_refused(qwen3_dir, tmp_path, rope):
    path = with_config(qwen3_dir, tmp_path / "rope", rope_parameters=rope)
    with pytest.raises(ValueError, match=rope["rope_type"]):
        LLM(path)


def test_qwen3_rope_theta_top_level(qwen3_dir, expected, tmp_path):
    legacy = with_config(qwen3_dir, tmp_path / "legacy", rope_theta=10000.0, rope_parameters=None)
    assert generate(legacy) == expected
    changed = with_config(qwen3_dir, tmp_path / "changed", rope_theta=50.0, rope_parameters=None)
    assert generate(changed) != expected


def test_tokenizer_argument(tokenizer_model_dir, tmp_path):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in os.listdir(tokenizer_model_dir):
        if name.endswith(".safetensors") or name.endswith("config.json") and "tokenizer" not in name:
            shutil.copy(os.path.join(tokenizer_model_dir, name), bare)
    assert resolve_model(str(bare)).tokenizer_dir is None
    llm = LLM(str(bare), tokenizer=qwen3_tokenizer_dir(), max_model_len=64, max_num_seqs=4)
    out = llm.generate("Hello", GREEDY, use_tqdm=False)[0]
    assert out.prompt_token_ids == llm.get_tokenizer().encode("Hello") and out.outputs[0].text
    with pytest.raises(ValueError, match="tokenizer"):
        LLM(str(bare), tokenizer=str(tmp_path / "missing-tokenizer"))
    # a directory without tokenizer files (AutoTokenizer would make a one-token tokenizer of its config.json)
    with pytest.raises(ValueError, match="tokenizer directory"):
        LLM(str(bare), tokenizer=str(bare))


def test_tokenizer_repo_id_found_in_local_hf_cache(tokenizer_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    tokenizer_only = tmp_path / "tok"
    shutil.copytree(qwen3_tokenizer_dir(), tokenizer_only)
    snapshot = fake_hf_cache(str(tmp_path / "cache"), "tiny-org/qwen3-tokenizer", str(tokenizer_only))
    source = resolve_model(tokenizer_model_dir, tokenizer="tiny-org/qwen3-tokenizer")
    assert os.path.samefile(source.tokenizer_dir, snapshot)


def rewrite_weights(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


def test_checkpoint_with_missing_tensor(qwen3_dir, tmp_path):
    path = rewrite_weights(qwen3_dir, tmp_path / "c", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match="lacks weights.*up_proj"):
        LLM(path)


def test_checkpoint_with_unknown_tensor(qwen3_dir, tmp_path):
    path = rewrite_weights(qwen3_dir, tmp_path / "c", lambda t: t.update(extra=torch.zeros(3)))
    with pytest.raises(ValueError, match="extra"):
        LLM(path)


def test_checkpoint_with_wrong_shape(qwen3_dir, tmp_path):
    def shrink(tensors):
        name = "model.layers.0.self_attn.k_proj.weight"
        tensors[name] = tensors[name][:-1].contiguous()

    path = rewrite_weights(qwen3_dir, tmp_path / "c", shrink)
    with pytest.raises(ValueError, match="shape"):
        LLM(path)


def test_bf16_checkpoint_loads_into_fp32(tmp_path):
    """A bf16 checkpoint (as most are) runs in fp32 on the CPU and matches HF loading the same file in fp32."""
    from transformers import AutoModelForCausalLM

    build_hf_model("qwen2", seed=5).to(torch.bfloat16).save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    llm = LLM(str(tmp_path), max_model_len=64)
    assert llm.llm_engine.runner.dtype == torch.float32
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompts = [p["prompt_token_ids"] for p in PROMPTS]
    ours = completions(llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    with torch.inference_mode():
        for prompt, tokens in zip(prompts, ours):
            ids = torch.tensor([prompt + tokens[:-1]])
            assert hf(ids).logits[0, len(prompt) - 1 :].argmax(-1).tolist() == tokens
