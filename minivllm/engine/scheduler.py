"""Continuous batching: which sequences run in each step, and how many of their tokens.

A step is either a prefill step (new prompts and prompt chunks, up to the token budget) or a decode step
(one token for every running sequence), so decode steps keep a fixed shape that CUDA graphs can replay.
Prompts longer than the budget are prefilled in chunks. When decode runs out of KV blocks, the newest
running sequence is preempted: its blocks are freed and it is recomputed later, never dropped.

With async scheduling a sequence's newest token may still be on the GPU when the next step is scheduled
(Sequence.num_pending_tokens): it is decoded from there, and a sequence whose pending token is its last
is not scheduled again.
"""

import itertools
from collections import deque
from dataclasses import dataclass

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    is_prefill: bool
    num_tokens: int = 0  # tokens computed this step

    def __post_init__(self) -> None:
        self.num_tokens = sum(seq.num_scheduled_tokens for seq in self.seqs)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        """The next step's batch; None when nothing can run before tokens still on the GPU arrive."""
        batch = self._schedule_prefill() or self._schedule_decode()
        while batch is None:  # every running sequence is stuck mid-prompt for want of blocks, or awaits a token
            if any(seq.num_pending_tokens for seq in itertools.chain(self.running, self.waiting)):
                return None  # those tokens end sequences or let preempted ones return: collect them first
            if not self.running:
                raise RuntimeError("the KV cache cannot hold the next waiting request; this is a bug")
            self._preempt(self.running[-1])
            batch = self._schedule_prefill() or self._schedule_decode()
        return batch

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        for seq in self.running:  # unfinished prompt chunks go first
            if seq.num_uncomputed_tokens > 1:
                left = self._place(seq, budget, seqs)
                if left == budget:  # no blocks for it: run what is placed, else let decodes free blocks first
                    return ScheduledBatch(seqs, is_prefill=True) if seqs else None
                budget = left
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending_tokens:  # preempted while its last token was on the GPU: its prompt is not known
                break
            self.block_manager.match_prefix(seq)
            left = self._place(seq, budget, seqs)
            if left == budget:
                self.block_manager.free_sequence(seq)  # give back its prefix hits; it waits for room
                break
            budget = left
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        return ScheduledBatch(seqs, is_prefill=True) if seqs else None

    def _place(self, seq: Sequence, budget: int, seqs: list[Sequence]) -> int:
        """Schedule as much of seq's uncomputed tokens as budget and free blocks allow; the budget left.

        The blocks it fills are published at once, so prompts scheduled after it in this step share them.
        """
        num_tokens = min(seq.num_uncomputed_tokens, budget)
        if num_tokens == 0 or not self.block_manager.reserve(seq, num_tokens):
            return budget
        seq.num_scheduled_tokens = num_tokens
        self.block_manager.commit(seq)
        seqs.append(seq)
        return budget - num_tokens

    def _schedule_decode(self) -> ScheduledBatch | None:
        seqs = []
        for seq in list(self.running):
            if (seq.status != SequenceStatus.RUNNING or seq.num_uncomputed_tokens > 1 or seq.awaits_last_token
                    or (seq.num_pending_tokens and seq.needs_host_tokens)):
                continue  # preempted below to make room for an older sequence, mid-prompt, done, or waiting
            while not self.block_manager.reserve(seq, 1):
                self._preempt(self.running[-1])
                if seq.status != SequenceStatus.RUNNING:
                    break
            else:
                seq.num_scheduled_tokens = 1
                self.block_manager.commit(seq)
                seqs.append(seq)
        return ScheduledBatch(seqs, is_prefill=False) if seqs else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """seq is done (it may have been preempted while its last token was on the GPU)."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.block_manager.free_sequence(seq)
