"""Small elementwise ops fused by torch.compile on the GPU.

A decode step of a small model is hundreds of tiny kernels; launched one by one (even replayed from a
CUDA graph) they cost more than the matrix products. On CUDA tensors these functions run compiled (one
fused kernel each, compiled once per process, before graph capture); on the CPU they run eagerly, so the
reference path and the tests need no compiler.
"""

from collections.abc import Callable
from functools import wraps

import torch


def fused_on_gpu(fn: Callable) -> Callable:
    compiled = torch.compile(fn, dynamic=True)

    @wraps(fn)
    def call(x: torch.Tensor, *args, **kwargs):
        return compiled(x, *args, **kwargs) if x.is_cuda else fn(x, *args, **kwargs)

    return call
