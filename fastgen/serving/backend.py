"""What the HTTP gateway needs from whatever generates: the `Backend` protocol.

Three classes satisfy it: `EngineBackend` (an `AsyncEngine` in this process, the embedding case),
the deployment server's `Router` (replica processes) and the deployment `Client` (a deployment
reached over ZeroMQ). The routes are written once, against this protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from fastgen.inputs import Prompt, tokenize_off_loop
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.sampling_params import SamplingParams

if TYPE_CHECKING:
    from fastgen.engine import AsyncEngine


@runtime_checkable
class Backend(Protocol):
    """Something that turns prompts into streams of `RequestOutput` deltas."""

    @property
    def model_names(self) -> list[str]:
        """Names a request may use for the served model; the first is the canonical one."""
        ...

    @property
    def max_model_len(self) -> int: ...

    def stream_outputs(
        self, prompt: Prompt, params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; yields its output deltas. Leaving the iteration early
        aborts the request. Errors are fastgen error types, raised before the first output when
        the request is refused (invalid, overloaded)."""
        ...

    async def stats(self) -> EngineStats:
        """A snapshot of the engine(s) (summed over replicas)."""
        ...

    async def health(self) -> bool:
        """Whether requests can be served now."""
        ...


def model_names_for(model: str, *names: str | None) -> list[str]:
    """``names`` (those given), then the model path and its directory name, without repeats."""
    candidates = [*names, Path(model.rstrip("/")).name, model]
    result: list[str] = []
    for name in candidates:
        if name and name not in result:
            result.append(name)
    return result


class EngineBackend:
    """`Backend` over an `AsyncEngine` running in this process's event loop."""

    def __init__(self, engine: AsyncEngine, served_model_name: str | None = None):
        self.engine = engine
        self._names = model_names_for(engine.model_path, served_model_name)

    @property
    def model_names(self) -> list[str]:
        return self._names

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def stream_outputs(
        self, prompt: Prompt, params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        token_ids = await tokenize_off_loop(self.engine.tokenizer, prompt)  # long prompts: off the loop
        outputs = self.engine.generate(token_ids, params, request_id=request_id)
        async with contextlib.aclosing(outputs):  # stopping early aborts the request at once
            async for output in outputs:
                yield output

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def health(self) -> bool:
        return self.engine.is_healthy
