"""Model families: one short adapter file each (config -> layer options, weight names, fused
tensors), all running the shared decoder of `fastgen.models.decoder` over `fastgen.layers`.

The registry names modules rather than importing them, and adapters import no torch, so the
engine process reads and checks a checkpoint's config without importing torch.
"""

from __future__ import annotations

import importlib

from fastgen.errors import UnsupportedModelError

from .adapter import Adapter
from .config import ModelConfig

# HF ``model_type`` -> the module of its family's adapter (the module's ``ADAPTERS[model_type]``)
FAMILIES: dict[str, str] = {
    "llama": "fastgen.models.llama",
    "mistral": "fastgen.models.mistral",
    "mixtral": "fastgen.models.mistral",
    "qwen2": "fastgen.models.qwen2",
    "qwen3": "fastgen.models.qwen2",
    "gemma": "fastgen.models.gemma",
    "gemma2": "fastgen.models.gemma",
    "gemma3": "fastgen.models.gemma",
    "gemma3_text": "fastgen.models.gemma",
    "phi": "fastgen.models.phi",
    "falcon": "fastgen.models.falcon",
    "RefinedWeb": "fastgen.models.falcon",
    "RefinedWebModel": "fastgen.models.falcon",
    "opt": "fastgen.models.opt",
    "qwen": "fastgen.models.qwen",
}


def adapter_for(model_type: str) -> Adapter:
    """The adapter of ``model_type``; `UnsupportedModelError` (listing the supported types) for an
    unknown one."""
    if model_type not in FAMILIES:
        supported = ", ".join(sorted(FAMILIES))
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: {supported}"
        )
    return importlib.import_module(FAMILIES[model_type]).ADAPTERS[model_type]


def check_supported(config: ModelConfig) -> None:
    """Raise `UnsupportedModelError` for a config no adapter reads (adapters refuse unsupported
    settings when they read the config)."""
    adapter_for(config.model_type)


def model_class_for(config: ModelConfig) -> type:
    """The torch module built for ``config`` (imports torch)."""
    module, _, name = adapter_for(config.model_type).model.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["FAMILIES", "Adapter", "ModelConfig", "adapter_for", "check_supported", "model_class_for"]
