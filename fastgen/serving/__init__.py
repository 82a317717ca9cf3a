"""Serving: persistent deployments (ZeroMQ server, replicas, clients) and the HTTP gateway.

Names are imported lazily, so a client process never loads the engine's heavy dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "serve": "fastgen.serving.launcher",
    "Client": "fastgen.serving.client",
    "Backend": "fastgen.serving.backend",
    "EngineBackend": "fastgen.serving.backend",
    "create_app": "fastgen.serving.gateway",
    "HttpServer": "fastgen.serving.http_server",
    "HttpPolicy": "fastgen.serving.guard",
    "ServingMetrics": "fastgen.serving.metrics",
    "DeploymentInfo": "fastgen.serving.registry",
    "DeploymentStartError": "fastgen.serving.errors",
    "RestartPolicy": "fastgen.supervisor",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fastgen.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
