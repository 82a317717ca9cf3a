"""Streams of request outputs, from the consumer's side; the engine, the router, the deployment
client and the gateway all read them this way.

- `output_stream`: yields one request's outputs until the one that finishes it; when the consumer
  leaves first (``break``, cancellation, ``aclose``), the producer is told to cancel the request.
- `CollectedOutput`: a request's deltas merged into the whole result.
- `StreamGroup`: several streams at once (a request with ``n`` choices or several prompts), merged
  in arrival order; `collect_group` collects each of them whole.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .logprobs import VisibleLogprobs
from .outputs import RequestOutput, TokenLogprob

T = TypeVar("T")

_END = object()


async def output_stream(
    receive: Callable[[], Awaitable[RequestOutput | BaseException]], close: Callable[[bool], None]
) -> AsyncIterator[RequestOutput]:
    """Yield what ``receive()`` gives until an output finishes the request. An error (given or
    raised by ``receive``) ends the stream. ``close(cancel)`` runs however it ends; ``cancel`` is
    true unless the request finished or a given error ended it, i.e. when the consumer left early
    and the producer should stop the request."""
    ended = False
    try:
        while not ended:
            item = await receive()
            if isinstance(item, BaseException):
                ended = True
                raise item
            ended = item.finish_reason is not None
            yield item
    finally:
        close(not ended)


@dataclass
class CollectedOutput:
    """A request's output deltas merged: the whole text, the latest counts and finish reason, the
    prompt's log-probabilities, and the log-probabilities of the text so far (see
    `VisibleLogprobs`; ``None`` when the request did not ask for them)."""

    pieces: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_text: str | None = None  # the prompt read back from its token ids, with prompt_logprobs
    visible: VisibleLogprobs = field(default_factory=VisibleLogprobs)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, out: RequestOutput) -> list[TokenLogprob] | None:
        """Take one delta; returns the log-probabilities to show with its text (``None`` when the
        request did not ask for them)."""
        self.pieces.append(out.text)
        self.prompt_tokens = out.prompt_tokens
        self.cached_tokens = out.cached_tokens
        self.generated_tokens = out.generated_tokens
        self.finish_reason = out.finish_reason
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_text = out.prompt_text
        if out.logprobs is None:
            return None
        ready = self.visible.push(out)
        if self.logprobs is None:
            self.logprobs = []
        self.logprobs.extend(ready)
        return ready


async def collect(outputs: AsyncIterator[RequestOutput]) -> CollectedOutput:
    """One stream, collected whole."""
    collected = CollectedOutput()
    async for out in outputs:
        collected.add(out)
    return collected


class StreamGroup(Generic[T]):
    """Iterate ``(index, item)`` over several async iterators at once.

    `start` waits until every stream has been accepted (has produced its first item), so a refused
    request fails as a whole before any byte of a response is sent; `aclose` cancels every stream
    that is still running, which aborts its engine request.
    """

    def __init__(self, streams: list[AsyncIterator[T]]):
        self._queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()
        self._buffer: collections.deque[tuple[int, object]] = collections.deque()
        self._open = len(streams)
        self._tasks = [
            asyncio.ensure_future(self._pump(index, stream)) for index, stream in enumerate(streams)
        ]

    async def _pump(self, index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                self._queue.put_nowait((index, item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._queue.put_nowait((index, exc))
            return
        self._queue.put_nowait((index, _END))

    async def start(self) -> None:
        """Wait for every stream's first item; on the first error, close the group and raise it."""
        pending = set(range(len(self._tasks)))
        while pending:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                await self.aclose()
                raise item
            pending.discard(index)
            self._buffer.append((index, item))

    def __aiter__(self) -> StreamGroup[T]:
        return self

    async def __anext__(self) -> tuple[int, T]:
        while self._open:
            index, item = self._buffer.popleft() if self._buffer else await self._queue.get()
            if item is _END:
                self._open -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            return index, item  # type: ignore[return-value]
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Cancel the streams still running (aborting their requests) and wait for them."""
        running = [task for task in self._tasks if not task.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        self._open = 0


async def collect_group(group: StreamGroup[RequestOutput], count: int) -> list[CollectedOutput]:
    """Start ``group`` (``count`` streams) and collect each stream whole; the group is closed
    however this ends."""
    results = [CollectedOutput() for _ in range(count)]
    try:
        await group.start()
        async for index, out in group:
            results[index].add(out)
    finally:
        await group.aclose()
    return results
