"""`minivllm run-batch --replicas N`: the batch's lines spread over N Ray actors, each one engine (BatchRunner).

The lines go out in chunks, a few per replica, each to the next replica that is free, so a slow replica takes fewer.
A replica that dies is restarted by Ray and the chunk it held is run again (max_restarts, max_task_retries); one
lost for good has its chunk resubmitted to another. Each chunk's answers are taken once, when its task
returns, so every line is answered exactly once.
"""

import logging
import math
from collections import deque

from minivllm.entrypoints.run_batch import BatchRunner, custom_id_of, failed
from minivllm.ray.resources import replica_resources, require_ray

logger = logging.getLogger("minivllm")

MAX_RESTARTS = 3  # per replica: Ray restarts it and retries its chunk this many times
MAX_RESUBMITS = 2  # per chunk: resubmitted to another replica after its own is lost for good
SHUTDOWN_TIMEOUT_S = 30
CHUNKS_PER_REPLICA = 4  # fewer: bigger batches; more: less work lost with a replica, better balance


class BatchReplica:
    """One engine in a Ray actor."""

    def __init__(self, model: str, model_name: str, chat_template: str | None, engine_kwargs: dict):
        from minivllm.llm import LLM

        self.runner = BatchRunner(LLM(model, **engine_kwargs), model_name, chat_template)

    def answer(self, lines: list[str]) -> list[dict]:
        return self.runner.answer(lines)

    def shutdown(self) -> None:
        self.runner.llm.shutdown()  # its tensor-parallel ranks, which a kill would leave to notice on their own


def run_on_replicas(lines: list[str], num_replicas: int, model: str, model_name: str, chat_template: str | None,
                    engine_kwargs: dict, ray_address: str | None = None, replica_cls: type = BatchReplica,
                    chunk_size: int | None = None) -> list[dict]:
    """Every line's answer, in order. Joins the cluster at ray_address (None: starts a local one, or uses the
    one this process already joined), and leaves what it started."""
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False)
    try:
        return Dispatcher(ray, lines, num_replicas, chunk_size).run(
            replica_cls, (model, model_name, chat_template, engine_kwargs), engine_kwargs)
    finally:
        if started:
            ray.shutdown()


class Dispatcher:
    def __init__(self, ray, lines: list[str], num_replicas: int, chunk_size: int | None):
        self.ray, self.lines, self.num_replicas = ray, lines, num_replicas
        size = chunk_size or max(1, math.ceil(len(lines) / (num_replicas * CHUNKS_PER_REPLICA)))
        self.chunks = [range(start, min(start + size, len(lines))) for start in range(0, len(lines), size)]
        self.answers: list[dict | None] = [None] * len(lines)

    def run(self, replica_cls: type, args: tuple, engine_kwargs: dict) -> list[dict]:
        ray = self.ray
        device = engine_kwargs.get("device")
        if device is None and not ray.cluster_resources().get("GPU"):
            device = "cpu"  # the engine's own default then, and no GPUs asked for that the cluster lacks
        resources = replica_resources(engine_kwargs.get("tensor_parallel_size") or 1, device)
        actor_cls = ray.remote(replica_cls).options(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS,
                                                    **resources)
        free = deque(actor_cls.remote(*args) for _ in range(min(self.num_replicas, len(self.chunks))))
        todo = deque((k, 0) for k in range(len(self.chunks)))  # chunk, resubmissions so far
        running = {}  # task -> (actor, chunk, resubmissions)
        try:
            while todo or running:
                while todo and free:
                    actor, (k, tries) = free.popleft(), todo.popleft()
                    task = actor.answer.remote([self.lines[i] for i in self.chunks[k]])
                    running[task] = (actor, k, tries)
                if not running:  # every replica lost: what is left is answered as failed
                    for k, _ in todo:
                        self.fail(k, "replica_lost", "no replica is left to run this line")
                    break
                [task], _ = ray.wait(list(running), num_returns=1)
                actor, k, tries = running.pop(task)
                try:
                    answers = ray.get(task)
                except ray.exceptions.RayActorError as e:  # lost for good, after its restarts
                    logger.warning("run-batch: a replica was lost (%s); %d lines go to another", type(e).__name__,
                                   len(self.chunks[k]))
                    if tries < MAX_RESUBMITS:
                        todo.append((k, tries + 1))
                    else:
                        self.fail(k, "replica_lost", f"its replica was lost {tries + 1} times: {e}")
                    continue
                except ray.exceptions.RayTaskError as e:  # the engine failed: running it again would fail again
                    self.fail(k, "engine_failed", str(e.cause if e.cause is not None else e))
                else:
                    for i, line_answer in zip(self.chunks[k], answers):
                        self.answers[i] = line_answer
                free.append(actor)
        finally:
            stopping = [actor.shutdown.remote() for actor in free]
            if stopping:
                ray.wait(stopping, num_returns=len(stopping), timeout=SHUTDOWN_TIMEOUT_S)
            for actor in list(free) + [actor for actor, _, _ in running.values()]:
                ray.kill(actor)
        return self.answers

    def fail(self, k: int, code: str, message: str) -> None:
        for i in self.chunks[k]:
            self.answers[i] = failed(custom_id_of(self.lines[i]), code, " ".join(message.split()))
