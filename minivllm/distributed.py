"""Tensor parallelism's collectives for the model's layers, and the checks a model must pass to be split.

Every rank holds a slice of each weight matrix and its own KV cache for its heads. The model's group (NCCL on
GPUs, gloo on the CPU) runs the all-reduces and the logits gather inside a step. How ranks meet outside a
step (steps sent from rank 0, start-up, failures) is the control plane's business: engine/tp_workers.py. At
tensor_parallel_size 1 there is no group and every collective here is skipped.
"""

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import PretrainedConfig

# The model group's collectives run in lockstep inside a step, so a long wait there means a rank hung:
# the timeout is the last resort behind rank 0's own checks.
MODEL_GROUP_TIMEOUT = timedelta(minutes=5)


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group. The default is the single process: no group."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # the model's collectives
    # Row-parallel products summed over this many K slices in one fixed tree, so that every tensor_parallel_size
    # dividing it gives the same bits (EngineArgs.tp_invariant); 0: one product a rank, summed by all_reduce.
    invariant_splits: int = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place (capturable in a CUDA graph with NCCL)."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked along a new first dimension in rank order, on every rank."""
        if self.size == 1:
            return x.unsqueeze(0)
        out = x.new_empty(self.size, *x.shape)
        dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x concatenated along the last dimension, on rank 0; None on the others."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def broadcast_from_first_rank(self, x: torch.Tensor) -> torch.Tensor:
        """rank 0's x on every rank, in place, over the model's group (on the device, no host sync)."""
        if self.size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x


def init_tensor_parallel(rank: int, size: int, device: torch.device, store: dist.Store,
                         invariant_splits: int) -> TensorParallel:
    """Join the model's group (the default process group of this process, so one group per process at a time)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=MODEL_GROUP_TIMEOUT)
    return TensorParallel(rank, size, dist.group.WORLD, invariant_splits)


def leave_tensor_parallel(alone: bool = False) -> None:
    """Leave the group. NCCL's shutdown is collective: every rank must leave at about the same time, or the
    first to leave waits for the others for ever. A rank left `alone` (the others died or were killed) aborts
    its NCCL communicators instead; gloo's shutdown waits for no one."""
    if not dist.is_initialized():
        return
    if alone and dist.get_backend() == "nccl":
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


def check_shardable(config: PretrainedConfig, size: int) -> None:
    """A ValueError, before any process starts, when the model's heads or MLP do not split over `size` ranks."""
    problems = shard_problems(config, size, "tensor_parallel_size")
    if config.num_key_value_heads % size and size % config.num_key_value_heads:
        problems.append(
            f"num_key_value_heads {config.num_key_value_heads} neither divides by tensor_parallel_size {size} nor "
            "divides it (KV heads are split across ranks, or replicated when there are fewer than the ranks)"
        )
    if problems:
        raise ValueError(f"this model cannot be split over {size} ranks: {'; '.join(problems)}; choose another "
                         "tensor_parallel_size")


def check_invariant_splits(config: PretrainedConfig, splits: int) -> None:
    """A ValueError, before any work, when tp_invariant=splits cannot hold for this model: every tensor-parallel
    size dividing it must split the heads, the KV heads (no replication: a replicated head's rank sees another
    grouping) and the MLP evenly."""
    problems = shard_problems(config, splits, "tp_invariant")
    if config.num_key_value_heads % splits:
        problems.append(f"num_key_value_heads {config.num_key_value_heads} is not a multiple of tp_invariant "
                        f"{splits}")
    if problems:
        raise ValueError(f"tp_invariant={splits} does not fit this model: {'; '.join(problems)}; use a smaller "
                         "power of two that divides them, or 0")


def shard_problems(config: PretrainedConfig, size: int, name: str) -> list[str]:
    problems = []
    if config.num_attention_heads % size:
        problems.append(f"num_attention_heads {config.num_attention_heads} is not a multiple of {name} {size}")
    if config.intermediate_size % size:
        problems.append(f"intermediate_size {config.intermediate_size} is not a multiple of {name} {size}")
    return problems
