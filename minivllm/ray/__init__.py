"""minivllm on Ray: engines as Ray actors for batch inference, one per GPU or per tensor-parallel group.

`LLMPredictor` is a callable class for Ray Data's `map_batches`; `minivllm run-batch --replicas N` spreads an
OpenAI batch file over N actors (minivllm.ray.batch). Ray is optional: `pip install 'minivllm[ray]'`.
(Imports here are absolute, so this package never stands in for the real `ray`.)
"""

from minivllm.ray.resources import replica_resources, require_ray

require_ray()

from minivllm.ray.predictor import LLMPredictor  # noqa: E402 - after the check, which names the missing package

__all__ = ["LLMPredictor", "replica_resources", "require_ray"]
