"""`pipeline()`: MII's non-persistent, synchronous API over an `AsyncEngine`.

The engine runs on an event loop in a background thread (uvloop when available), so a pipeline
works from plain scripts and from programs that already run an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from typing import Any

from .config import EngineConfig
from .engine import AsyncEngine
from .errors import InvalidRequestError
from .mii import Response, parse_mii_options


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop, uvloop's when it is installed."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class BackgroundLoop:
    """An event loop running in a daemon thread; `run` submits a coroutine and waits."""

    def __init__(self, name: str = "fastgen-loop"):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Pipeline:
    """Callable like MII's pipeline: ``pipe(prompts, **options) -> list[Response]``."""

    def __init__(self, model: str, config: EngineConfig):
        self._loop = BackgroundLoop()
        try:
            self.engine: AsyncEngine = self._loop.run(AsyncEngine.start(model, config))
        except BaseException:
            self._loop.close()
            raise
        self.tokenizer = self.engine.tokenizer

    def __call__(self, prompts: str | Sequence[str], **options: Any) -> list[Response]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise InvalidRequestError("prompts", "expected a non-empty list of prompts")
        params, return_full_text = parse_mii_options(options)
        return self._loop.run(generate_responses(self.engine, list(prompts), params, return_full_text))

    def destroy(self) -> None:
        """Stop the engine and free its memory."""
        if self.engine is None:
            return
        self._loop.run(self.engine.stop())
        self.engine = None
        self._loop.close()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None and not self._loop.loop.is_closed():
            with contextlib.suppress(Exception):  # best effort at interpreter exit
                self.destroy()


async def generate_responses(
    engine: AsyncEngine, prompts: list[str], params, return_full_text: bool
) -> list[Response]:
    """Run ``prompts`` concurrently on ``engine`` and collect MII `Response` objects."""
    prompt_ids = [engine.validate_request(prompt, params) for prompt in prompts]  # all before any runs

    async def one(prompt: str, ids: list[int]) -> Response:
        pieces: list[str] = []
        out = None
        async for out in engine.generate(ids, params):
            pieces.append(out.text)
        text = "".join(pieces)
        return Response(
            generated_text=(prompt + text) if return_full_text else text,
            prompt_length=out.prompt_tokens,
            generated_length=out.generated_tokens,
            finish_reason=out.finish_reason,
        )

    return list(await asyncio.gather(*(one(p, ids) for p, ids in zip(prompts, prompt_ids))))


def pipeline(model_name_or_path: str, **config: Any) -> Pipeline:
    """Load a model for synchronous, non-persistent generation (MII's ``mii.pipeline``).

    ``config`` holds `EngineConfig` fields (``tensor_parallel``, ``token_budget``, ...).
    """
    return Pipeline(str(model_name_or_path), EngineConfig.from_options(**config))
