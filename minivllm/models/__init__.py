"""The model families minivllm runs, by the architecture name in a checkpoint's config.json."""

from minivllm.models.decoder import DecoderForCausalLM

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")


def model_architecture(config) -> str:
    """The checkpoint's architecture if minivllm supports it; a ValueError naming both lists otherwise."""
    archs = list(getattr(config, "architectures", None) or [])
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if not archs and config.model_type in ("qwen3", "qwen2", "llama"):
        return {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[
            config.model_type
        ]
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    raise ValueError(f"unsupported architecture {archs or config.model_type!r}; minivllm supports {supported}")


__all__ = ["DecoderForCausalLM", "SUPPORTED_ARCHITECTURES", "model_architecture"]
