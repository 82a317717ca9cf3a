"""`StreamGroup`: several output streams run at once, merged in arrival order.

A request with ``n`` choices or several prompts becomes one group. `start` waits until every
stream has been accepted (has produced its first item), so a refused request fails as a whole
before any byte of the response is sent; `aclose` cancels every stream that is still running,
which aborts its engine request.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

T = TypeVar("T")

_END = object()


class StreamGroup(Generic[T]):
    """Iterate ``(index, item)`` over several async iterators at once."""

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
