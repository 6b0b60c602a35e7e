"""Find a model, read its config and tokenizer, and load its weights from safetensors.

Nothing in a checkpoint is ever executed: no remote code, no pickles. A model is a local checkpoint
directory, a repo id already in the local Hugging Face cache, or a built-in preset with random weights.
"""

import glob
import os
import warnings
from dataclasses import dataclass

import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from minivllm.models import DecoderForCausalLM
from minivllm.presets import PRESETS, preset_config, qwen3_tokenizer_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSource:
    name: str
    config: PretrainedConfig
    weights_dir: str | None  # None for a preset: random weights
    tokenizer_dir: str | None  # None when the checkpoint has no tokenizer files


def resolve_model(model: str, tokenizer: str | None = None) -> ModelSource:
    """Where `model` comes from; a ValueError naming every place looked at when it is nowhere."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a non-empty string (a directory, repo id or preset), got {model!r}")
    if model.lower() in PRESETS:
        source = ModelSource(model.lower(), preset_config(model.lower()), None, qwen3_tokenizer_dir())
    else:
        directory = checkpoint_dir(model)
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        source = ModelSource(model, config, directory, directory if has_tokenizer_files(directory) else None)
    if tokenizer is not None:
        source.tokenizer_dir = checkpoint_dir(tokenizer, what="tokenizer")
        if not has_tokenizer_files(source.tokenizer_dir):
            # AutoTokenizer would build a one-token tokenizer from a bare config.json without a word
            raise ValueError(
                f"tokenizer directory {os.path.abspath(source.tokenizer_dir)} has none of {', '.join(TOKENIZER_FILES)}"
            )
    return source


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_FILES)


def checkpoint_dir(name: str, what: str = "model") -> str:
    if os.path.isdir(name):
        if what == "model" and not os.path.exists(os.path.join(name, "config.json")):
            raise ValueError(f"model directory {os.path.abspath(name)} has no config.json")
        return name
    if name.count("/") == 1:  # a repo id: the snapshot holding its config (a tokenizer repo: its tokenizer files)
        for filename in ("config.json",) if what == "model" else TOKENIZER_FILES:
            cached = try_to_load_from_cache(name, filename)
            if isinstance(cached, str):
                return os.path.dirname(cached)
    raise ValueError(
        f"{what} {name!r} not found: it is not a local directory ({os.path.abspath(name)}), not a repo id in the "
        f"local Hugging Face cache ({constants.HF_HUB_CACHE}; minivllm never downloads), and not a built-in preset "
        f"({', '.join(PRESETS)})"
    )


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase | None:
    if source.tokenizer_dir is None:
        return None
    return AutoTokenizer.from_pretrained(source.tokenizer_dir, trust_remote_code=False)


def eos_token_ids(source: ModelSource, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """End-of-sequence ids from the config, the generation config and the tokenizer, as vLLM gathers them."""
    ids: set[int] = set()
    candidates = [getattr(source.config, "eos_token_id", None)]
    if source.weights_dir is not None:
        try:
            candidates.append(GenerationConfig.from_pretrained(source.weights_dir).eos_token_id)
        except OSError:
            pass  # no generation_config.json
    if tokenizer is not None:
        candidates.append(tokenizer.eos_token_id)
    for candidate in candidates:
        ids.update([candidate] if isinstance(candidate, int) else candidate or [])
    return sorted(ids)


def weight_files(directory: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        return files
    if glob.glob(os.path.join(directory, "*.bin")) or glob.glob(os.path.join(directory, "*.pt")):
        raise ValueError(
            f"{directory} holds only PyTorch pickle weights (.bin/.pt), which minivllm does not load since "
            "unpickling can run code. Convert them once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise ValueError(f"no *.safetensors weights found in {directory}")


def load_weights(model: DecoderForCausalLM, directory: str) -> None:
    """Copy every checkpoint tensor into its (possibly packed) parameter; every parameter must be filled.

    A tensor-parallel rank reads only its part of each sharded tensor from the file."""
    params = dict(model.named_parameters())
    missing = {(name, shard) for name in params for shard in shards_of(model, name)}
    tied = model.config.tie_word_embeddings
    for path in weight_files(directory):
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if "rotary_emb" in name or (tied and name == "lm_head.weight"):
                    continue
                param_name, shard = packed_target(model, name)
                if param_name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} in {path} matches no parameter of the model")
                target, tensor = checkpoint_part(params[param_name], shard, f.get_slice(name), name)
                if target.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
                target.copy_(tensor)
                missing.discard((param_name, shard))
    if missing:
        names = sorted(checkpoint_name(model, name, shard) for name, shard in missing)
        raise ValueError(f"the checkpoint in {directory} lacks weights for {names[:5]} ...")


def checkpoint_part(param: torch.nn.Parameter, shard: int | None, checkpoint, name: str):
    """(where in param, what from the checkpoint tensor): this rank's part of a sharded parameter, else all."""
    sharding = getattr(param, "sharding", None)
    if sharding is None:
        return param.data, checkpoint[:]
    return sharding.target(param.data, shard or 0), sharding.read(checkpoint, shard or 0, name)


def shards_of(model: DecoderForCausalLM, param_name: str) -> list[int | None]:
    """The pieces a parameter is filled from: each shard of a packed one, else the whole (None)."""
    sharding = getattr(model.get_parameter(param_name), "sharding", None)
    num_pieces = len(sharding.full_sizes) if sharding is not None else 1
    return list(range(num_pieces)) if num_pieces > 1 else [None]


def checkpoint_name(model: DecoderForCausalLM, param_name: str, shard: int | None) -> str:
    for piece, (packed, index) in model.packed_modules.items():
        if index == shard and f".{packed}." in param_name:
            return param_name.replace(f".{packed}.", f".{piece}.")
    return param_name


def packed_target(model: DecoderForCausalLM, name: str) -> tuple[str, int | None]:
    for piece, (packed, shard) in model.packed_modules.items():
        if f".{piece}." in name:
            return name.replace(f".{piece}.", f".{packed}."), shard
    return name, None


def init_random_weights(model: DecoderForCausalLM, seed: int) -> None:
    """Seeded normal(0, 0.02) weights as HF initialises them, norms at one: a model that runs, not one that talks."""
    warnings.warn("the preset model has RANDOM weights: its outputs are meaningless text", stacklevel=3)
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:  # drawn whole and then cut, so every tensor_parallel_size gets the same model
            sharding = param.sharding
            full = torch.empty(sharding.full_shape(param.shape), dtype=param.dtype, device=device)
            full.normal_(0.0, 0.02, generator=generator)
            for piece, piece_rows in enumerate(full.split(sharding.full_sizes, dim=sharding.dim)):
                sharding.target(param.data, piece).copy_(sharding.read(piece_rows, piece, name))
