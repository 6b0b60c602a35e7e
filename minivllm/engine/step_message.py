"""The step message: one step of the model, as every rank's runner reads it.

Rank 0 builds it once a step from the scheduled batch (vLLM's SchedulerOutput plays this part). It names
no Sequence: rows of plain lists, so it goes to the other tensor-parallel ranks as it is, and the runner
needs nothing else to build its inputs. Only the sampling parameters stay on rank 0, which alone samples.
"""

from dataclasses import dataclass, field, replace

import numpy as np

from minivllm.engine.penalty_slots import PenaltySlots
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
    # (row, k, the prompt token after each of its new tokens, or -1): rows whose prompt logprobs are wanted
    prompt_logprobs: list[tuple[int, int, list[int]]] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.num_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def for_other_ranks(self) -> "StepMessage":
        return replace(self, sampling=None)


def build_step(batch: ScheduledBatch, previous: list[Sequence], eos_ids: list[int], vocab_size: int,
               penalty_slots: PenaltySlots) -> StepMessage:
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
        sampling=sampling_rows(sampling_seqs, eos_ids, vocab_size, penalty_slots),
        prompt_logprobs=[(row, seq.params.prompt_logprobs, prompt_targets(seq))
                         for row, seq in enumerate(batch.seqs)
                         if seq.wants_prompt_logprobs and seq.num_computed_tokens + 1 < seq.num_prompt_tokens],
    )


def prompt_targets(seq: Sequence) -> list[int]:
    """For each token computed this step, the prompt token after it (whose logprob its logits give), or -1."""
    start = seq.num_computed_tokens
    return [seq.token_ids[p + 1] if p + 1 < seq.num_prompt_tokens else -1
            for p in range(start, start + seq.num_scheduled_tokens)]


def sampling_rows(seqs: list[Sequence], eos_ids: list[int], vocab_size: int,
                  penalty_slots: PenaltySlots) -> SamplingRows:
    """The sampler's inputs for these sequences, one row each; those with penalties take slots from
    penalty_slots."""
    params = [seq.params for seq in seqs]
    columns = {
        "temperatures": [p.temperature for p in params],
        "top_k": [p.top_k if p.top_k < 2**31 else 0 for p in params],  # past any vocabulary: off (int64-safe)
        "top_p": [p.top_p for p in params],
        "min_p": [p.min_p for p in params],
        "presence_penalty": [p.presence_penalty for p in params],
        "frequency_penalty": [p.frequency_penalty for p in params],
        "repetition_penalty": [p.repetition_penalty for p in params],
    }
    arrays = {}
    banned = [(row, token) for row, seq in enumerate(seqs) for token in banned_tokens(seq, eos_ids)]
    pairs = {
        "banned": banned,
        "allowed": [(row, t) for row, p in enumerate(params) for t in p.allowed_token_ids or []],
        "bias": [(row, t) for row, p in enumerate(params) for t in (p.logit_bias or {})],
    }
    for name, rows_and_ids in pairs.items():
        kept = [(row, t) for row, t in rows_and_ids if 0 <= t < vocab_size]  # the model cannot produce the others
        if kept:
            arrays[name] = np.asarray(kept, dtype=np.int64).T.copy()
    if "allowed" in arrays:
        arrays["allowed_rows"] = np.asarray([r for r, p in enumerate(params) if p.allowed_token_ids], dtype=np.int64)
    if "bias" in arrays:
        arrays["bias_values"] = np.asarray([params[r].logit_bias[t] for r, t in arrays["bias"].T], dtype=np.float32)
    num_penalty_slots = penalty_arrays(seqs, penalty_slots, arrays)
    asked = [p.logprobs for p in params if p.logprobs is not None]
    return SamplingRows(columns=columns, generators=[seq.generator for seq in seqs], arrays=arrays,
                        num_penalty_slots=num_penalty_slots, num_logprobs=max(asked, default=-1),
                        bitmask=grammar_bitmask(seqs, vocab_size))


def grammar_bitmask(seqs: list[Sequence], vocab_size: int):
    """The rows' allowed next tokens (every token for rows without a grammar), when some row has a grammar."""
    if all(seq.grammar is None for seq in seqs):
        return None
    from minivllm.structured_outputs import allocate_bitmask  # only with structured outputs: it imports xgrammar

    bitmask = allocate_bitmask(len(seqs), vocab_size)
    for row, seq in enumerate(seqs):
        if seq.grammar is not None:
            seq.grammar.fill_bitmask(bitmask, row)  # every token so far is accepted (Sequence.needs_host_tokens)
    return bitmask


def banned_tokens(seq: Sequence, eos_ids: list[int]) -> list[int]:
    """What seq may not draw next: its stop and eos ids while min_tokens is not reached (outputs so far, one still
    on the GPU counted), and the last token of each bad word whose other tokens it has just generated."""
    p = seq.params
    banned = []
    # (a grammar decides itself when a stop token may come: banning it could leave no token at all)
    if len(seq) - seq.num_prompt_tokens < p.min_tokens and seq.grammar is None:
        banned += p.stop_token_ids + ([] if p.ignore_eos else eos_ids)
    outputs = seq.output_token_ids  # bad words need every token on the host (see Sequence.needs_host_tokens)
    for word in seq.bad_words:
        if len(word) == 1 or (len(outputs) >= len(word) - 1 and outputs[len(outputs) - len(word) + 1:] == word[:-1]):
            banned.append(word[-1])
    return banned


def penalty_arrays(seqs: list[Sequence], slots: PenaltySlots, arrays: dict[str, np.ndarray]) -> int:
    """Put the penalised rows and every row's slot in arrays, with the (slot, token) pairs that fill the slots
    these sequences take now (see layers/penalties.py); the slots the counts must hold (0: no row has penalties)."""
    penalized = [row for row, seq in enumerate(seqs) if seq.params.has_penalties]
    if not penalized:
        return 0
    filled = [seqs[row] for row in penalized if slots.take(seqs[row])]
    arrays["penalty_rows"] = np.asarray(penalized, dtype=np.int64)
    # every row reads a slot; one without penalties reads slot 0 with neutral values (layers/penalties.py)
    arrays["penalty_slots"] = np.asarray([seq.penalty_slot or 0 for seq in seqs], dtype=np.int64)
    if filled:
        arrays["fill_slots"] = np.asarray([seq.penalty_slot for seq in filled], dtype=np.int64)
        prompt = [(seq.penalty_slot, t) for seq in filled for t in seq.token_ids[: seq.num_prompt_tokens]]
        outputs = [(seq.penalty_slot, t) for seq in filled for t in seq.output_token_ids]
        for name, pairs in (("fill_prompt", prompt), ("fill_outputs", outputs)):
            if pairs:
                arrays[name] = np.asarray(pairs, dtype=np.int64).T.copy()
    return slots.num_used
