"""Event loops: uvloop's when installed, and one running in a background thread for sync APIs."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

logger = logging.getLogger("fastgen.loops")

T = TypeVar("T")

CLOSE_TIMEOUT_S = 30.0  # for the last coroutine of `BackgroundLoop.close` (an engine's shutdown)
_CANCEL_GRACE_S = 5.0  # then for the loop's thread to cancel what is left and close the loop


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A fresh event loop, uvloop's when it is installed."""
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class BackgroundLoop:
    """An event loop running in a daemon thread, for synchronous APIs over async code.

    `run` submits a coroutine and waits for its result. `close` runs a last coroutine (a shutdown),
    then stops the loop; its thread cancels the tasks left and closes the loop on its way out.

    The thread never outlives the interpreter's `atexit` hooks, which run while daemon threads still
    do: a loop not closed by then is closed by one (a `weakref.finalize`, so that finalizers created
    later, such as a pipeline's engine shutdown, run before it). After them the interpreter freezes
    daemon threads, and nothing here waits on a loop that cannot run: from then on, and on the
    loop's own thread, `run` raises and `close` does not wait.
    """

    def __init__(self, name: str = "fastgen-loop"):
        self.loop = new_event_loop()
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._run_forever, name=name, daemon=True)
        self._thread.start()
        # the thread keeps self alive until it ends, so this runs at exit (or never: close detaches it)
        self._close_at_exit = weakref.finalize(self, self.close)

    def _run_forever(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            try:
                _cancel_remaining_tasks(self.loop)
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
                self.loop.run_until_complete(self.loop.shutdown_default_executor())
            finally:
                self.loop.close()

    @property
    def can_run(self) -> bool:
        """Whether `run` would run a coroutine if called now, from this thread."""
        return self._cannot_run() is None

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the loop and return its result. Raises `TimeoutError` after
        ``timeout`` seconds; interrupted (a timeout, Ctrl-C), the coroutine is cancelled."""
        with self._lock:  # `close` cannot slip in between the check and the submission
            problem = self._cannot_run()
            if problem is None:
                future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        if problem is not None:
            coroutine.close()
            raise RuntimeError(problem)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def _cannot_run(self) -> str | None:
        if self._closing:
            return f"the background event loop {self._thread.name!r} is closed"
        if threading.current_thread() is self._thread:
            return f"BackgroundLoop.run on the loop's own thread {self._thread.name!r} would wait forever"
        if sys.is_finalizing() or not self._thread.is_alive():
            return f"the background event loop {self._thread.name!r} no longer runs (interpreter exit)"
        return None

    def close(self, last: Coroutine[Any, Any, Any] | None = None, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Run ``last`` (e.g. an engine's ``stop()``, for at most ``timeout_s``; its failure is
        logged), then stop the loop and wait until its thread has ended; idempotent.

        Called on the loop's own thread, ``last`` and the stop are scheduled to run once the caller
        returns to the loop. Once the interpreter is finalizing, ``last`` is dropped."""
        with self._lock:
            already_closing, self._closing = self._closing, True
        self._close_at_exit.detach()
        if already_closing or sys.is_finalizing() or not self._thread.is_alive():
            if last is not None:
                last.close()
            return
        wind_down = self._wind_down(last, timeout_s)
        if threading.current_thread() is self._thread:
            self.loop.create_task(wind_down)
            return
        asyncio.run_coroutine_threadsafe(wind_down, self.loop)
        self._thread.join(timeout_s + _CANCEL_GRACE_S)
        if self._thread.is_alive():
            logger.warning(
                "background event loop %r still runs %g s after it was told to stop; leaving it",
                self._thread.name,
                timeout_s + _CANCEL_GRACE_S,
            )

    async def _wind_down(self, last: Coroutine[Any, Any, Any] | None, timeout_s: float) -> None:
        try:
            if last is not None:
                await asyncio.wait_for(last, timeout_s)
        except Exception:
            logger.exception("shutting down on background event loop %r failed", self._thread.name)
        finally:
            self.loop.stop()


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task of the stopped ``loop`` and let them finish (as `asyncio.run` does)."""
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
