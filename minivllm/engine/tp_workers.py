"""Tensor parallelism's processes and control plane: rank 0 is the engine's own process; ranks 1..N-1 are
spawned here, one a GPU.

Rank 0 owns the scheduler. Before each step it sends the step message to the other ranks over a gloo
control group, and every rank runs the same step on its slice of the model and its own KV cache. The
runner on each rank knows nothing of this: the worker loop below and rank 0's WorkerGroup drive it.

A rank that fails must not leave the others waiting in a collective forever. Workers report their
exceptions on a queue; rank 0 checks that queue and the workers' liveness before each step and at each
start-up stage, and when a step breaks (gloo notices a peer that exited) it raises the failed rank's own
error and stops the group. The groups' timeouts are the last resort (an NCCL peer that dies mid-step).
"""

import os
import queue
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minivllm.config import EngineConfig
from minivllm.distributed import TensorParallel, check_shardable, init_tensor_parallel, leave_tensor_parallel
from minivllm.engine.model_runner import LaunchedStep, ModelRunner, rank_device, release_graphs
from minivllm.engine.step_message import StepMessage

HOST = "127.0.0.1"
POLL_SECONDS = 0.2
FAILURE_REPORT_WAIT = 5.0  # after a step broke, how long rank 0 waits for the failed rank's report
STOP_WAIT = 10.0  # how long a worker gets to leave the group before it is terminated
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)  # also how far a worker may lag rank 0 at a start-up stage
# The control group waits for the next step, which may come any time later (an idle engine), so it must not
# time out.
CONTROL_GROUP_TIMEOUT = timedelta(days=365)


class TensorParallelError(RuntimeError):
    """The tensor-parallel group has stopped (a rank failed, or the LLM was shut down): the LLM cannot run."""


@dataclass
class ControlGroup:
    """The ranks' gloo group outside the model: step messages from rank 0, and agreeing on the KV cache's size."""

    group: dist.ProcessGroup

    def broadcast(self, obj: Any = None) -> Any:
        """rank 0's obj on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def min(self, value: int) -> int:
        tensor = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(tensor, dist.ReduceOp.MIN, group=self.group)
        return int(tensor.item())


def join_group(rank: int, config: EngineConfig, store: dist.Store) -> tuple[TensorParallel, ControlGroup]:
    size, device = config.args.tensor_parallel_size, rank_device(config.device, rank)
    tp = init_tensor_parallel(rank, size, device, store, config.args.tp_invariant)
    return tp, ControlGroup(dist.new_group(backend="gloo", timeout=CONTROL_GROUP_TIMEOUT))


# ----- ranks 1..N-1 ------------------------------------------------------------------------------------------
def run_worker(rank: int, config: EngineConfig, port: int, num_threads: int, reports: mp.Queue) -> None:
    """A rank other than 0: build its part of the model, then run every step rank 0 sends until told to stop."""
    try:
        device = rank_device(config.device, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:
            torch.set_num_threads(num_threads)  # as rank 0's process chose
        reports.put(("started", rank, None))
        store = dist.TCPStore(HOST, port, config.args.tensor_parallel_size, is_master=False,
                              timeout=RENDEZVOUS_TIMEOUT)
        tp, control = join_group(rank, config, store)
        runner = ModelRunner(config, tp)
        reports.put(("weights loaded", rank, None))
        runner.init_kv_cache(control.min(runner.available_kv_blocks()))  # one block table serves every rank
        while (step := control.broadcast()) is not None:
            runner.execute(step)
        release_graphs(runner.captured_graphs)
    except BaseException as error:
        reports.put(("failed", rank, f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}"))
        raise SystemExit(1) from None  # not leave_tensor_parallel(): it could wait on the broken group
    leave_tensor_parallel()
    # The interpreter's own teardown (the CUDA context, torch.compile's worker pool) took seconds and
    # LLM.shutdown() waits for it. The group is left: flush what rank 0 may still read, and go.
    reports.close()
    reports.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ----- rank 0 ------------------------------------------------------------------------------------------------
def start_tensor_parallel(config: EngineConfig) -> "WorkerGroup":
    """Spawn ranks 1..N-1 and build rank 0's runner; every rank has its model and KV cache when this returns."""
    check_shardable(config.source.config, config.args.tensor_parallel_size)
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group: an LLM with tensor_parallel_size > 1 is "
            "still alive here; call its shutdown() before making another"
        )
    workers = WorkerGroup(config)
    try:
        workers.start()
        return workers
    except BaseException:
        workers.shutdown()
        raise


class WorkerGroup:
    """Ranks 1..N-1 seen from rank 0, with rank 0's own runner: starts them, sends them each step and runs it,
    notices when one fails, stops them."""

    def __init__(self, config: EngineConfig):
        self.config = config
        size = config.args.tensor_parallel_size
        self.store = dist.TCPStore(HOST, 0, size, is_master=True, wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT)
        context = mp.get_context("spawn")
        self.reports = context.Queue()
        self.processes = [
            context.Process(
                target=run_worker, name=f"minivllm-tp-rank{rank}", daemon=True,
                args=(rank, config, self.store.port, torch.get_num_threads(), self.reports),
            )
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        self.stopped: str | None = None  # why the group can no longer run, once it cannot
        self._finalizer = weakref.finalize(self, stop_workers, self.processes, None, [])

    def start(self) -> None:
        """Join the group once every worker is up, build rank 0's runner and agree on the KV cache's size."""
        self.reached("started")
        tp, self.control = join_group(0, self.config, self.store)
        self.runner = ModelRunner(self.config, tp)
        # stopping now tells the workers first, over the control group, after destroying rank 0's decode graphs
        # (see release_graphs)
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, stop_workers, self.processes, self.control.group,
                                          self.runner.captured_graphs)
        self.reached("weights loaded")
        num_blocks = self.guarded(self.control.min, self.runner.available_kv_blocks())
        self.guarded(self.runner.init_kv_cache, self.config.check_kv_capacity(num_blocks))

    def execute(self, step: StepMessage) -> LaunchedStep:
        """Send the step to the other ranks and run rank 0's part of it."""
        self.check()
        self.guarded(self.control.broadcast, step.for_other_ranks())
        return self.guarded(self.runner.execute, step)

    def guarded(self, work, *args):
        """work(*args); when it breaks (a peer died mid-collective), the failed rank's error instead."""
        try:
            return work(*args)
        except RuntimeError as error:
            raise self.failure(error) from error

    def reached(self, stage: str) -> None:
        """Wait until every worker reports `stage`; raise the first failure instead."""
        waiting = set(range(1, self.config.args.tensor_parallel_size))
        deadline = time.monotonic() + RENDEZVOUS_TIMEOUT.total_seconds()
        while waiting:
            try:
                what, rank, report = self.reports.get(timeout=POLL_SECONDS)
            except queue.Empty:
                self.check()
                if time.monotonic() > deadline:
                    raise self.stop(min(waiting), f"it did not reach '{stage}' within {RENDEZVOUS_TIMEOUT}") from None
                continue
            if what == "failed":
                raise self.stop(rank, report)
            if what == stage:
                waiting.discard(rank)

    def check(self) -> None:
        """Raise if the group stopped, a worker reported a failure, or a worker died without one."""
        if self.stopped is not None:
            raise TensorParallelError(self.stopped)
        try:
            what, rank, report = self.reports.get_nowait()
        except queue.Empty:
            what = None
        if what == "failed":
            raise self.stop(rank, report)
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive():
                raise self.stop(rank, self.report_of(rank, FAILURE_REPORT_WAIT))

    def failure(self, error: BaseException) -> BaseException:
        """The error to raise on rank 0 when a step broke: the failed rank's own report if one comes."""
        try:
            what, rank, report = self.reports.get(timeout=FAILURE_REPORT_WAIT)
        except queue.Empty:  # no rank reports a failure: the group broke under rank 0 itself
            self.stopped = f"a collective failed on rank 0: {error}"
            self.shutdown()
            return error
        return self.stop(rank, report if what == "failed" else f"{error}")

    def report_of(self, rank: int, wait: float) -> str:
        """The failure report of a worker that exited (it may still be on its way), else its exit code."""
        try:
            what, reporter, report = self.reports.get(timeout=wait)
            if what == "failed":
                return report if reporter == rank else f"(rank {reporter}) {report}"
        except queue.Empty:
            pass
        return f"the process exited with code {self.processes[rank - 1].exitcode} without a report"

    def stop(self, rank: int, report: str) -> TensorParallelError:
        self.stopped = f"tensor-parallel rank {rank} failed: {report}"
        self.shutdown()
        return TensorParallelError(f"{self.stopped}\nThe tensor-parallel group has stopped; make a new LLM.")

    def shutdown(self) -> None:
        """Stop every worker and leave the group (idempotent)."""
        self._finalizer()
        self.stopped = self.stopped or "the LLM was shut down"


def stop_workers(
    processes: list[mp.Process], control: dist.ProcessGroup | None, graphs: list[torch.cuda.CUDAGraph]
) -> None:
    """Tell the workers to stop (over the control group, when all are alive to hear it), then make sure. Rank 0's
    graphs go first: while they live, leaving the NCCL group would wait for ever."""
    release_graphs(graphs)
    if control is not None and all(p.is_alive() for p in processes):
        try:
            dist.broadcast_object_list([None], src=0, group=control)
        except RuntimeError:
            pass  # a worker died meanwhile: terminated below, and rank 0 leaves alone
        else:
            leave_tensor_parallel()  # with the workers, which leave on hearing None: NCCL's shutdown is collective
    for process in processes:
        process.join(timeout=STOP_WAIT)
        if process.is_alive():
            process.terminate()
            process.join(timeout=STOP_WAIT)
        if process.is_alive():
            process.kill()
            process.join()
    if control is not None:  # rank 0 joined the group: leave it (if still in it), so that another LLM can make one
        leave_tensor_parallel(alone=True)
