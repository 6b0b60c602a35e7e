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
        launch, calls = model_runner.ModelRunner.launch, []

        def launch_then_fail(self, batch, eos_ids, previous):
            calls.append(batch)
            if len(calls) == 2:
                raise RuntimeError("injected: step failed")
            return launch(self, batch, eos_ids, previous)

        model_runner.ModelRunner.launch = launch_then_fail
    tp_workers.run_worker(*args)
