"""The engine loop: requests in, scheduler and model runner each step, stop checks, outputs out."""

import time
from collections import deque
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from minivllm.engine.block_manager import BlockManager
from minivllm.engine.model_runner import LaunchedStep, ModelRunner
from minivllm.engine.scheduler import ScheduledBatch, Scheduler
from minivllm.engine.sequence import Sequence
from minivllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from minivllm.sampling_params import SamplingParams


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


class LLMEngine:
    """Steps the scheduler and the runner. With async scheduling, step N+1 is scheduled and launched while
    step N still runs on the GPU, and N's tokens are collected after that: the host's work overlaps the
    GPU's. A sequence that stops on step N's token (say, at eos) has run one step too many; that step's
    token is dropped."""

    def __init__(self, runner: ModelRunner, tokenizer: PreTrainedTokenizerBase | None, eos_ids: list[int]):
        self.runner = runner
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = runner.max_model_len
        config = runner.config
        block_manager = BlockManager(runner.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[Sequence, Request] = {}
        self.overlap = int(config.async_scheduling)  # steps launched and not yet collected: at most overlap + 1
        self.launched: deque[LaunchedStep] = deque()

    def add_request(self, request_id: str, prompt: str | None, token_ids: list[int], params: SamplingParams) -> Request:
        request = Request(request_id, prompt, token_ids, params, [], RequestMetrics(time.time()))
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.runner.device).manual_seed(params.seed + index)
            seq = Sequence(token_ids, params, generator)
            seq.max_len = min(seq.max_len, self.max_model_len)
            request.seqs.append(seq)
            self.requests[seq] = request
            self.scheduler.add(seq)
        return request

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or bool(self.launched)

    def step(self) -> tuple[ScheduledBatch | None, int, list[Request]]:
        """Launch the next batch, if one can run, and collect the tokens of the step before it (of this one,
        without async scheduling); the batch, how many new tokens were collected, and the requests finished."""
        batch = self.scheduler.schedule() if self.scheduler.has_unfinished else None
        if batch is not None:
            previous = self.launched[-1] if self.launched else None
            self.launched.append(self.runner.launch(batch, self.eos_ids, previous))
            for seq in batch.seqs:
                seq.num_pending_tokens += seq.samples_this_step
                seq.num_computed_tokens += seq.num_scheduled_tokens
                seq.num_scheduled_tokens = 0
        if not self.launched or (batch is not None and len(self.launched) <= self.overlap):
            return batch, 0, []
        step = self.launched.popleft()
        tokens = step.token_ids()  # waits for that step on the GPU
        finished, num_new = [], 0
        for seq, token in zip(step.seqs, tokens):
            seq.num_pending_tokens -= 1
            if seq.is_finished:
                continue  # it stopped on its previous token: this one came from a step too many
            num_new += 1
            if self.append_token(seq, token):
                request = self.requests[seq]
                if request.finished:
                    request.metrics.finished_time = time.time()
                    finished.append(request)
        return batch, num_new, finished

    def append_token(self, seq: Sequence, token: int) -> bool:
        """Add a sampled token and apply every stop condition; True when seq finished."""
        seq.token_ids.append(token)
        self.scheduler.block_manager.token_arrived(seq)
        request = self.requests[seq]
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = time.time()
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return self.finish(seq, "stop", token)
            if not params.ignore_eos and token in self.eos_ids:
                return self.finish(seq, "stop", None)
        if params.stop_strings and self.tokenizer is not None:
            stop = self.detect_stop_string(seq)
            if stop is not None:
                return self.finish(seq, "stop", stop)
        if len(seq.token_ids) >= seq.max_len:  # max_tokens, or max_model_len
            return self.finish(seq, "length", None)
        return False

    def detect_stop_string(self, seq: Sequence) -> str | None:
        """Detokenise the new token incrementally; cut the text at a stop string if one now appears."""
        ids = seq.output_token_ids
        skip = seq.params.skip_special_tokens
        before = self.tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
        after = self.tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None  # an incomplete character: wait for the next token
        new_text = after[len(before) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        checked = len(seq.text)
        seq.text += new_text
        if seq.num_output_tokens <= seq.params.min_tokens:
            return None  # as vLLM: only text after the first min_tokens tokens can end in a stop string
        # a stop string must end in the new text: text before it was checked (or is within min_tokens)
        hits = [(seq.text.find(s, max(0, checked - len(s) + 1)), s) for s in seq.params.stop_strings]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return None
        pos, stop = min(hits)
        seq.text = seq.text[:pos]
        return stop

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> bool:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        return True

    def output(self, request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(i, self.text_of(seq), seq.output_token_ids, seq.finish_reason, seq.stop_reason)
            for i, seq in enumerate(request.seqs)
        ]
        for seq in request.seqs:
            self.requests.pop(seq, None)
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions, request.finished,
            request.metrics,
        )

    def text_of(self, seq: Sequence) -> str:
        if self.tokenizer is None:
            return ""
        if isinstance(seq.stop_reason, str):
            return seq.text  # already detokenised and cut at the stop string
        ids = seq.output_token_ids
        if seq.finish_reason == "stop":
            ids = ids[:-1]  # as vLLM, the eos or stop id that ended it is in token_ids but not in the text
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def abort_all(self) -> None:
        """Drop every request (after an interrupt), freeing their blocks, so the engine can serve again."""
        self.launched.clear()
        for seq in list(self.scheduler.running):
            self.scheduler.block_manager.unpublish_uncomputed(seq)
            self.scheduler.finish(seq)
        self.scheduler.waiting.clear()
        self.requests.clear()
