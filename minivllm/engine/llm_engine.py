"""The online engine, in vLLM's shape: requests are added and aborted at any time, and each step() schedules
a batch, runs it and returns the outputs of the requests that progressed.

With async scheduling, step N+1 is scheduled and launched while step N still runs on the GPU, and N's tokens
are collected after that: the host's work overlaps the GPU's. A sequence that stops on step N's token (say,
at eos) has run one step too many; that step's token is dropped.
"""

import functools
import gc
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from minivllm.config import EngineArgs, EngineConfig
from minivllm.distributed import check_invariant_splits
from minivllm.engine.block_manager import BlockManager
from minivllm.engine.detokenizer import IncrementalDetokenizer
from minivllm.engine.executor import Executor, start_executor
from minivllm.engine.model_runner import LaunchedStep
from minivllm.engine.output_processor import CompletionDelta, OutputProcessor, RequestDelta
from minivllm.engine.penalty_slots import PenaltySlots
from minivllm.engine.scheduler import Scheduler
from minivllm.engine.sequence import Sequence
from minivllm.engine.step_message import build_step
from minivllm.inputs import InputProcessor, ProcessedPrompt, Prompt
from minivllm.model_loader import eos_token_ids, load_tokenizer
from minivllm.outputs import PositionLogprobs, RequestMetrics, RequestOutput, position_logprobs
from minivllm.sampling_params import RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from minivllm.structured_outputs import GrammarMatcher


@dataclass
class Request:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # position i: of prompt token i (None for 0)
    prompt_logprobs_reported: bool = False  # they go in one delta, the first after all are computed

    @property
    def finished(self) -> bool:
        seqs = self.seqs  # one sequence, but for n > 1: asked of every request that progressed, every step
        return seqs[0].is_finished if len(seqs) == 1 else all(seq.is_finished for seq in seqs)


@dataclass
class InFlight:
    """A launched step whose tokens the host has not collected yet, and the sequences that sampled them."""

    seqs: list[Sequence]
    launched: LaunchedStep
    # (sequence, its first computed position, tokens, k) for each row of the step's prompt_logprobs
    prompt_rows: list[tuple[Sequence, int, int, int]]


@dataclass
class EngineStats:
    """Totals since the engine started (the server's metrics, the progress bar)."""

    prompt_tokens: int = 0  # prompt tokens computed (prefix-cache hits are not)
    generation_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor, tokenizer: PreTrainedTokenizerBase | None,
                 eos_ids: list[int], assemble_outputs: bool = True):
        self.config, self.executor, self.tokenizer, self.eos_ids = config, executor, tokenizer, eos_ids
        self.max_model_len = config.max_model_len
        self.inputs = InputProcessor(tokenizer, config.source.config.vocab_size, self.max_model_len)
        args = config.args
        block_manager = BlockManager(executor.runner.num_kv_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(block_manager, args.max_num_seqs, args.max_num_batched_tokens)
        self.penalty_slots = PenaltySlots(args.max_num_seqs)
        self.requests: dict[str, Request] = {}  # unfinished, by id
        self.request_of: dict[int, Request] = {}  # by seq_id, for every unfinished sequence's request
        self.aborted: list[RequestDelta] = []  # the last deltas of aborted requests, for the next step
        # step()'s RequestOutputs from step_deltas(); None in the engine-core process, whose front end makes them
        self.output_processor = OutputProcessor() if assemble_outputs else None
        self.overlap = int(args.async_scheduling)  # steps launched and not yet collected: at most overlap + 1
        self.in_flight: deque[InFlight] = deque()
        self.stats = EngineStats()
        # by token id, its text alone (a logprob's decoded_token), once decoded
        self.decoded: list[str | None] = [None] * config.source.config.vocab_size
        self.grammar_compiler = None  # made for the first request with structured outputs

    @classmethod
    def from_engine_args(cls, args: EngineArgs, stacklevel: int = 1, assemble_outputs: bool = True) -> "LLMEngine":
        """Resolve the config, load the tokenizer, and start the runner (and the other ranks). Without
        assemble_outputs, only step_deltas() reports the requests' progress (the engine-core process)."""
        config = EngineConfig.resolve(args)
        if args.tp_invariant:
            check_invariant_splits(config.source.config, args.tp_invariant)
        config.warn_if_capped(stacklevel + 1)
        tokenizer = load_tokenizer(config.source)
        executor = start_executor(config)
        engine = cls(config, executor, tokenizer, eos_token_ids(config.source, tokenizer), assemble_outputs)
        # What start-up made (torch, the model, the tokenizer: half a million objects) lives as long as the engine;
        # frozen, the collector's full passes skip it. Unfrozen, each of them traversed it all: with logprobs,
        # whose objects set them off every few dozen steps, collect() took 3.4..4.7 ms a 256-row step on the CPU,
        # 2.1 frozen (0.85 without logprobs).
        gc.freeze()
        return engine

    @property
    def runner(self):
        """Rank 0's model runner."""
        return self.executor.runner

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ----- requests ---------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt | ProcessedPrompt, params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        """Queue a request; it joins the batch at the next step. Checked first: nothing changes if it is bad."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__} {request_id!r}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already running; give each request its own id")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # again: a field may have changed since it was made
        if (params.stop_strings or params.bad_words) and self.tokenizer is None:
            raise ValueError("stop strings and bad_words need a tokenizer; this model has none")
        prompt = self.inputs.process(prompt, params.truncate_prompt_tokens)
        bad_words = self.bad_word_ids(params.bad_words or [])
        new_matcher = self.compile_grammar(params) if params.structured_outputs is not None else None
        request = Request(request_id, prompt, params, [], RequestMetrics(arrival_time or time.time()))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(prompt.token_ids)
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.config.device).manual_seed(params.seed + index)
            seq = Sequence(prompt.token_ids, params, generator, self.max_model_len)
            seq.bad_words = bad_words
            if new_matcher is not None:
                seq.grammar = new_matcher()
            seq.wants_prompt_logprobs = index == 0 and params.prompt_logprobs is not None
            streams = params.output_kind != RequestOutputKind.FINAL_ONLY and params.detokenize
            if self.tokenizer is not None and (streams or params.stop_strings):
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, params)
            request.seqs.append(seq)
            self.request_of[seq.seq_id] = request
            self.scheduler.add(seq)
        self.requests[request_id] = request
        if self.output_processor is not None:
            self.output_processor.add_request(request_id, prompt, params, request.metrics.arrival_time)

    def compile_grammar(self, params: SamplingParams) -> "Callable[[], GrammarMatcher]":
        """The request's grammar, compiled (once per distinct one), as a maker of one matcher a completion; a
        ValueError when it cannot be compiled."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer; this model has none")
        # only now: it imports xgrammar, half a second that requests without structured outputs need not wait
        from minivllm.structured_outputs import GrammarCompiler, GrammarMatcher

        if self.grammar_compiler is None:
            self.grammar_compiler = GrammarCompiler(self.tokenizer, self.config.source.config.vocab_size,
                                                    stop_token_ids=self.eos_ids)
        compiled = self.grammar_compiler.compile(params.structured_outputs)
        return functools.partial(GrammarMatcher, compiled)

    def bad_word_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's tokens, alone and after a space, as vLLM bans them."""
        variants = {tuple(self.tokenizer.encode(text, add_special_tokens=False))
                    for word in words for text in (word, " " + word.lstrip())}
        return [list(ids) for ids in variants if ids]

    def abort_request(self, request_id: str | list[str]) -> None:
        """Stop requests now and free their KV blocks; each is reported once more, by the next step(), with
        finish_reason "abort". An id that is not running (unknown, finished, aborted) is let be. That last output
        carries the id: a front end that reuses ids at once should make its own engine ids unique (AsyncLLM does)."""
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            for seq in request.seqs:
                if not seq.is_finished:
                    # blocks that a step scheduled but never ran (it raised) published: they hold no K/V
                    self.scheduler.block_manager.unpublish_uncomputed(seq)
                    self.finish(seq, "abort", None)
            request.metrics.finished_time = time.time()
            self.aborted.append(self.delta(request))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests or self.aborted)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ----- stepping ---------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Launch the next batch, if one can run, and collect the tokens of the step before it (of this one,
        without async scheduling): the outputs of the requests that progressed, aborted ones included."""
        return self.output_processor.process(self.step_deltas())

    def step_deltas(self) -> list[RequestDelta]:
        """As step(), the progress of the requests as deltas (what is new since each one's last report), which
        OutputProcessor makes into RequestOutputs."""
        deltas, self.aborted = self.aborted, []
        batch = self.scheduler.schedule() if self.scheduler.has_unfinished else None
        if batch is not None:
            previous = self.in_flight[-1].seqs if self.in_flight else []
            vocab_size = self.config.source.config.vocab_size
            message = build_step(batch, previous, self.eos_ids, vocab_size, self.penalty_slots)
            launched = self.executor.execute(message)
            prompt_rows = [(batch.seqs[row], batch.seqs[row].num_computed_tokens, len(targets), k)
                           for row, k, targets in message.prompt_logprobs]
            self.in_flight.append(InFlight([seq for seq in batch.seqs if seq.samples_this_step], launched, prompt_rows))
            if batch.is_prefill:
                self.stats.prompt_tokens += batch.num_tokens
            for seq in batch.seqs:
                seq.num_pending_tokens += seq.samples_this_step
                seq.num_computed_tokens += seq.num_scheduled_tokens
                seq.num_scheduled_tokens = 0
        if not self.in_flight or (batch is not None and len(self.in_flight) <= self.overlap):
            return deltas
        return deltas + self.collect(self.in_flight.popleft())

    def collect(self, step: InFlight) -> list[RequestDelta]:
        """Take a step's tokens (waiting for it on the GPU) into its sequences; the deltas due."""
        progressed: dict[str, Request] = {}
        tokens = step.launched.token_ids()
        logprobs = step.launched.logprobs()
        if logprobs is not None:
            self.decode_tokens(itertools.chain.from_iterable(logprobs[0]))
        if step.prompt_rows:
            self.add_prompt_logprobs(step.prompt_rows, step.launched.prompt_logprobs())
        for row, (seq, token) in enumerate(zip(step.seqs, tokens)):
            seq.num_pending_tokens -= 1
            if seq.is_finished:
                continue  # it stopped on its previous token, or was aborted: this one is from a step too many
            self.stats.generation_tokens += 1
            request = self.request_of[seq.seq_id]
            progressed[request.request_id] = request
            if seq.params.logprobs is not None:
                self.add_logprobs(seq, row, logprobs)
            self.append_token(seq, token, request.metrics)
        deltas = []
        for request in progressed.values():
            finished = request.finished
            if finished:
                request.metrics.finished_time = time.time()
                del self.requests[request.request_id]
            if finished or request.params.output_kind != RequestOutputKind.FINAL_ONLY:
                deltas.append(self.delta(request))
        return deltas

    def add_logprobs(self, seq: Sequence, row: int, logprobs: tuple[list, ...]) -> None:
        ids, values, ranks = logprobs  # per row: the sampled token then the top k of the widest ask (SamplerOutput)
        ids, values, width = ids[row], values[row], seq.params.logprobs + 1
        if width < len(ids):
            ids, values = ids[:width], values[:width]
        seq.logprobs.append(ids, values, ranks[row], list(map(self.decoded.__getitem__, ids)))
        seq.cumulative_logprob += values[0]

    def add_prompt_logprobs(self, rows: list[tuple[Sequence, int, int, int]], columns: tuple[list, ...]) -> None:
        """Fill the requests' prompt logprobs from ModelRunner.prompt_logprobs' flat columns: a position's next
        prompt token then its top k (ids, logprobs), and that token's rank."""
        ids, logprobs, ranks = columns
        self.decode_tokens(ids)
        decoded = list(map(self.decoded.__getitem__, ids))
        flat = done = 0  # into ids and logprobs; into ranks, one a position
        for seq, start, count, k in rows:
            request = self.request_of.get(seq.seq_id)
            for i in range(count):
                position = start + i + 1  # these logits give the logprob of the next prompt token
                if request is not None and position < seq.num_prompt_tokens:
                    request.prompt_logprobs[position] = position_logprobs(ids, logprobs, decoded, flat + i * (k + 1),
                                                                          k, ranks[done + i])
            flat, done = flat + count * (k + 1), done + count

    def decode_tokens(self, token_ids: Iterable[int]) -> None:
        """Decode each token id not seen before alone (a logprob's decoded_token), all in one call to the
        tokenizer's backend: a logprobs step of 256 rows names up to 1,536 ids, and the tokenizer's own decode
        costs about 9 us a call in Python (without a tokenizer there is no text: decoded stays None)."""
        if self.tokenizer is None:
            return
        decoded = self.decoded
        missing = list({t for t in token_ids if decoded[t] is None})
        if not missing:
            return
        if self.tokenizer.clean_up_tokenization_spaces:  # a clean-up only the tokenizer's decode applies
            texts = [self.tokenizer.decode([t]) for t in missing]
        else:
            texts = self.tokenizer.backend_tokenizer.decode_batch([[t] for t in missing], skip_special_tokens=False)
        for token, text in zip(missing, texts):
            decoded[token] = text

    def append_token(self, seq: Sequence, token: int, metrics: RequestMetrics) -> None:
        """Add a sampled token and apply every stop condition."""
        seq.append_token(token)
        self.scheduler.block_manager.token_arrived(seq)
        if metrics.first_token_time is None:
            metrics.first_token_time = time.time()
        params = seq.params
        if seq.grammar is not None:
            seq.grammar.accept(token)  # the mask allowed only what it accepts
            if seq.grammar.is_terminated():  # it took a stop token: the output is complete
                return self.finish(seq, "stop", None if token in self.eos_ids else token)
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return self.finish(seq, "stop", token)
            if not params.ignore_eos and token in self.eos_ids:
                return self.finish(seq, "stop", None)
        if seq.detokenizer is not None:
            stop = seq.detokenizer.add(token, seq.num_output_tokens)
            if stop is not None:
                return self.finish(seq, "stop", stop)
        if len(seq.token_ids) >= seq.max_len:  # max_tokens, or max_model_len
            self.finish(seq, "length", None)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None) -> None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.scheduler.finish(seq)
        self.penalty_slots.release(seq)
        del self.request_of[seq.seq_id]

    # ----- outputs ----------------------------------------------------------------------------------------
    def delta(self, request: Request) -> RequestDelta:
        """What is new in the request since its last report (everything, at a FINAL_ONLY request's only one)."""
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.prompt_logprobs_reported:
            if all(entry is not None for entry in request.prompt_logprobs[1:]):
                prompt_logprobs, request.prompt_logprobs_reported = request.prompt_logprobs, True
        metrics = request.metrics
        return (request.request_id, request.finished, metrics.first_token_time, metrics.finished_time,
                request.seqs[0].num_cached_tokens or 0, prompt_logprobs, list(map(self.completion_delta, request.seqs)))

    def completion_delta(self, seq: Sequence) -> CompletionDelta:
        # only what is new is sliced: copying a whole output each step is quadratic in its length
        text = self.text_of(seq)[seq.num_reported_chars :]
        reported = seq.num_reported_tokens
        token_ids = seq.token_ids[seq.num_prompt_tokens + reported :]
        logprobs = seq.logprobs
        if logprobs is not None and (reported or not seq.is_finished):  # whole and complete: no copy needed
            logprobs = logprobs[reported:]
        seq.num_reported_chars += len(text)
        seq.num_reported_tokens += len(token_ids)
        return (token_ids, text, logprobs, seq.cumulative_logprob if logprobs is not None else None,
                seq.finish_reason, seq.stop_reason)

    def text_of(self, seq: Sequence) -> str:
        params = seq.params
        if self.tokenizer is None or not params.detokenize:
            return ""
        if seq.detokenizer is not None and (isinstance(seq.stop_reason, str) or not seq.is_finished):
            if not seq.is_finished:
                return seq.detokenizer.streamed_text()
            # cut before the stop string, which the output may keep
            return seq.detokenizer.text + (seq.stop_reason if params.include_stop_str_in_output else "")
        ids = seq.output_token_ids
        if seq.finish_reason == "stop" and not params.include_stop_str_in_output:
            ids = ids[:-1]  # as vLLM, the eos or stop id that ended it is in token_ids but not in the text
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
