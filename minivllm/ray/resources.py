"""What a replica asks Ray for, and the check that Ray is there."""

import importlib


def require_ray():
    """The ray module, or an ImportError that says what to install."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise ImportError("minivllm's Ray replicas need Ray, which is not installed: pip install 'minivllm[ray]' "
                          "(or pip install 'ray[data]')") from None


def replica_resources(tensor_parallel_size: int = 1, device: str | None = None) -> dict:
    """Ray resources for one replica (actor options, or map_batches' keyword arguments): on GPUs, the
    tensor-parallel group's GPUs. The ranks past 0 are the replica's own child processes, not Ray actors, so the
    group needs no placement group of its own: one actor holding tensor_parallel_size GPUs is placed on one node
    with all of them (Ray never splits an actor's resources), and its children see them (CUDA_VISIBLE_DEVICES)."""
    if device is not None and not str(device).startswith("cuda"):
        return {"num_cpus": tensor_parallel_size}
    return {"num_cpus": 1, "num_gpus": tensor_parallel_size}
