"""Presence, frequency and repetition penalties, from token counts kept on the device across steps.

Each sequence with penalties holds a slot (the engine's PenaltySlots gives it): a row of two tables, how many
times each token occurs in its output and which tokens its prompt holds. A slot is filled from the host once,
when the sequence takes it (its first sampling step, or its return after a preemption gave the slot away); after
that each step adds the tokens it samples, on the device. So a step sends no token history, and a token the step
before sampled counts before it reaches the host (async scheduling).
"""

from dataclasses import dataclass

import torch

from minivllm.layers.fusion import fused_on_gpu
from minivllm.ops import reference


class PenaltyCounts:
    """The slots' tables, grown as more slots are used (up to max_slots): a step with penalties on a few requests
    keeps a few rows of vocabulary width, not one for every sequence the engine may run."""

    def __init__(self, vocab_size: int, max_slots: int, device: torch.device):
        self.max_slots = max_slots
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)  # [slots, vocab]
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)  # [slots, vocab]

    def fill(self, num_slots: int, slots: torch.Tensor | None, prompt: torch.Tensor | None,
             outputs: torch.Tensor | None) -> None:
        """Make room for num_slots slots, then refill `slots` [R] from (slot, token) pairs [2, N] of their prompt and
        output tokens."""
        if num_slots > len(self.output_counts):
            self.grow(min(self.max_slots, max(num_slots, 2 * len(self.output_counts))))
        if slots is None:
            return
        self.output_counts[slots] = 0
        self.in_prompt[slots] = False
        if prompt is not None:
            self.in_prompt[prompt[0], prompt[1]] = True
        if outputs is not None:
            self.count(outputs[0], outputs[1])

    def count(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """One more occurrence of tokens[i] in the output of slots[i] (a slot may repeat)."""
        self.output_counts.index_put_((slots, tokens), torch.ones_like(slots, dtype=torch.int32), accumulate=True)

    def count_once(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """count() where no slot repeats (a step's sampled tokens): a gather and a scatter, without the sort that
        accumulating index_put_ runs on the GPU."""
        self.output_counts[slots, tokens] += 1

    def grow(self, num_slots: int) -> None:
        old_counts, old_prompt = self.output_counts, self.in_prompt
        self.output_counts = old_counts.new_zeros(num_slots, old_counts.shape[1])
        self.in_prompt = old_prompt.new_zeros(num_slots, old_prompt.shape[1])
        self.output_counts[: len(old_counts)] = old_counts
        self.in_prompt[: len(old_prompt)] = old_prompt


@dataclass
class Penalties:
    """A step's penalties, on the device, over every sampling row: a row without penalties has the neutral values
    (0, 0, 1), which leave its logits exactly as they are, whatever slot it reads (slot 0)."""

    rows: torch.Tensor  # [P] the rows that have penalties, whose sampled tokens count
    slots: torch.Tensor  # [B] each row's slot in counts
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor
    repetition: torch.Tensor
    counts: PenaltyCounts

    def tables(self) -> tuple[torch.Tensor, ...]:
        """What penalized() reads after the logits, in its order (ops.sampler_gumbel_argmax takes the same)."""
        return (self.counts.output_counts, self.counts.in_prompt, self.slots, self.presence, self.frequency,
                self.repetition)

    def count_sampled(self, tokens: torch.Tensor) -> None:
        """Add the step's sampled tokens [B] to the penalised rows' counts, for the steps after."""
        self.counts.count_once(self.slots[self.rows], tokens[self.rows])


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """New fp32 logits [B, V] with the penalties applied (fp32 in: the lm_head's on the GPU, see ParallelLMHead)."""
    return penalized(logits, *p.tables())


# penalized() of ops/reference.py (as vLLM: repetition over prompt and output tokens, then frequency and presence
# over output tokens), one pass on the GPU: the slots' rows are gathered inside the fused kernel, never copied out.
penalized = fused_on_gpu(reference.penalized)
