"""The embedding and the lm_head split by vocabulary rows across tensor-parallel ranks.

Each rank holds a contiguous block of ceil(vocab / ranks) rows (the last block padded). The embedding looks
up the ids that fall in its block, zeros the rest, and sums over the ranks; the lm_head computes logits for
its block and rank 0 gathers the whole vocabulary for sampling.
"""

import torch
import torch.nn.functional as F
from torch import nn

from minivllm import ops
from minivllm.distributed import TensorParallel
from minivllm.layers.linear import Sharding, Split, mark_sharded


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel):
        super().__init__()
        split = Split(tp.size, tp.rank)
        self.vocab_size, self.tp = vocab_size, tp
        self.vocab_start, num_rows = split.range(vocab_size)
        self.vocab_end = self.vocab_start + num_rows
        weight = torch.zeros(split.padded_length(vocab_size), hidden_size)  # padding rows stay zero
        self.weight = mark_sharded(nn.Parameter(weight), Sharding(0, (vocab_size,), (split,)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        x = F.embedding((input_ids - self.vocab_start) * mine, self.weight)
        return self.tp.all_reduce(x.masked_fill(~mine.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Shares the embedding's layout, so tied embeddings are one parameter on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, vocab] on rank 0; None on the other ranks. On the GPU they come out of the matrix
        product in fp32: rounded to bf16 (|logit| ~ 10 has an ulp of 0.06), near-ties would flip the argmax."""
        logits = ops.linear(hidden, self.weight, fp32_out=hidden.is_cuda)
        logits = self.tp.gather_last_dim(logits)
        if logits is None or self.tp.size == 1:
            return logits
        return logits[:, : self.vocab_size]
