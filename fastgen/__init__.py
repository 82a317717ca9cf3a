"""fastgen: an embeddable LLM inference engine (Dynamic SplitFuse over a paged KV cache).

Names are imported lazily, so ``import fastgen`` stays light (a client process never loads torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncEngine": "fastgen.engine",
    "EngineStats": "fastgen.outputs",
    "EngineConfig": "fastgen.config",
    "SamplingParams": "fastgen.sampling_params",
    "RequestOutput": "fastgen.outputs",
    "TokenLogprob": "fastgen.outputs",
    "Response": "fastgen.mii",
    "pipeline": "fastgen.mii_pipeline",
    "serve": "fastgen.serving.launcher",
    "client": "fastgen.serving.client",
    "snapshot": "fastgen.models.snapshot",
    "AccessDeniedError": "fastgen.errors",
    "DeploymentNotFoundError": "fastgen.errors",
    "EngineDeadError": "fastgen.errors",
    "EngineOverloadedError": "fastgen.errors",
    "FastgenError": "fastgen.errors",
    "InvalidRequestError": "fastgen.errors",
    "StepError": "fastgen.errors",
    "UnsupportedModelError": "fastgen.errors",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from .config import EngineConfig
    from .engine import AsyncEngine
    from .errors import (
        AccessDeniedError,
        DeploymentNotFoundError,
        EngineDeadError,
        EngineOverloadedError,
        FastgenError,
        InvalidRequestError,
        StepError,
        UnsupportedModelError,
    )
    from .mii import Response
    from .mii_pipeline import pipeline
    from .models.snapshot import snapshot
    from .outputs import EngineStats, RequestOutput, TokenLogprob
    from .sampling_params import SamplingParams
    from .serving.client import client
    from .serving.launcher import serve
