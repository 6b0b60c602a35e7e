"""minivllm: a small, fast, readable LLM inference engine.

The public names load on first use, so `import minivllm.ops` (the kernels alone) does not pull in the
engine and its dependencies.
"""

import importlib
import importlib.util
import warnings

__version__ = "0.1.0"
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutputKind", "RequestOutput", "CompletionOutput",
           "TextPrompt", "TokensPrompt", "StructuredOutputsParams"]

_WHERE = {
    "LLM": "minivllm.llm",
    "AsyncLLM": "minivllm.async_llm",
    "SamplingParams": "minivllm.sampling_params",
    "RequestOutputKind": "minivllm.sampling_params",
    "RequestOutput": "minivllm.outputs",
    "CompletionOutput": "minivllm.outputs",
    "TextPrompt": "minivllm.inputs",
    "TokensPrompt": "minivllm.inputs",
    "StructuredOutputsParams": "minivllm.structured_outputs",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'minivllm' has no attribute {name!r}")


def _warn_if_kernels_missing() -> None:
    """Once, at import: on a CUDA GPU without the compiled kernels every op runs its slow torch reference."""
    if importlib.util.find_spec("minivllm._C") is not None:
        return
    import torch

    if torch.cuda.is_available():
        warnings.warn(
            "minivllm's CUDA kernels (minivllm._C) are not built, so this GPU runs the slow torch reference ops. "
            "Build them with `pip install -r requirements.txt && pip install --no-build-isolation .` "
            "(needs nvcc: set CUDA_HOME), or `python setup.py build_ext --inplace` in a checkout",
            stacklevel=3,  # the line that imported minivllm
        )


_warn_if_kernels_missing()
