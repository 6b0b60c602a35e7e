"""The engine's settings: EngineArgs as the user gave them (checked when made), and EngineConfig, everything
resolved from them once (model source, dtype, device, max_model_len) before any runner is built."""

import warnings
from dataclasses import dataclass

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
    seed: int = 0
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
