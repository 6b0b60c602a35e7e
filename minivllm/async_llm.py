"""AsyncLLM: many concurrent streaming requests over one LLMEngine, for asyncio code (the server).

The engine runs in a process of its own (engine/core_process.py), so the callers' work (tokenizing, JSON, HTTP)
never holds the GIL the engine needs to launch its steps. Callers, on any event loop, check and tokenize their
request here, then it goes to the core as a command. Each step comes back as one message of the requests' deltas;
a thread here makes them into RequestOutputs (OutputProcessor) and hands each event loop its share of the step in
one call, and each request keeps one pending output: when its consumer lags, new outputs merge into it (deltas
concatenated), so a slow consumer costs neither the engine nor the loop any extra work per token.
"""

import asyncio
import dataclasses
import itertools
import threading
import time
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from minivllm.config import EngineArgs, EngineConfig, refuse_vllm_only
from minivllm.engine.core_client import EngineCoreClient, EngineDeadError
from minivllm.engine.core_process import AbortRequests, AddRequest, EngineReadings, StepOutputs
from minivllm.engine.llm_engine import EngineStats
from minivllm.engine.output_processor import OutputProcessor
from minivllm.inputs import InputProcessor, Prompt
from minivllm.model_loader import load_tokenizer
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass(eq=False)
class RequestStream:
    """One request's way back to its caller: the caller's loop, and the output its generator has not taken yet.
    Touched only on that loop."""

    request_id: str  # the caller's
    # unique for the engine's lifetime, so that a request_id reused at once never gets the old request's last output;
    # short, as it goes through the pipe twice a step (a server's request ids are 40 characters)
    engine_id: str
    loop: asyncio.AbstractEventLoop
    delta: bool  # outputs are deltas: merged by concatenation, not replaced
    pending: RequestOutput | BaseException | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, item: RequestOutput | BaseException) -> None:
        """Keep item for the generator: merged into the output it has not taken yet, if any (as vLLM's
        RequestOutputCollector); an error replaces anything."""
        if isinstance(self.pending, RequestOutput) and isinstance(item, RequestOutput):
            if self.delta:
                merge_delta(self.pending, item)
            else:
                self.pending = item  # cumulative: the newest says everything
        elif not isinstance(self.pending, BaseException):
            self.pending = item
        self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while self.pending is None:
            await self.ready.wait()
        item, self.pending = self.pending, None
        self.ready.clear()
        return item


def merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Append a later delta output to one not taken yet: text and token ids concatenated, logprobs appended, the
    newest finish reason and metrics."""
    completions = {c.index: c for c in into.outputs}
    for c in new.outputs:
        old = completions.get(c.index)
        if old is None:
            into.outputs.append(c)
            continue
        old.text += c.text
        old.token_ids.extend(c.token_ids)
        if c.logprobs is not None:
            old.logprobs = c.logprobs if old.logprobs is None else old.logprobs + c.logprobs
        old.cumulative_logprob, old.finish_reason, old.stop_reason = (c.cumulative_logprob, c.finish_reason,
                                                                      c.stop_reason)
    into.finished, into.metrics, into.num_cached_tokens = new.finished, new.metrics, new.num_cached_tokens
    if new.prompt_logprobs is not None:
        into.prompt_logprobs = new.prompt_logprobs


class AsyncLLM:
    def __init__(self, model: str, **kwargs):
        """The model and, by keyword, LLM's other arguments (EngineArgs' fields); vLLM's arguments minivllm lacks
        are refused as LLM refuses them. Returns once the engine process has built the engine; an error there is
        raised here (a ValueError for a KV cache too small, as LLM raises it)."""
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        refuse_vllm_only("LLM", {k: v for k, v in kwargs.items() if k not in fields},
                         known="see help(minivllm.LLM) for the arguments minivllm takes")
        args = EngineArgs(model=model, **kwargs)
        config = EngineConfig.resolve(args)  # a bad checkpoint fails here, before any process starts
        self._lock = threading.Lock()  # callers registering streams against the receiving thread failing them
        self._streams: dict[str, RequestStream] = {}  # by the caller's id, under the lock
        self._routes: dict[str, RequestStream] = {}  # by engine id: where the core's outputs go
        self._outputs = OutputProcessor()  # the core's deltas into RequestOutputs, on the receiving thread
        self._engine_ids = itertools.count()
        self._error: BaseException | None = None  # why the engine stopped
        # the engine's tokenizer and checks, for requests here
        self._tokenizer = load_tokenizer(config.source)
        self._inputs = InputProcessor(self._tokenizer, config.source.config.vocab_size, config.max_model_len)
        self._client = EngineCoreClient(args, self._route, self._stopped)
        self._readings: EngineReadings = self._client.initial_readings

    # ----- what a server reads (cheap, from any thread; as of the engine's last step) -------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._inputs.max_model_len

    @property
    def num_running_seqs(self) -> int:
        """Sequences in the running batch (a request with n > 1 counts n)."""
        return self._readings.num_running_seqs

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences waiting to be scheduled, preempted ones included."""
        return self._readings.num_waiting_seqs

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of KV-cache blocks that running sequences hold (cached blocks nobody holds are free)."""
        return self._readings.kv_cache_usage

    @property
    def stats(self) -> EngineStats:
        """The engine's token totals."""
        return self._readings.stats

    @property
    def is_running(self) -> bool:
        """False once the engine has failed or been shut down (a health check)."""
        return self._error is None

    # ----- requests (the caller's side) -----------------------------------------------------------------------
    async def generate(self, prompt: Prompt, sampling_params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs as its tokens arrive, as sampling_params.output_kind asks (cumulative by default);
        when the caller takes them slower than they come, the outputs it missed are merged into the next one.
        A bad request raises here before anything is queued. Leaving early aborts the request: aclose() or
        cancelling the task at once, a break when asyncio finalizes the generator (on the loop's next turns).
        A failure of the engine is raised here."""
        stream = self._open(prompt, sampling_params, request_id)
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item.with_traceback(None)  # shared by every generator: each raises it from here
                finished = item.finished
                yield item
        finally:
            with self._lock:
                del self._streams[request_id]
            if not finished:
                self._routes.pop(stream.engine_id, None)  # its caller has gone: its last output is dropped
                self._client.send(AbortRequests([stream.engine_id]))

    async def abort(self, request_id: str | list[str]) -> None:
        """Stop requests and free their blocks; each one's generator yields a last output with finish_reason
        "abort" and ends. Ids not running are let be."""
        with self._lock:
            streams = [self._streams.get(rid) for rid in ([request_id] if isinstance(request_id, str) else request_id)]
        engine_ids = [stream.engine_id for stream in streams if stream is not None]
        if engine_ids:
            self._client.send(AbortRequests(engine_ids))

    def _open(self, prompt: Prompt, params: SamplingParams, request_id: str) -> RequestStream:
        """Check the request here, in the caller, then send it to the core."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__} {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        processed = self._inputs.process(prompt, params.truncate_prompt_tokens)
        arrival_time, loop = time.time(), asyncio.get_running_loop()
        with self._lock:
            if self._error is not None:
                message = f"the engine has stopped ({self._error!r}); start a new AsyncLLM"
                raise EngineDeadError(message) from self._error
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running; give each request its own id")
            stream = RequestStream(request_id, str(next(self._engine_ids)), loop,
                                   params.output_kind == RequestOutputKind.DELTA)
            self._streams[request_id] = stream
        self._routes[stream.engine_id] = stream
        self._outputs.add_request(stream.engine_id, processed, params, arrival_time)
        self._client.send(AddRequest(stream.engine_id, processed, params, arrival_time))
        return stream

    def shutdown(self) -> None:
        """Stop the engine process (after its current step) and its workers; pending generators raise
        EngineDeadError. Idempotent, and it works after the engine has failed."""
        self._client.shutdown()

    # ----- the receiving thread -------------------------------------------------------------------------------
    def _route(self, step: StepOutputs) -> None:
        """One step's outputs to their callers, under the callers' ids: one call to each caller's loop."""
        self._readings = step.readings
        deliveries: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for output in self._outputs.process(step.deltas):
            stream = self._routes.pop(output.request_id, None) if output.finished else \
                self._routes.get(output.request_id)
            if stream is None:
                continue  # its caller left, and the request was aborted
            output.request_id = stream.request_id
            deliveries[stream.loop].append((stream, output))
        for engine_id, error in step.refused:
            self._outputs.discard(engine_id)
            stream = self._routes.pop(engine_id, None)
            if stream is not None:
                deliveries[stream.loop].append((stream, error))
        self._deliver(deliveries)

    def _deliver(self, deliveries: dict[asyncio.AbstractEventLoop, list]) -> None:
        for loop, items in deliveries.items():
            try:
                loop.call_soon_threadsafe(put_all, items)
            except RuntimeError:  # the loop closed while its requests still ran (e.g. a script ended mid-stream)
                for stream, _ in items:
                    if self._routes.pop(stream.engine_id, None) is not None:
                        self._client.send(AbortRequests([stream.engine_id]))

    def _stopped(self, error: BaseException | None) -> None:
        """The core has stopped: fail every pending generator with error, and every later generate() with
        EngineDeadError."""
        error = error or EngineDeadError("AsyncLLM was shut down")
        with self._lock:
            self._error = error
            streams = list(self._streams.values())
        deliveries: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for stream in streams:
            deliveries[stream.loop].append((stream, error))
        self._deliver(deliveries)


def put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    """On a caller's loop: a step's items for that loop's streams."""
    for stream, item in items:
        stream.put(item)
