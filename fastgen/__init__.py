"""fastgen: an embeddable LLM inference engine (Dynamic SplitFuse over a paged KV cache)."""

from .config import EngineConfig
from .engine import AsyncEngine, EngineStats
from .errors import (
    DeploymentNotFoundError,
    EngineDeadError,
    EngineOverloadedError,
    FastgenError,
    InvalidRequestError,
    StepError,
    UnsupportedModelError,
)
from .outputs import RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncEngine",
    "DeploymentNotFoundError",
    "EngineConfig",
    "EngineDeadError",
    "EngineOverloadedError",
    "EngineStats",
    "FastgenError",
    "InvalidRequestError",
    "RequestOutput",
    "SamplingParams",
    "StepError",
    "UnsupportedModelError",
    "__version__",
]
