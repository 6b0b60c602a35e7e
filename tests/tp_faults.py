"""A tensor-parallel worker with an injected failure, for tests/test_tensor_parallel.py.

It lives apart from the tests so that the spawned worker, which imports it to find the function, does not
import the test module and its HF model classes too.
"""

from minivllm.engine import model_runner, tp_workers


def failing_worker(where: str, *args) -> None:
    """run_worker with an injected failure: in loading its weights ("load"), or in its second step ("step")."""
    if where == "load":

        def corrupt(model, directory):
            raise OSError(f"injected: shard of {directory} is corrupt")

        model_runner.load_weights = corrupt
    else:
        execute, calls = model_runner.ModelRunner.execute, []

        def execute_then_fail(self, step):
            calls.append(step)
            if len(calls) == 2:
                raise RuntimeError("injected: step failed")
            return execute(self, step)

        model_runner.ModelRunner.execute = execute_then_fail
    tp_workers.run_worker(*args)
