"""Which slot of the runner's penalty counts (layers/penalties.py) each sequence with penalties holds.

A sequence takes a slot at its first sampling step and keeps it until it finishes, through preemptions, so its
counts are filled from the host once. With max_num_seqs slots there is always one for a running sequence: when
none is free, one held by a preempted sequence is taken back, and that sequence fills a new one on its return.
"""

import heapq

from minivllm.engine.sequence import Sequence, SequenceStatus


class PenaltySlots:
    def __init__(self, capacity: int):
        self.free = list(range(capacity))  # a heap: the lowest slot first, so the counts grow only as needed
        self.holders: dict[int, Sequence] = {}  # slot -> its sequence
        self.num_used = 0  # one past the highest slot ever given: the rows the counts must have

    def take(self, seq: Sequence) -> bool:
        """Give seq a slot if it has none (seq.penalty_slot); True when that slot must be filled from its tokens."""
        if seq.penalty_slot is not None:
            return False
        # its tokens are all on the host: it samples for the first time, or again after its return, which waits
        # for the tokens a step before its preemption sampled (Scheduler)
        assert not seq.num_pending_tokens, "a slot is filled from the host, which lacks a token still on the GPU"
        if not self.free:
            self.release(next(s for s in self.holders.values() if s.status != SequenceStatus.RUNNING))
        slot = heapq.heappop(self.free)
        self.holders[slot], seq.penalty_slot = seq, slot
        self.num_used = max(self.num_used, slot + 1)
        return True

    def release(self, seq: Sequence) -> None:
        if seq.penalty_slot is not None:
            del self.holders[seq.penalty_slot]
            heapq.heappush(self.free, seq.penalty_slot)
            seq.penalty_slot = None
