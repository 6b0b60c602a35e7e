"""Linear layers split across tensor-parallel ranks, and how each rank cuts its part of a checkpoint tensor.

Column-parallel layers (qkv, gate_up) keep a slice of the output rows, so each rank computes its own heads
or its own part of the MLP with no communication. Row-parallel layers (o_proj, down_proj) keep the matching
slice of the input columns; their partial products are summed over the ranks by one all-reduce.
At tensor_parallel_size 1 every part is the whole and these are plain linear layers.
"""

from dataclasses import dataclass

import torch
from torch import nn

from minivllm import ops
from minivllm.distributed import TensorParallel


@dataclass(frozen=True)
class Split:
    """Part `index` of a dimension cut into `parts` pieces; the last may be short when the size does not divide."""

    parts: int = 1
    index: int = 0

    def padded_length(self, size: int) -> int:
        return -(-size // self.parts)

    def range(self, size: int) -> tuple[int, int]:
        """(start, length) of this part within size."""
        start = min(size, self.index * self.padded_length(size))
        return start, min(size - start, self.padded_length(size))


@dataclass(frozen=True)
class Sharding:
    """How a parameter is cut from checkpoint tensors along `dim`: it packs one piece per checkpoint tensor
    (q, k, v; or gate, up), piece i holding part splits[i] of a tensor of full_sizes[i] along dim."""

    dim: int
    full_sizes: tuple[int, ...]
    splits: tuple[Split, ...]

    def local_sizes(self) -> list[int]:
        return [split.padded_length(size) for size, split in zip(self.full_sizes, self.splits)]

    def full_shape(self, local_shape: torch.Size) -> tuple[int, ...]:
        """The checkpoint tensors' shape, all pieces stacked: what a single-process model holds."""
        shape = list(local_shape)
        shape[self.dim] = sum(self.full_sizes)
        return tuple(shape)

    def target(self, param: torch.Tensor, piece: int) -> torch.Tensor:
        """Where piece `piece` goes in this rank's parameter (a view; padding rows excluded)."""
        offset = sum(self.local_sizes()[:piece])
        return param.narrow(self.dim, offset, self.splits[piece].range(self.full_sizes[piece])[1])

    def read(self, checkpoint, piece: int, name: str) -> torch.Tensor:
        """This rank's part of checkpoint tensor `checkpoint` (a torch tensor, or a safetensors slice that
        reads only those bytes from the file)."""
        shape = tuple(checkpoint.shape) if isinstance(checkpoint, torch.Tensor) else tuple(checkpoint.get_shape())
        full = self.full_sizes[piece]
        if len(shape) <= self.dim or shape[self.dim] != full:
            raise ValueError(f"{name}: checkpoint shape {shape} does not fit the model, which wants {full} along "
                             f"dimension {self.dim}")
        start, length = self.splits[piece].range(full)
        index = [slice(None)] * len(shape)
        index[self.dim] = slice(start, start + length)
        return checkpoint[tuple(index)]


def mark_sharded(param: nn.Parameter, sharding: Sharding) -> nn.Parameter:
    param.sharding = sharding  # read by the loader and the random initialiser
    return param


class ColumnParallelLinear(nn.Linear):
    """Output rows split across ranks. Packed: several checkpoint matrices stacked (q, k, v), each split on
    its own, so a rank holds [its q rows; its k rows; its v rows]. output_sizes are this rank's."""

    def __init__(self, in_features: int, full_sizes: list[int], bias: bool, splits: list[Split]):
        sharding = Sharding(0, tuple(full_sizes), tuple(splits))
        self.output_sizes = sharding.local_sizes()
        super().__init__(in_features, sum(self.output_sizes), bias=bias)
        mark_sharded(self.weight, sharding)
        if bias:
            mark_sharded(self.bias, sharding)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, out=out)

    def shard(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """Piece `index` (e.g. k of qkv) of a tensor shaped like this layer's weight or bias."""
        return self.weight.sharding.target(tensor, index)


class RowParallelLinear(nn.Linear):
    """Input columns split across ranks; the partial outputs are summed by an all-reduce. The bias is added
    once, by rank 0, before the sum. Each rank rounds its part to the model's dtype before the sum, so the
    last bits differ from one GPU's; tp_invariant makes them the same (invariant_forward).
    """

    def __init__(self, full_in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        split = Split(tp.size, tp.rank)
        super().__init__(split.padded_length(full_in_features), out_features, bias=bias)
        mark_sharded(self.weight, Sharding(1, (full_in_features,), (split,)))
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.invariant_splits:
            return self.invariant_forward(x)
        return self.tp.all_reduce(ops.linear(x, self.weight, self.bias if self.tp.rank == 0 else None))

    def invariant_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The product with K cut into tp.invariant_splits equal slices, each slice's product computed alone (the
        same shapes at every tensor_parallel_size, so the same kernels and bits) and all of them added in one
        fixed pairwise tree: a rank sums its own slices, the tree's lower levels, and the ranks' sums make the
        top levels. Every tensor_parallel_size that divides the splits then adds the same fp32 numbers in the
        same order as one GPU; the bias comes last, on every rank alike."""
        slices = self.tp.invariant_splits // self.tp.size
        width = self.weight.shape[1] // slices
        parts = torch.stack([
            ops.linear(x[..., i * width:(i + 1) * width], self.weight[:, i * width:(i + 1) * width], fp32_out=True)
            for i in range(slices)
        ])
        out = pairwise_sum(self.tp.all_gather(pairwise_sum(parts)))
        return out if self.bias is None else out + self.bias


def pairwise_sum(parts: torch.Tensor) -> torch.Tensor:
    """The sum over dim 0 (a power of two long) as a balanced tree of neighbours: (p0 + p1) + (p2 + p3), ..."""
    while parts.shape[0] > 1:
        parts = parts[0::2] + parts[1::2]
    return parts[0]
