"""The engine's settings: EngineArgs as the user gave them (checked when made), and EngineConfig, everything
resolved from them once (model source, dtype, device, max_model_len) before any runner is built."""

import random
import reprlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from minivllm.model_loader import ModelSource, resolve_model

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True, kw_only=True)
class EngineArgs:
    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device | None = None
    seed: int | None = 0  # None: a random seed, drawn once here, so every rank gets the same one (as vLLM)
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    async_scheduling: bool = True  # schedule and launch step N+1 while step N runs
    # N > 0 (a power of two): the same output, bit for bit, at every tensor_parallel_size dividing N, for a
    # cost in speed (layers/linear.py, RowParallelLinear.invariant_forward); 0: the fastest sums
    tp_invariant: int = 0

    def __post_init__(self) -> None:
        if self.seed is None:
            object.__setattr__(self, "seed", random.randrange(2**63))
        positive = {
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "tensor_parallel_size": self.tensor_parallel_size,
        }
        optional_positive = {"max_model_len": self.max_model_len, "num_kv_blocks": self.num_kv_blocks}
        ints = {**positive, **optional_positive, "seed": self.seed, "tp_invariant": self.tp_invariant}
        for name, value in ints.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name, value in optional_positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for the default), got {value}")
        if not isinstance(self.block_size, int) or self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be a power of two from 16 to 256, got {self.block_size!r}")
        invariant = self.tp_invariant
        if invariant and (invariant < 0 or invariant & (invariant - 1) or invariant % self.tensor_parallel_size):
            raise ValueError(f"tp_invariant must be 0 (off) or a power of two that tensor_parallel_size "
                             f"{self.tensor_parallel_size} divides, got {invariant}")
        if not isinstance(self.async_scheduling, bool):
            raise TypeError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        device = resolve_device(self.device)
        if device.type == "cuda" and device.index + self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs one GPU a rank from {device} on, but "
                f"only {torch.cuda.device_count()} CUDA GPU(s) are visible; lower it or pick an earlier device"
            )


@dataclass(frozen=True)
class EngineConfig:
    """What every part of the engine reads: the user's args and what was resolved from them, never changed."""

    args: EngineArgs
    source: ModelSource
    dtype: torch.dtype
    device: torch.device  # rank 0's; rank r runs on the r-th GPU from it
    max_model_len: int  # within the model's positions and, when it is known up front, the KV cache's capacity
    max_model_len_capped: str | None = None  # why max_model_len is below what the user asked for

    @classmethod
    def resolve(cls, args: EngineArgs) -> "EngineConfig":
        """Find the model and settle dtype, device and max_model_len; warn if what was asked does not fit."""
        source = resolve_model(args.model, args.tokenizer)
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device, getattr(source.config, "dtype", None))
        positions = source.config.max_position_embeddings
        max_model_len, capped = args.max_model_len or positions, None
        if max_model_len > positions:
            max_model_len, capped = positions, f"max_model_len capped at the model's {positions} positions"
        if args.num_kv_blocks is not None and max_model_len > args.num_kv_blocks * args.block_size:
            capacity = args.num_kv_blocks * args.block_size
            max_model_len, capped = capacity, f"max_model_len capped to the KV cache's capacity of {capacity} tokens"
        if args.max_model_len is None:
            capped = None  # nothing the user asked for was cut
        return cls(args, source, dtype, device, max_model_len, capped)

    def check_kv_capacity(self, num_blocks: int) -> int:
        """num_blocks, or a ValueError (as vLLM's) when they cannot hold one sequence of max_model_len tokens."""
        capacity = num_blocks * self.args.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {max(capacity, 0)} tokens, less than one sequence of max_model_len="
                f"{self.max_model_len}; lower max_model_len (to {max(capacity, 0)} at most), raise "
                "gpu_memory_utilization, lower max_num_batched_tokens, or pass num_kv_blocks"
            )
        return num_blocks

    def warn_if_capped(self, stacklevel: int) -> None:
        if self.max_model_len_capped:
            warnings.warn(self.max_model_len_capped, stacklevel=stacklevel + 1)


def resolve_dtype(asked: str | torch.dtype, device: torch.device, config_dtype: torch.dtype | None) -> torch.dtype:
    """The model dtype: as asked, or for "auto" the checkpoint's on a GPU and fp32 on the CPU."""
    if isinstance(asked, torch.dtype):
        dtype = asked
    elif asked == "auto":
        if device.type == "cpu":
            return torch.float32
        dtype = config_dtype if config_dtype in DTYPES.values() else torch.bfloat16
        return torch.float16 if dtype == torch.float32 else dtype
    elif isinstance(asked, str) and asked in DTYPES:
        dtype = DTYPES[asked]
    else:
        raise ValueError(f"dtype {asked!r} is not supported; use 'auto', {', '.join(map(repr, DTYPES))}")
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
    return dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """CUDA when available for None; otherwise exactly what was asked, if it exists."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'") from e
    if resolved.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device!r} is not supported; use 'cuda', 'cuda:N' or 'cpu'")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA GPU is visible; use device='cpu'")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
        elif resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    return resolved


# ----- vLLM's arguments that minivllm lacks ------------------------------------------------------------------
def only(*values: Any) -> Callable[[Any], bool]:
    """Accepts exactly these values (by type too, so that 1 is not True)."""
    return lambda v: any(type(v) is type(ok) and v == ok for ok in values)


@dataclass(frozen=True)
class VllmOnly:
    """An argument of vLLM's that minivllm does not implement: refused unless its value asks for nothing
    minivllm lacks (vLLM's default, mostly)."""

    feature: str  # what the error says minivllm lacks
    accepts: Callable[[Any], bool] = only(None)
    instead: str = ""  # minivllm's way to the same end, when there is one


LORA, MULTIMODAL, POOLING = "LoRA adapters", "multi-modal inputs", "pooling or embedding models"
NO_PRIORITY = "priority scheduling (every request is first come, first served)"

# The one list of them, by where vLLM takes them: LLM(...), LLM.generate(...), LLM.chat(...) and a prompt dict.
VLLM_ONLY: dict[str, dict[str, VllmOnly]] = {
    "LLM": {
        "trust_remote_code": VllmOnly("running a checkpoint's own Python code", only(False),
                                      "minivllm runs Qwen3, Qwen2 and Llama checkpoints without it"),
        "quantization": VllmOnly("quantized weights", instead="load bf16/fp16/fp32 weights (dtype=...)"),
        "kv_cache_dtype": VllmOnly("a KV cache in another dtype than the model's", only("auto")),
        "revision": VllmOnly("checkpoint revisions (it reads the local directory or cache snapshot)"),
        "tokenizer_revision": VllmOnly("tokenizer revisions"),
        "code_revision": VllmOnly("checkpoint code"),
        "download_dir": VllmOnly("downloading checkpoints", instead="download with `hf download` first"),
        "hf_token": VllmOnly("downloading checkpoints", instead="download with `hf download` first"),
        "load_format": VllmOnly("weight formats other than safetensors", only("auto", "safetensors")),
        "tokenizer_mode": VllmOnly("tokenizer modes other than Hugging Face's", only("auto", "hf")),
        "skip_tokenizer_init": VllmOnly("skipping the tokenizer", only(False),
                                        "a checkpoint without tokenizer files takes prompt_token_ids"),
        "hf_overrides": VllmOnly("overriding the checkpoint's config", instead="edit its config.json"),
        "generation_config": VllmOnly("generation configs other than the checkpoint's", only("auto")),
        "override_generation_config": VllmOnly("overriding the generation config",
                                               instead="pass your own SamplingParams"),
        "enable_lora": VllmOnly(LORA, only(False)),
        "max_loras": VllmOnly(LORA),
        "max_lora_rank": VllmOnly(LORA),
        "max_cpu_loras": VllmOnly(LORA),
        "speculative_config": VllmOnly("speculative decoding"),
        "pipeline_parallel_size": VllmOnly("pipeline parallelism", only(1), "use tensor_parallel_size"),
        "data_parallel_size": VllmOnly("data parallelism", only(1), "run one LLM per GPU"),
        "enable_expert_parallel": VllmOnly("mixture-of-experts models", only(False)),
        "distributed_executor_backend": VllmOnly("executors other than worker processes", only("mp")),
        "enable_chunked_prefill": VllmOnly("turning chunked prefill off", only(True)),
        "cpu_offload_gb": VllmOnly("offloading weights to the CPU", only(0)),
        "swap_space": VllmOnly("swapping preempted KV blocks to the CPU (it recomputes them)", only(4)),
        "num_gpu_blocks_override": VllmOnly("this name for the KV-cache size", instead="pass num_kv_blocks"),
        "kv_cache_memory_bytes": VllmOnly("sizing the KV cache in bytes",
                                          instead="pass num_kv_blocks or gpu_memory_utilization"),
        "max_seq_len_to_capture": VllmOnly("this CUDA-graph setting (decode graphs cover every length)"),
        "compilation_config": VllmOnly("vLLM's compilation settings"),
        "scheduling_policy": VllmOnly(NO_PRIORITY, only("fcfs")),
        "disable_log_stats": VllmOnly("periodic stats logging", only(True)),
        "disable_custom_all_reduce": VllmOnly("custom all-reduce (it always uses NCCL's)", only(False, True)),
        "disable_async_output_proc": VllmOnly("this setting (output processing is always overlapped)",
                                              only(False, True), "see async_scheduling"),
        "enable_sleep_mode": VllmOnly("sleep mode", only(False)),
        "calculate_kv_scales": VllmOnly("KV-cache scales (the KV cache is in the model's dtype)", only(False)),
        "enable_prompt_embeds": VllmOnly("prompt embeddings", only(False)),
        "limit_mm_per_prompt": VllmOnly(MULTIMODAL),
        "mm_processor_kwargs": VllmOnly(MULTIMODAL),
        "allowed_local_media_path": VllmOnly(MULTIMODAL, only(None, "")),
        "runner": VllmOnly(POOLING, only("auto", "generate")),
        "convert": VllmOnly(POOLING, only("auto", "none")),
        "task": VllmOnly(POOLING, only("auto", "generate")),
        "pooler_config": VllmOnly(POOLING),
        "override_pooler_config": VllmOnly(POOLING),
        "logits_processors": VllmOnly("custom logits processors"),
        "max_logprobs": VllmOnly("raising the logprobs limit", only(20)),
    },
    "generate": {
        "lora_request": VllmOnly(LORA),
        "priority": VllmOnly(NO_PRIORITY, lambda v: v is None or (isinstance(v, list) and not any(v))),
        "tokenization_kwargs": VllmOnly("tokenizer keyword arguments",
                                        instead="tokenize yourself and pass prompt_token_ids"),
        "prompt_adapter_request": VllmOnly("prompt adapters"),
        "guided_options_request": VllmOnly("guided_options_request", instead="SamplingParams(structured_outputs=)"),
    },
    "chat": {
        "lora_request": VllmOnly(LORA),
        "mm_processor_kwargs": VllmOnly(MULTIMODAL),
        "chat_template_content_format": VllmOnly("passing content parts to the template (they are joined into a "
                                                 "string)", only("auto", "string")),
    },
    "prompt": {
        "multi_modal_data": VllmOnly(MULTIMODAL),
        "mm_processor_kwargs": VllmOnly(MULTIMODAL),
        "multi_modal_uuids": VllmOnly(MULTIMODAL),
        "prompt_embeds": VllmOnly("prompt embeddings"),
        "cache_salt": VllmOnly("prefix-cache salts"),
        "token_type_ids": VllmOnly(POOLING),
        "encoder_prompt": VllmOnly("encoder-decoder models"),
        "decoder_prompt": VllmOnly("encoder-decoder models"),
    },
}


def refuse_vllm_only(where: str, given: dict[str, Any], known: str = "") -> None:
    """A ValueError for a vLLM argument minivllm lacks, a TypeError for a name neither has; nothing when every
    one asks for nothing minivllm lacks. `where` is a key of VLLM_ONLY; `known` says what minivllm takes there."""
    table, label = VLLM_ONLY[where], "a prompt dict" if where == "prompt" else f"{where}()"
    for name, value in given.items():
        if name not in table:
            unknown = "has an unknown key" if where == "prompt" else "got an unexpected keyword argument"
            raise TypeError(f"{label} {unknown} {name!r}" + (f"; {known}" if known else ""))
        entry = table[name]
        if not entry.accepts(value):
            instead = f"; {entry.instead}" if entry.instead else ""
            raise ValueError(f"{label}: minivllm does not support {name}={reprlib.repr(value)} ({entry.feature})"
                             f"{instead}. Leave it out.")
