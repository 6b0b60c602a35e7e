"""A Sequence is one completion being generated: its tokens, its pages in the KV cache, its progress."""

import enum
import itertools
from typing import TYPE_CHECKING

import torch

from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.outputs import FlatLogprobs
from minivllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from minivllm.structured_outputs import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, generator: torch.Generator | None,
                 max_model_len: int):
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.generator = generator  # per-request RNG when params.seed is set
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chain hashes of its full blocks, filled as needed
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_scheduled_tokens = 0  # tokens this step computes
        # tokens sampled by a launched step whose values have not reached the host yet (async scheduling):
        # they count in len(seq), and the next step reads them from the GPU
        self.num_pending_tokens = 0
        max_tokens = params.max_tokens if params.max_tokens is not None else max_model_len
        self.max_len = min(self.num_prompt_tokens + max_tokens, max_model_len)  # its length when it stops at the latest
        self.penalty_slot: int | None = None  # with penalties: its row of the runner's counts (PenaltySlots)
        self.bad_words: list[list[int]] = []  # token sequences of params.bad_words, filled by the engine
        self.grammar: GrammarMatcher | None = None  # with structured outputs: where it is in its grammar
        self.wants_prompt_logprobs = False  # the first completion of a request with prompt_logprobs computes them
        self.num_cached_tokens: int | None = None  # prompt tokens the prefix cache held when it was first admitted
        self.cumulative_logprob = 0.0
        # with params.logprobs: one {token id: Logprob} a generated token
        self.logprobs = FlatLogprobs(params.logprobs) if params.logprobs is not None else None
        # its text as it grows, when stop strings or a streaming request need it before the end
        self.detokenizer: IncrementalDetokenizer | None = None
        self.num_reported_tokens = self.num_reported_chars = 0  # what its deltas have given so far
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def append_token(self, token: int) -> None:
        self.token_ids.append(token)

    def __len__(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self) - self.num_computed_tokens

    @property
    def awaits_last_token(self) -> bool:
        """Its final token is still on the GPU: there is nothing left to compute for it."""
        return self.num_pending_tokens > 0 and len(self) >= self.max_len

    @property
    def needs_host_tokens(self) -> bool:
        """Its next step needs every token on the host (bad words are matched there, the grammar's mask is made
        there): with async scheduling it waits for a token still on the GPU instead of being decoded from it."""
        return bool(self.bad_words) or self.grammar is not None

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def samples_this_step(self) -> bool:
        """True when this step computes up to the last token, so its logits give the next token."""
        return self.num_computed_tokens + self.num_scheduled_tokens == len(self)
