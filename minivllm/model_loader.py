"""Find a model, read its config and tokenizer, and load its weights from safetensors.

Nothing in a checkpoint is ever executed: no remote code, no pickles. A model is a local checkpoint
directory, a repo id already in the local Hugging Face cache, or a built-in preset with random weights.
"""

import glob
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field

import torch
from huggingface_hub import constants, try_to_load_from_cache
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from minivllm.models import DecoderForCausalLM, model_architecture
from minivllm.presets import PRESETS, preset_config, qwen3_tokenizer_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # what huggingface_hub takes for a repo id
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass
class ModelSource:
    name: str
    config: PretrainedConfig
    weights_dir: str | None  # None for a preset: random weights
    tokenizer_dir: str | None  # None when the checkpoint has no tokenizer files
    generation_config: dict = field(default_factory=dict)  # the checkpoint's generation_config.json, if any


def resolve_model(model: str, tokenizer: str | None = None) -> ModelSource:
    """Where `model` comes from, its config read and its weight files' headers checked: a ValueError naming the
    file at fault, or every place looked at when it is nowhere, before anything is built."""
    if not isinstance(model, str) or not model:
        raise TypeError(f"model must be a non-empty string (a directory, repo id or preset), got {model!r}")
    if tokenizer is not None and (not isinstance(tokenizer, str) or not tokenizer):
        raise TypeError(f"tokenizer must be a non-empty string (a directory or repo id) or None, got {tokenizer!r}")
    if model.lower() in PRESETS:
        source = ModelSource(model.lower(), preset_config(model.lower()), None, qwen3_tokenizer_dir())
    else:
        directory = checkpoint_dir(model)
        config = read_config(directory)
        model_architecture(config)  # a ValueError for an architecture minivllm does not run
        check_weight_files(directory)
        source = ModelSource(model, config, directory, directory if has_tokenizer_files(directory) else None,
                             read_json(os.path.join(directory, "generation_config.json"), missing_ok=True))
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
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if what == "model" and not os.path.exists(os.path.join(path, "config.json")):
            raise ValueError(f"model directory {os.path.abspath(path)} has no config.json")
        return path
    if REPO_ID.fullmatch(name):  # a repo id: the snapshot holding its config (a tokenizer repo: its tokenizer files)
        for filename in ("config.json",) if what == "model" else TOKENIZER_FILES:
            cached = try_to_load_from_cache(name, filename)
            if isinstance(cached, str):
                return os.path.dirname(cached)
    raise ValueError(
        f"{what} {name!r} not found: it is not a local directory ({os.path.abspath(path)}), not a repo id in the "
        f"local Hugging Face cache ({constants.HF_HUB_CACHE}; minivllm never downloads), and not a built-in preset "
        f"({', '.join(PRESETS)})"
    )


def read_json(path: str, missing_ok: bool = False) -> dict:
    """A JSON object from a checkpoint file; a ValueError naming the file when it is not one."""
    if missing_ok and not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); restore it from the checkpoint's source") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; restore it from its source")
    return data


def read_config(directory: str) -> PretrainedConfig:
    """The checkpoint's config through transformers (never its code); a ValueError naming config.json if it fails."""
    path = os.path.join(directory, "config.json")
    read_json(path)
    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a config transformers can read: {e}") from e


def check_weight_files(directory: str) -> None:
    """Every *.safetensors file's header, read now (cheap) so that a truncated or corrupt file is named at once."""
    for path in weight_files(directory):
        try:
            with safe_open(path, framework="pt", device="cpu"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a complete safetensors file ({e}); download it again") from e


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase | None:
    if source.tokenizer_dir is None:
        return None
    return AutoTokenizer.from_pretrained(source.tokenizer_dir, trust_remote_code=False)


def eos_token_ids(source: ModelSource, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    """End-of-sequence ids from the config, the generation config and the tokenizer, as vLLM gathers them."""
    ids: set[int] = set()
    candidates = [getattr(source.config, "eos_token_id", None), source.generation_config.get("eos_token_id")]
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
    warnings.warn("the preset model has RANDOM weights: its outputs are meaningless text", stacklevel=user_stacklevel())
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


def user_stacklevel() -> int:
    """The stacklevel at which warnings.warn, called by the caller of this, names the first frame outside
    minivllm (or a script of it run as __main__): the user's line, whichever entry point led there."""
    frame, level = sys._getframe(1), 1
    while (frame is not None and frame.f_globals.get("__name__") != "__main__"
           and os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep)):
        frame, level = frame.f_back, level + 1
    return level
