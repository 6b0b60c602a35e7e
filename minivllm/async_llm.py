"""AsyncLLM: many concurrent streaming requests over one LLMEngine, for asyncio code (the server).

The engine is not thread-safe and its steps wait on the GPU, so one background thread owns it. Callers, on any
event loop, check their request in their own thread and send the engine thread commands through a thread-safe
queue, which it drains between steps (and sleeps on when idle); it hands each request's outputs to that request's
asyncio.Queue with loop.call_soon_threadsafe. The event loop never waits on a step.
"""

import asyncio
import dataclasses
import itertools
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from types import TracebackType

from transformers import PreTrainedTokenizerBase

from minivllm.config import EngineArgs, refuse_vllm_only
from minivllm.engine.llm_engine import EngineStats, LLMEngine
from minivllm.inputs import ProcessedPrompt, Prompt
from minivllm.outputs import RequestOutput
from minivllm.sampling_params import SamplingParams


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (it raised, or shutdown() was called): no request can run on it any more."""


@dataclass(eq=False)
class RequestStream:
    """One request's way back to its caller: the caller's event loop and the queue its generator reads."""

    request_id: str  # the caller's
    # unique for the engine's lifetime, so that a request_id reused at once never gets the old request's last output
    engine_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> bool:
        """Hand item to the caller's loop, from any thread; False if that loop has closed."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed while its request still ran (e.g. a script ended mid-stream)
            return False
        return True


class AsyncLLM:
    def __init__(self, model: str, **kwargs):
        """The model and, by keyword, LLM's other arguments (EngineArgs' fields); vLLM's arguments minivllm lacks
        are refused as LLM refuses them."""
        fields = {f.name for f in dataclasses.fields(EngineArgs)}
        refuse_vllm_only("LLM", {k: v for k, v in kwargs.items() if k not in fields},
                         known="see help(minivllm.LLM) for the arguments minivllm takes")
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **kwargs), stacklevel=2)
        self._commands: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()  # None: stop
        self._lock = threading.Lock()  # callers registering streams against the engine thread failing them
        self._streams: dict[str, RequestStream] = {}  # by the caller's id: the callers' side, under the lock
        self._routes: dict[str, RequestStream] = {}  # by engine id: the engine thread's side
        self._engine_ids = itertools.count()
        self._error: BaseException | None = None  # why the loop stopped
        self._error_traceback: TracebackType | None = None
        self._thread = threading.Thread(target=self._run, name="minivllm-engine", daemon=True)
        self._thread.start()

    # ----- what a server reads (cheap, from any thread) -------------------------------------------------------
    @property
    def tokenizer(self) -> PreTrainedTokenizerBase | None:
        return self.llm_engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.llm_engine.max_model_len

    @property
    def num_running_seqs(self) -> int:
        """Sequences in the running batch (a request with n > 1 counts n)."""
        return len(self.llm_engine.scheduler.running)

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences waiting to be scheduled, preempted ones included."""
        return len(self.llm_engine.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of KV-cache blocks that running sequences hold (cached blocks nobody holds are free)."""
        return 1.0 - self.llm_engine.scheduler.block_manager.num_free_blocks / self.llm_engine.runner.num_kv_blocks

    @property
    def stats(self) -> EngineStats:
        """A copy of the engine's token totals."""
        return replace(self.llm_engine.stats)

    @property
    def is_running(self) -> bool:
        """False once the engine loop has failed or been shut down (a health check)."""
        return self._error is None

    # ----- requests (the caller's side) -----------------------------------------------------------------------
    async def generate(self, prompt: Prompt, sampling_params: SamplingParams,
                       request_id: str) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs as its tokens arrive, as sampling_params.output_kind asks (cumulative by default).
        A bad request raises here before anything is queued. Leaving early aborts the request: aclose() or
        cancelling the task at once, a break when asyncio finalizes the generator (on the loop's next turns).
        A failure of the engine loop is raised here."""
        stream = self._open(prompt, sampling_params, request_id)
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    # as asyncio.Future does: each generator re-raises the shared error from the engine thread's
                    # traceback, not from the last generator's
                    raise item.with_traceback(self._error_traceback)
                finished = item.finished
                yield item
        finally:
            with self._lock:
                del self._streams[request_id]
            if not finished:
                self._commands.put(partial(self._abort, stream, detach=True))

    async def abort(self, request_id: str | list[str]) -> None:
        """Stop requests and free their blocks; each one's generator yields a last output with finish_reason
        "abort" and ends. Ids not running are let be."""
        with self._lock:
            streams = [self._streams.get(rid) for rid in ([request_id] if isinstance(request_id, str) else request_id)]
        for stream in filter(None, streams):
            self._commands.put(partial(self._abort, stream, detach=False))

    def _open(self, prompt: Prompt, params: SamplingParams, request_id: str) -> RequestStream:
        """Check the request here, in the caller, then queue it for the engine thread."""
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__} {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        processed = self.llm_engine.inputs.process(prompt, params.truncate_prompt_tokens)
        arrival_time, loop = time.time(), asyncio.get_running_loop()
        with self._lock:
            if self._error is not None:
                message = f"the engine loop has stopped ({self._error!r}); start a new AsyncLLM"
                raise EngineDeadError(message) from self._error
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running; give each request its own id")
            stream = RequestStream(request_id, f"{request_id}#{next(self._engine_ids)}", loop)
            self._streams[request_id] = stream
        self._commands.put(partial(self._add, stream, processed, params, arrival_time))
        return stream

    def shutdown(self) -> None:
        """Stop the engine thread (after its current step) and the engine's workers; pending generators raise
        EngineDeadError. Idempotent, and it works after the engine loop has failed."""
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join()
        if self._error is None:
            self._fail(EngineDeadError("AsyncLLM was shut down"))
        self.llm_engine.shutdown()

    # ----- the engine thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        """Apply the callers' commands, then step while there is work; sleep on the queue while there is none."""
        try:
            while self._apply_commands(wait=not self.llm_engine.has_unfinished_requests()):
                for output in self.llm_engine.step():
                    self._dispatch(output)
        except BaseException as error:  # every pending generator must hear of it, whatever it is
            self._fail(error)

    def _apply_commands(self, wait: bool) -> bool:
        """Run every queued command, first waiting for one if wait; False once shutdown() asked to stop."""
        try:
            command = self._commands.get(block=wait)
            while command is not None:
                command()
                command = self._commands.get_nowait()
        except queue.Empty:
            return True
        return False

    def _add(self, stream: RequestStream, prompt: ProcessedPrompt, params: SamplingParams,
             arrival_time: float) -> None:
        try:
            self.llm_engine.add_request(stream.engine_id, prompt, params, arrival_time)
        except (ValueError, TypeError) as error:  # this request alone is bad (its grammar does not compile)
            stream.put(error)
            return
        self._routes[stream.engine_id] = stream

    def _abort(self, stream: RequestStream, detach: bool) -> None:
        """Abort the request (its blocks are free now); detach: its caller has gone, so drop its last output."""
        self.llm_engine.abort_request(stream.engine_id)
        if detach:
            self._routes.pop(stream.engine_id, None)

    def _dispatch(self, output: RequestOutput) -> None:
        """Send an output to its request's caller, under the caller's request id."""
        stream = self._routes.pop(output.request_id, None) if output.finished else self._routes.get(output.request_id)
        if stream is None:
            return  # its caller left, and the request was aborted
        output.request_id = stream.request_id
        if not stream.put(output):
            self._abort(stream, detach=True)

    def _fail(self, error: BaseException) -> None:
        """Fail every pending generator with error, and every later generate() with EngineDeadError."""
        with self._lock:
            self._error, self._error_traceback = error, error.__traceback__
            streams = list(self._streams.values())
        for stream in streams:
            stream.put(error)
