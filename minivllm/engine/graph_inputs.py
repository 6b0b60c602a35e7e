"""The inputs of the captured decode graphs: device buffers at fixed addresses, which every graph reads,
filled each step from a pinned host mirror by two copies (one per dtype), rather than a dozen small copies
and fills: at batch 1 the host's work per step is what a step costs."""

import numpy as np
import torch

from minivllm.engine.sequence import Sequence
from minivllm.host_copy import to_device
from minivllm.layers.attention import AttentionMetadata


class GraphInputs:
    def __init__(self, largest: int, max_blocks: int, block_size: int, device: torch.device):
        self.largest, self.max_blocks, self.block_size = largest, max_blocks, block_size
        # input ids, positions, slots; and the batch's total context in [3, 0]
        self.longs = torch.zeros(4, largest, dtype=torch.int64, device=device)
        self.longs[2] = -1  # padding rows write nowhere
        self.ints = torch.zeros(largest * (1 + max_blocks), dtype=torch.int32, device=device)  # lengths, tables
        # Two host mirrors, used in turn: when a step fills one, the copy from the other may still be queued
        # behind the step before (async scheduling), but the copy from this one ran before that step's tokens
        # were collected.
        pin = device.type == "cuda"
        self.mirrors = [(self.longs.cpu().pin_memory() if pin else self.longs.clone(),
                         self.ints.cpu().pin_memory() if pin else self.ints.clone()) for _ in range(2)]
        self.turn = 0

    def views(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input ids, positions, metadata) of the first `size` rows, as the graph of that size reads them."""
        tables = self.ints[self.largest :].view(self.largest, self.max_blocks)
        meta = AttentionMetadata(
            False, self.longs[2, :size], context_lens=self.ints[:size], block_tables=tables[:size],
            total_context_len=self.longs[3, :1],
        )
        return self.longs[0, :size], self.longs[1, :size], meta

    def fill(self, seqs: list[Sequence], size: int, previous_tokens: torch.Tensor | None,
             previous_seqs: list[Sequence]) -> None:
        """Stage this step's rows (padded to `size`) and copy them to the device. A token still on the GPU is
        copied there from previous_tokens, the tokens of the step before, sampled by previous_seqs."""
        longs, ints = self.mirrors[self.turn]
        self.turn ^= 1
        n, bs = len(seqs), self.block_size
        host_longs, host_ints = longs.numpy(), ints.numpy()
        lengths = np.fromiter((len(seq) for seq in seqs), dtype=np.int64, count=n)  # counting pending tokens
        last_blocks = np.fromiter((seq.block_table[(m - 1) // bs] for seq, m in zip(seqs, lengths)), np.int64, n)
        host_longs[0, :n] = [0 if seq.num_pending_tokens else seq.token_ids[-1] for seq in seqs]
        host_longs[1, :n] = lengths - 1
        host_longs[2, :n] = last_blocks * bs + (lengths - 1) % bs
        host_longs[2, n:size] = -1
        host_longs[3, 0] = lengths.sum()
        host_ints[:n] = lengths
        host_ints[n:size] = 0  # padding rows attend to nothing
        tables = host_ints[self.largest :].reshape(self.largest, self.max_blocks)
        for row, seq in enumerate(seqs):  # entries past a row's last block are never read
            tables[row, : len(seq.block_table)] = seq.block_table
        self.longs.copy_(longs, non_blocking=True)
        used = self.largest + size * self.max_blocks
        self.ints[:used].copy_(ints[:used], non_blocking=True)
        copy_pending_tokens(self.longs[0, :n], seqs, previous_tokens, previous_seqs)


def copy_pending_tokens(
    input_ids: torch.Tensor, seqs: list[Sequence], previous_tokens: torch.Tensor | None, previous_seqs: list
) -> None:
    """Put into input_ids (one row a sequence) the tokens still on the GPU: previous_seqs sampled them, into
    previous_tokens, in the step before."""
    pending = [row for row, seq in enumerate(seqs) if seq.num_pending_tokens]
    if not pending:
        return
    same_batch = len(pending) == len(seqs) == len(previous_seqs)
    if same_batch and all(a.seq_id == b.seq_id for a, b in zip(seqs, previous_seqs)):
        input_ids.copy_(previous_tokens)  # the batch of the step before, in its order: one copy
        return
    source_row = {seq.seq_id: row for row, seq in enumerate(previous_seqs)}
    rows = to_device([pending, [source_row[seqs[row].seq_id] for row in pending]], torch.int64, input_ids.device)
    input_ids[rows[0]] = previous_tokens[rows[1]]
