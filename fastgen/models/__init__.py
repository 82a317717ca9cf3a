"""Model families: one short file each, over the shared layers in `fastgen.layers`."""

from __future__ import annotations

from torch import nn

from fastgen.errors import UnsupportedModelError

from .config import ModelConfig
from .llama import LlamaForCausalLM

# HF ``model_type`` -> implementation
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,  # Llama with sliding-window attention (read from the config)
}


def model_class_for(config: ModelConfig) -> type[nn.Module]:
    """The implementation of ``config.model_type``; an error lists the supported types."""
    try:
        return MODEL_REGISTRY[config.model_type]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported; supported model types: {supported}"
        ) from None


__all__ = ["MODEL_REGISTRY", "ModelConfig", "model_class_for"]
