"""Executors: where step plans run (in this process, or in ZeroMQ worker processes)."""

from __future__ import annotations

from fastgen.config import EngineConfig
from fastgen.models.config import ModelConfig

from .base import Executor
from .inprocess import InProcessExecutor


async def create_executor(
    model_path: str, config: EngineConfig, model_config: ModelConfig, max_model_len: int
) -> Executor:
    """The executor ``config.executor`` names (``auto``: in-process unless tensor-parallel)."""
    kind = config.executor
    if kind == "auto":
        kind = "zmq" if config.tensor_parallel > 1 else "inprocess"
    if kind == "inprocess":
        if config.tensor_parallel > 1:
            raise ValueError("tensor_parallel > 1 needs executor='zmq' (worker processes)")
        return await InProcessExecutor.create(model_path, config, model_config, max_model_len)
    from .zmq import ZmqExecutor

    return await ZmqExecutor.create(model_path, config, model_config, max_model_len)


__all__ = ["Executor", "InProcessExecutor", "create_executor"]
