"""Model families: one short file each, over the shared layers in `fastgen.layers`.

The registry names modules rather than importing them, so the engine process can check a
checkpoint's architecture without importing torch.
"""

from __future__ import annotations

import importlib

from fastgen.errors import UnsupportedModelError

from .config import ModelConfig

# HF ``model_type`` -> (module, class)
MODEL_REGISTRY: dict[str, tuple[str, str]] = {
    "llama": ("fastgen.models.llama", "LlamaForCausalLM"),
    # Mistral is Llama with sliding-window attention, which ModelConfig reads from config.json
    "mistral": ("fastgen.models.llama", "LlamaForCausalLM"),
    "mixtral": ("fastgen.models.llama", "LlamaForCausalLM"),
    "qwen2": ("fastgen.models.llama", "LlamaForCausalLM"),
    "qwen3": ("fastgen.models.llama", "LlamaForCausalLM"),
    "phi": ("fastgen.models.phi", "PhiForCausalLM"),
    "gemma": ("fastgen.models.llama", "LlamaForCausalLM"),
    "gemma2": ("fastgen.models.llama", "LlamaForCausalLM"),
    "gemma3_text": ("fastgen.models.llama", "LlamaForCausalLM"),
}


def check_supported(config: ModelConfig) -> None:
    """Raise `UnsupportedModelError` (listing the supported types) for an unknown model type."""
    if config.model_type not in MODEL_REGISTRY:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported; supported model types: {supported}"
        )
    if config.raw.get("qk_layernorm"):
        raise UnsupportedModelError(f"{config.model_type} with qk_layernorm=true is not supported")


def model_class_for(config: ModelConfig) -> type:
    """The implementation class of ``config.model_type``."""
    check_supported(config)
    module, name = MODEL_REGISTRY[config.model_type]
    return getattr(importlib.import_module(module), name)


__all__ = ["MODEL_REGISTRY", "ModelConfig", "check_supported", "model_class_for"]
