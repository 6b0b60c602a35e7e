"""minivllm: a small, fast, readable LLM inference engine.

The public names load on first use, so `import minivllm.ops` (the kernels alone) does not pull in the
engine and its dependencies.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput"]

_WHERE = {
    "LLM": "minivllm.llm",
    "AsyncLLM": "minivllm.async_llm",
    "SamplingParams": "minivllm.sampling_params",
    "RequestOutputKind": "minivllm.sampling_params",
    "RequestOutput": "minivllm.outputs",
    "CompletionOutput": "minivllm.outputs",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")
