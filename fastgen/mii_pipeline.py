"""`pipeline()`: MII's non-persistent, synchronous API over an `AsyncEngine`.

The engine runs on an event loop in a background thread (uvloop when available), so a pipeline
works from plain scripts and from programs that already run an event loop. (The module is not
named ``pipeline``: importing it would rebind ``fastgen.pipeline`` from the function to it.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

from .config import EngineConfig
from .engine import AsyncEngine
from .errors import InvalidRequestError
from .loops import BackgroundLoop
from .mii import Response, parse_mii_options


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
