"""Where the engine's steps run: a runner in this process, or a tensor-parallel group (engine/tp_workers.py)."""

from typing import Protocol

from minivllm.config import EngineConfig
from minivllm.engine.model_runner import LaunchedStep, ModelRunner
from minivllm.engine.step_message import StepMessage
from minivllm.engine.tp_workers import start_tensor_parallel


class Executor(Protocol):
    runner: ModelRunner  # rank 0's

    def execute(self, step: StepMessage) -> LaunchedStep: ...

    def shutdown(self) -> None: ...


class LocalExecutor:
    """The whole model in this process."""

    def __init__(self, config: EngineConfig):
        self.runner = ModelRunner(config)
        self.runner.init_kv_cache(config.check_kv_capacity(self.runner.available_kv_blocks()))

    def execute(self, step: StepMessage) -> LaunchedStep:
        return self.runner.execute(step)

    def shutdown(self) -> None:
        pass  # nothing outlives the process


def start_executor(config: EngineConfig) -> Executor:
    """Every rank with its model and KV cache, ready for steps."""
    if config.args.tensor_parallel_size == 1:
        return LocalExecutor(config)
    return start_tensor_parallel(config)  # ranks 1..N-1 in processes of their own
