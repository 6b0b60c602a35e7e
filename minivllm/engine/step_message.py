"""The step message: one step of the model, as every rank's runner reads it.

Rank 0 builds it once a step from the scheduled batch (vLLM's SchedulerOutput plays this part). It names
no Sequence: rows of plain lists, so it goes to the other tensor-parallel ranks as it is, and the runner
needs nothing else to build its inputs. Only the sampling parameters stay on rank 0, which alone samples.
"""

from dataclasses import dataclass, replace

from minivllm.engine.scheduler import ScheduledBatch
from minivllm.engine.sequence import Sequence
from minivllm.layers.sampler import SamplingRows


@dataclass(frozen=True)
class StepMessage:
    is_prefill: bool  # prompt chunks; else one token a row (decode, CUDA graphs)
    token_ids: list[int]  # each row's new tokens, back to back; 0 for a token still on the GPU (see pending)
    num_new_tokens: list[int]  # a row's tokens computed this step
    start_positions: list[int]  # a row's tokens already in the KV cache: its first new token's position
    block_tables: list[list[int]]  # a row's KV-cache blocks, in order
    sampling_rows: list[int]  # the rows whose last new token's logits give their next token
    # (row, index among the previous step's sampled tokens): a row whose last new token the step before
    # sampled and the host has not seen yet (async scheduling); the runner reads it where it is, on the device
    pending: list[tuple[int, int]]
    sampling: SamplingRows | None = None  # per sampling row; rank 0 alone samples, so the others get None

    @property
    def num_rows(self) -> int:
        return len(self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def for_other_ranks(self) -> "StepMessage":
        return replace(self, sampling=None)


def build_step(batch: ScheduledBatch, previous: list[Sequence], eos_ids: list[int]) -> StepMessage:
    """The message for a scheduled batch; `previous` are the sequences that sampled in the step before, in row
    order, whose tokens may still be on the GPU."""
    token_ids: list[int] = []
    pending = []
    previous_row = {seq.seq_id: row for row, seq in enumerate(previous)} if previous else {}
    for row, seq in enumerate(batch.seqs):
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
        known = seq.token_ids[start:end]  # a token still on the GPU is past token_ids' end: always the last
        token_ids += known
        if len(known) < end - start:
            token_ids.append(0)
            pending.append((row, previous_row[seq.seq_id]))
    sampling_seqs = [seq for seq in batch.seqs if seq.samples_this_step]
    return StepMessage(
        is_prefill=batch.is_prefill,
        token_ids=token_ids,
        num_new_tokens=[seq.num_scheduled_tokens for seq in batch.seqs],
        start_positions=[seq.num_computed_tokens for seq in batch.seqs],
        block_tables=[seq.block_table for seq in batch.seqs],  # read at once, before the scheduler runs again
        sampling_rows=[row for row, seq in enumerate(batch.seqs) if seq.samples_this_step],
        pending=pending,
        sampling=sampling_rows(sampling_seqs, eos_ids),
    )


def sampling_rows(seqs: list[Sequence], eos_ids: list[int]) -> SamplingRows:
    params = [seq.params for seq in seqs]
    # a k past any vocabulary keeps every token, as off does (and would overflow int64)
    top_k = [p.top_k if p.top_k < 2**31 else 0 for p in params]
    banned = [  # while a row may not end yet (min_tokens; outputs so far, one still on the GPU counted)
        p.stop_token_ids + ([] if p.ignore_eos else eos_ids) if len(seq) - seq.num_prompt_tokens < p.min_tokens else []
        for seq, p in zip(seqs, params)
    ]
    return SamplingRows(
        temperatures=[p.temperature for p in params],
        top_k=top_k,
        top_p=[p.top_p for p in params],
        min_p=[p.min_p for p in params],
        generators=[seq.generator for seq in seqs],
        banned=banned,
    )
