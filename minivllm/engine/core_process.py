"""The engine core: a process of its own that owns an LLMEngine, for AsyncLLM (vLLM v1's EngineCoreProc).

The front end (the server's event loop, tokenizing, JSON, HTTP) then never holds the engine's GIL: the engine
schedules and launches its steps as fast as it would offline. The core loops: apply the commands that arrived
(a list of them per message), step, send one message per step with its requests' deltas (what each gained, as
plain tuples: the front end makes the RequestOutputs) and the engine's readings.
It starts its own tensor-parallel workers, so it cannot be daemonic; it ends when told to, or when the front end
goes (its command pipe reaches EOF), so no orphan keeps holding the GPU.
"""

import fcntl
import pickle
import signal
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

import torch

from minivllm.config import EngineArgs
from minivllm.engine.llm_engine import EngineStats, LLMEngine
from minivllm.engine.output_processor import RequestDelta
from minivllm.inputs import ProcessedPrompt
from minivllm.sampling_params import SamplingParams

# A step's deltas for 256 requests pickle to about 13 KB without logprobs, 48 KB with 5 (a prompt's logprobs
# more): a pipe of Linux's default 64 KB would make the engine wait for the front end to read such steps; 1 MB
# (Linux's default limit for users) holds several.
PIPE_BYTES = 1 << 20


# ----- front end -> core -----------------------------------------------------------------------------------------
@dataclass
class AddRequest:
    engine_id: str
    prompt: ProcessedPrompt  # checked and tokenized by the front end
    params: SamplingParams
    arrival_time: float


@dataclass
class AbortRequests:
    engine_ids: list[str]


@dataclass
class Shutdown:
    pass


Command = AddRequest | AbortRequests | Shutdown


# ----- core -> front end -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineReadings:
    """What the server reads about the engine (its /metrics), as of the end of a step."""

    num_running_seqs: int = 0  # in the running batch (a request with n > 1 counts n)
    num_waiting_seqs: int = 0  # waiting to be scheduled, preempted ones included
    kv_cache_usage: float = 0.0  # the fraction of KV-cache blocks that sequences hold
    stats: EngineStats = field(default_factory=EngineStats)

    @classmethod
    def of(cls, engine: LLMEngine) -> "EngineReadings":
        scheduler = engine.scheduler
        usage = 1.0 - scheduler.block_manager.num_free_blocks / engine.runner.num_kv_blocks
        return cls(len(scheduler.running), len(scheduler.waiting), usage, replace(engine.stats))


@dataclass
class StepOutputs:
    """One step's deltas (by engine id), the requests refused when they were added, and the readings after it.
    The first message of a core that started is one with no deltas."""

    deltas: list[RequestDelta]
    refused: list[tuple[str, Exception]]  # (engine id, why): a grammar that does not compile, say
    readings: EngineReadings


@dataclass
class CoreFailure:
    """The core stopped on an error (at start-up or in a step): the error and its traceback in the core."""

    error: BaseException
    traceback: str

    @classmethod
    def of(cls, error: BaseException) -> "CoreFailure":
        text = "".join(traceback.format_exception(error))
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:  # noqa: BLE001 - an error whose class cannot cross the pipe goes as its text
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return cls(error, text)


# ----- the process -------------------------------------------------------------------------------------------------
def run_engine_core(args: EngineArgs, num_threads: int, commands: Connection, outputs: Connection) -> None:
    """The core process's body: build the engine (a failure goes back as a CoreFailure), then serve commands."""
    # Ctrl-C in a terminal reaches the whole process group; the front end decides when the core stops
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(num_threads)  # as the front end's process chose (one, in the CPU tests)
    try:
        fcntl.fcntl(outputs.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass  # a lower limit on this machine: the default pipe still works, the engine waits a little more often
    engine = None
    try:
        engine = LLMEngine.from_engine_args(args, assemble_outputs=False)  # the front end makes the outputs
        outputs.send(StepOutputs([], [], EngineReadings.of(engine)))
        EngineCore(engine, commands, outputs).run()
    except BaseException as error:  # whatever it is, the front end must hear of it
        try:
            outputs.send(CoreFailure.of(error))
        except OSError:
            pass  # the front end has gone
    finally:
        if engine is not None:
            engine.shutdown()  # the tensor-parallel workers too


class EngineCore:
    def __init__(self, engine: LLMEngine, commands: Connection, outputs: Connection):
        self.engine, self.commands, self.outputs = engine, commands, outputs
        self.refused: list[tuple[str, Exception]] = []

    def run(self) -> None:
        """Apply commands, then step while there is work; sleep on the command pipe while there is none."""
        engine = self.engine
        while self.apply_commands(wait=not engine.has_unfinished_requests()):
            stepped = engine.has_unfinished_requests()
            deltas = engine.step_deltas() if stepped else []
            if stepped or self.refused:
                self.outputs.send(StepOutputs(deltas, self.refused, EngineReadings.of(engine)))
                self.refused = []

    def apply_commands(self, wait: bool) -> bool:
        """Every command that arrived, first waiting for one if wait; False once told to stop or the front end
        has gone (EOF: the pipe's other end closed with its process)."""
        try:
            if not wait and not self.commands.poll():
                return True
            while True:
                for command in self.commands.recv():
                    if isinstance(command, Shutdown):
                        return False
                    self.apply(command)
                if not self.commands.poll():
                    return True
        except EOFError:
            return False

    def apply(self, command: Command) -> None:
        if isinstance(command, AddRequest):
            try:
                self.engine.add_request(command.engine_id, command.prompt, command.params, command.arrival_time)
            except (ValueError, TypeError) as error:  # this request alone is bad
                self.refused.append((command.engine_id, error))
        else:
            self.engine.abort_request(command.engine_ids)
