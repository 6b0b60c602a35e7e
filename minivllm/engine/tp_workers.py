"""Tensor parallelism's processes: rank 0 is the LLM's own process; ranks 1..N-1 are spawned here, one a GPU.

Rank 0 owns the scheduler. Before each step it sends the step's batch to the other ranks over the gloo
control group (per sequence only what the runner reads: the tokens to compute, how many are cached, the
block table), and every rank runs the same forward on its slice of the model and its own KV cache.

A rank that fails must not leave the others waiting in a collective forever. Workers report their
exceptions on a queue; rank 0 checks that queue and the workers' liveness before each step and at each
start-up stage, and when a collective breaks (gloo notices a peer that exited) it raises the failed rank's
own error and stops the group. The groups' timeouts are the last resort (an NCCL peer that dies mid-step).
"""

import copy
import os
import queue
import sys
import time
import traceback
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minivllm.config import EngineConfig
from minivllm.distributed import TensorParallel, check_shardable, init_tensor_parallel, leave_tensor_parallel
from minivllm.engine.model_runner import ModelRunner, release_graphs
from minivllm.engine.scheduler import ScheduledBatch
from minivllm.model_loader import ModelSource

HOST = "127.0.0.1"
POLL_SECONDS = 0.2
FAILURE_REPORT_WAIT = 5.0  # after a collective broke, how long rank 0 waits for the failed rank's report
STOP_WAIT = 10.0  # how long a worker gets to leave the group before it is terminated
RENDEZVOUS_TIMEOUT = timedelta(minutes=5)  # also how far a worker may lag rank 0 at a start-up stage


class TensorParallelError(RuntimeError):
    """The tensor-parallel group has stopped (a rank failed, or the LLM was shut down): the LLM cannot run."""


# ----- the step, as sent to the other ranks -----------------------------------------------------------------
def step_message(batch: ScheduledBatch) -> tuple[bool, list[tuple]]:
    """(is_prefill, per sequence: the known tokens computed this step, their start, how many are computed, the
    length, block table, whether it samples, its id, and how many of its tokens are still on the GPU)."""
    rows = []
    for seq in batch.seqs:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + seq.num_scheduled_tokens
        rows.append((seq.token_ids[start:end], start, seq.num_scheduled_tokens, len(seq), seq.block_table,
                     seq.samples_this_step, seq.seq_id, seq.num_pending_tokens))
    return batch.is_prefill, rows


class TokenWindow:
    """The tokens of a sequence from `start` on: all that a step reads (sending every token would grow with
    the sequence)."""

    def __init__(self, tokens: list[int], start: int, length: int):
        self.tokens, self.start, self.length = tokens, start, length

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            start, stop, _ = index.indices(self.length)
            return self.tokens[start - self.start : stop - self.start]
        return self.tokens[(index % self.length) - self.start]


class StepSequence:
    """What the model runner reads of a Sequence in one step, rebuilt on a rank other than 0. A token still on
    the GPU (async scheduling) is read from the previous step's tokens, which rank 0 broadcast."""

    def __init__(self, tokens: list[int], start: int, scheduled: int, length: int, block_table: list[int],
                 samples: bool, seq_id: int, pending: int):
        self.token_ids = TokenWindow(tokens, start, length - pending)
        self.num_computed_tokens, self.num_scheduled_tokens = start, scheduled
        self.block_table, self.samples_this_step, self.length = block_table, samples, length
        self.seq_id, self.num_pending_tokens = seq_id, pending

    def __len__(self) -> int:
        return self.length


def step_batch(message: tuple[bool, list[tuple]]) -> ScheduledBatch:
    is_prefill, rows = message
    return ScheduledBatch([StepSequence(*row) for row in rows], is_prefill)  # type: ignore[misc]


# ----- ranks 1..N-1 ------------------------------------------------------------------------------------------
class ReportToFirst:
    """A worker's side of the start-up stages: it tells rank 0 that it reached each one."""

    def __init__(self, reports: mp.Queue, rank: int):
        self.reports, self.rank = reports, rank

    def reached(self, stage: str) -> None:
        self.reports.put((stage, self.rank, None))

    def send_step(self, step) -> None:
        pass  # a worker received this step from rank 0

    def failure(self, error: BaseException) -> BaseException:
        return RuntimeError(f"the tensor-parallel group broke (rank 0 or another rank went away): {error}")


def run_worker(
    rank: int, config: EngineConfig, source: ModelSource, dtype: torch.dtype, port: int, num_threads: int,
    reports: mp.Queue,
) -> None:
    """A rank other than 0: build its part of the model, then run every step rank 0 sends until told to stop."""
    try:
        config = copy.copy(config)  # not dataclasses.replace: rank 0 checked it, for rank 0's device
        config.device = rank_device(config.device, rank)
        if config.device.type == "cuda":
            torch.cuda.set_device(config.device)
        else:
            torch.set_num_threads(num_threads)  # as rank 0's process chose
        peers = ReportToFirst(reports, rank)
        peers.reached("started")
        size = config.tensor_parallel_size
        store = dist.TCPStore(HOST, port, size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
        tp = init_tensor_parallel(rank, size, config.device, store, peers, config.tp_invariant)
        runner = ModelRunner(config, source, dtype, tp)
        previous = None  # the last step, whose tokens the next one may read
        while (message := tp.broadcast_from_first()) is not None:
            previous = runner.launch(step_batch(message), [], previous)
        release_graphs(runner.graphs)
    except BaseException as error:
        reports.put(("failed", rank, f"{type(error).__name__}: {error}\n\n{traceback.format_exc()}"))
        raise SystemExit(1) from None  # not leave_tensor_parallel(): it could wait on the broken group
    leave_tensor_parallel()
    # The interpreter's own teardown (the CUDA context, torch.compile's worker pool) took 2 to 10 s on H100 and
    # H200, and LLM.shutdown() waits for it. The group is left: flush what rank 0 may still read, and go.
    reports.close()
    reports.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on the r-th GPU from rank 0's (the CPU for all ranks on the CPU)."""
    return torch.device("cuda", device.index + rank) if device.type == "cuda" else device


# ----- rank 0 ------------------------------------------------------------------------------------------------
def start_tensor_parallel(
    config: EngineConfig, source: ModelSource, dtype: torch.dtype
) -> tuple[ModelRunner, "WorkerGroup"]:
    """Spawn ranks 1..N-1 and build rank 0's runner; every rank has its model and KV cache when this returns."""
    check_shardable(source.config, config.tensor_parallel_size)
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a tensor-parallel group: an LLM with tensor_parallel_size > 1 is "
            "still alive here; call its shutdown() before making another"
        )
    workers = WorkerGroup(config, source, dtype)
    try:
        tp = workers.join_group()
        runner = ModelRunner(config, source, dtype, tp)
        workers.keep_graphs(runner.graphs)
        return runner, workers
    except BaseException:
        workers.shutdown()
        raise


class WorkerGroup:
    """Ranks 1..N-1 seen from rank 0: starts them, sends them steps, notices when one fails, stops them."""

    def __init__(self, config: EngineConfig, source: ModelSource, dtype: torch.dtype):
        self.config = config
        self.store = dist.TCPStore(HOST, 0, config.tensor_parallel_size, is_master=True, wait_for_workers=False,
                                   timeout=RENDEZVOUS_TIMEOUT)
        context = mp.get_context("spawn")
        self.reports = context.Queue()
        self.processes = [
            context.Process(
                target=run_worker, name=f"minivllm-tp-rank{rank}", daemon=True,
                args=(rank, config, source, dtype, self.store.port, torch.get_num_threads(), self.reports),
            )
            for rank in range(1, config.tensor_parallel_size)
        ]
        for process in self.processes:
            process.start()
        self.stopped: str | None = None  # why the group can no longer run, once it cannot
        self.control: dist.ProcessGroup | None = None
        self._finalizer = weakref.finalize(self, stop_workers, self.processes, None, {})

    def join_group(self) -> TensorParallel:
        """Rank 0's place in the group, once every worker is up (a worker that died at start is reported)."""
        self.reached("started")
        tp = init_tensor_parallel(
            0, self.config.tensor_parallel_size, self.config.device, self.store, self, self.config.tp_invariant
        )
        self.control = tp.control
        self._finalizer.detach()  # stopping now tells the workers first, over the control group
        self._finalizer = weakref.finalize(self, stop_workers, self.processes, self.control, {})
        return tp

    def keep_graphs(self, graphs: dict[int, torch.cuda.CUDAGraph]) -> None:
        """Rank 0's decode graphs, which stopping destroys before rank 0 leaves the group (see release_graphs)."""
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, stop_workers, self.processes, self.control, graphs)

    def reached(self, stage: str) -> None:
        """Wait until every worker reports `stage`; raise the first failure instead."""
        waiting = set(range(1, self.config.tensor_parallel_size))
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

    def send_step(self, batch: ScheduledBatch) -> None:
        self.check()
        try:
            dist.broadcast_object_list([step_message(batch)], src=0, group=self.control)
        except RuntimeError as error:
            raise self.failure(error) from error

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
        """The error to raise on rank 0 when a collective broke: the failed rank's own report if one comes."""
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
    processes: list[mp.Process], control: dist.ProcessGroup | None, graphs: dict[int, torch.cuda.CUDAGraph]
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
