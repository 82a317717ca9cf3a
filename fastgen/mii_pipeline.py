"""`pipeline()`: MII's non-persistent, synchronous API over an `AsyncEngine`.

The engine runs on an event loop in a background thread (uvloop when available), so a pipeline
works from plain scripts and from programs that already run an event loop. (The module is not
named ``pipeline``: importing it would rebind ``fastgen.pipeline`` from the function to it.)
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import OFFLINE_TOKEN_BUDGET, EngineConfig
from .engine import AsyncEngine
from .errors import EngineDeadError, InvalidRequestError
from .loops import BackgroundLoop
from .mii import Response, mii_response, parse_mii_options
from .serving.device_map import DeviceMap, replica_device_ids
from .streams import collect


class Pipeline:
    """Callable like MII's pipeline: ``pipe(prompts, **options) -> list[Response]``.

    `destroy` stops the engine (and its worker processes) and the background loop. A pipeline that
    is never destroyed is stopped when it is garbage-collected, or at interpreter exit by an
    `atexit` hook (registered by `weakref.finalize`), which runs while the loop's thread still
    does; the hook holds the loop and the engine but not the pipeline.
    """

    def __init__(self, model: str | None, config: EngineConfig):
        loop = BackgroundLoop(name="fastgen-pipeline")
        try:
            engine = loop.run(AsyncEngine.start(model, config))
        except BaseException:
            loop.close()
            raise
        self.engine: AsyncEngine | None = engine
        self.tokenizer = engine.tokenizer
        self._loop = loop
        self._finalizer = weakref.finalize(self, _stop, loop, engine)

    def __call__(self, prompts: str | Sequence[str], **options: Any) -> list[Response]:
        engine = self.engine
        if engine is None:
            raise EngineDeadError("this pipeline was destroyed: create another with fastgen.pipeline()")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise InvalidRequestError("prompts", "expected a non-empty list of prompts")
        params, return_full_text = parse_mii_options(options)
        return self._loop.run(generate_responses(engine, list(prompts), params, return_full_text))

    def destroy(self) -> None:
        """Stop the engine and its worker processes and free their memory; idempotent."""
        self.engine = None
        self._finalizer()


def _stop(loop: BackgroundLoop, engine: AsyncEngine) -> None:
    """A pipeline's finalizer: stop ``engine``, then its loop (bounded; never waits on a loop that
    cannot run, see `BackgroundLoop.close`)."""
    loop.close(engine.stop())


async def generate_responses(
    engine: AsyncEngine, prompts: list[str], params, return_full_text: bool
) -> list[Response]:
    """Run ``prompts`` concurrently on ``engine`` and collect MII `Response` objects."""
    prompt_ids = [engine.validate_request(prompt, params) for prompt in prompts]  # all before any runs
    results = await asyncio.gather(*(collect(engine.generate(ids, params)) for ids in prompt_ids))
    return [
        mii_response(prompt, result.text, result, full_text=return_full_text)
        for prompt, result in zip(prompts, results)
    ]


def pipeline(
    model_name_or_path: str | Path | None = None, *, device_map: DeviceMap = None, **config: Any
) -> Pipeline:
    """Load a model for synchronous, non-persistent generation (MII's ``mii.pipeline``).

    ``model_name_or_path`` is passed to `AsyncEngine.start` (``None``: its default model).
    ``config`` holds `EngineConfig` fields (``tensor_parallel``, ``token_budget``, ...); the token
    budget defaults to `OFFLINE_TOKEN_BUDGET` (2048), a throughput setting: a pipeline call returns
    when its whole batch is done.
    ``device_map`` names the GPUs of the pipeline's one replica, as MII's does (a GPU id, a list
    of ``tensor_parallel`` ids, ``[[ids]]``, ``{"localhost": [[ids]]}``; see
    `fastgen.serving.device_map`).
    """
    model = None if model_name_or_path is None else str(model_name_or_path)
    engine_config = EngineConfig.from_options(**{"token_budget": OFFLINE_TOKEN_BUDGET, **config})
    try:
        lists = replica_device_ids(device_map, tensor_parallel=engine_config.tensor_parallel, replica_num=1)
    except ValueError as exc:
        raise ValueError(f"{exc} (a pipeline is one replica)") from None
    if lists is not None:
        if engine_config.device_ids is not None:
            raise ValueError("give device_map or device_ids, not both")
        engine_config = engine_config.replace(device_ids=lists[0])
    return Pipeline(model, engine_config)
