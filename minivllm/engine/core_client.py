"""The engine-core process seen from the front end: starts it (spawned, not forked: the CUDA context, the model
and the KV cache are the core's alone), sends it commands and receives each step's outputs, on two threads of its
own so that neither the caller nor the core ever waits on a pipe for the other.
"""

import multiprocessing
import queue
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.util import Finalize

import torch

from minivllm.config import EngineArgs
from minivllm.engine.core_process import Command, CoreFailure, Shutdown, StepOutputs, run_engine_core

STOP_WAIT = 10.0  # seconds the core gets to finish its step and stop before it is killed


class EngineDeadError(RuntimeError):
    """The engine has stopped (it raised, its process died, or it was shut down): no request can run on it any
    more."""


class CoreTraceback(Exception):
    """Where an error was raised in the core process (as the cause of the error re-raised here)."""

    def __str__(self) -> str:
        return f"\n\nIn the engine-core process:\n{self.args[0]}"


def core_error(failure: CoreFailure) -> BaseException:
    error = failure.error
    error.__cause__ = CoreTraceback(failure.traceback)
    return error


class EngineCoreClient:
    def __init__(self, args: EngineArgs, on_outputs: Callable[[StepOutputs], None],
                 on_exit: Callable[[BaseException | None], None]):
        """Start the core and wait until its engine is built; an error there (a bad checkpoint, a KV cache too
        small) is raised here as the core raised it. Then on_outputs gets every step's message, on the receiving
        thread; on_exit(error) is called there once, when the core has stopped (error None after shutdown())."""
        context = multiprocessing.get_context("spawn")
        core_commands, self._commands = context.Pipe(duplex=False)
        self._outputs, core_outputs = context.Pipe(duplex=False)
        self.process = context.Process(target=run_engine_core, name="minivllm-engine-core", daemon=False,
                                       args=(args, torch.get_num_threads(), core_commands, core_outputs))
        self.process.start()
        # the core holds these ends now; once ours are closed, EOF on a pipe means the other process has gone
        core_commands.close()
        core_outputs.close()
        # at exit (or when this client is collected), before multiprocessing joins its children: the core stops
        # on EOF, so an AsyncLLM never shut down cannot keep the interpreter from exiting
        self._finalizer = Finalize(self, stop_core, (self._commands, self.process), exitpriority=10)
        first = self._receive_one()
        if isinstance(first, CoreFailure):
            self._finalizer()
            raise core_error(first)
        self.initial_readings = first.readings
        self._stopping = False
        self._pending: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._on_outputs, self._on_exit = on_outputs, on_exit
        self._sender = threading.Thread(target=self._send, name="minivllm-core-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive, name="minivllm-core-receive", daemon=True)
        self._sender.start()
        self._receiver.start()

    def send(self, command: Command) -> None:
        """Queue a command for the core (from any thread; never blocks)."""
        self._pending.put(command)

    def shutdown(self) -> None:
        """Stop the core after its current step (killed if it does not within STOP_WAIT) and both threads."""
        if not self._stopping:
            self._stopping = True
            self._pending.put(Shutdown())
        self._sender.join(STOP_WAIT)
        self._finalizer()
        self._receiver.join()

    def _receive_one(self) -> StepOutputs | CoreFailure:
        try:
            return self._outputs.recv()
        except EOFError:  # it died without a word (killed, a crash in native code)
            self.process.join(STOP_WAIT)
            return CoreFailure(EngineDeadError(f"the engine-core process died (exit code {self.process.exitcode})"),
                               "")

    def _send(self) -> None:
        """Everything queued since the last message goes as one message (pickled once)."""
        while True:
            batch = [self._pending.get()]
            while not self._pending.empty():
                batch.append(self._pending.get_nowait())
            try:
                self._commands.send(batch)
            except OSError:
                return  # the core has gone: the receiver reports it
            if any(isinstance(command, Shutdown) for command in batch):
                return

    def _receive(self) -> None:
        """Hand every step's message to on_outputs until the core stops; then on_exit, once."""
        error: BaseException | None = None
        try:
            while not isinstance(message := self._receive_one(), CoreFailure):
                self._on_outputs(message)
            if not self._stopping:  # after shutdown() the core's EOF is no failure
                error = core_error(message)
        except BaseException as e:  # noqa: BLE001 - on_outputs failed: the front end cannot go on either
            error = e
        if error is not None:
            self._pending.put(Shutdown())  # the sender would wait for commands for ever
        self._on_exit(error)


def stop_core(commands: Connection, process: multiprocessing.Process) -> None:
    """Close the command pipe (the core stops at EOF after its step), then make sure it has stopped."""
    commands.close()
    process.join(STOP_WAIT)
    if process.is_alive():
        process.kill()
        process.join()
