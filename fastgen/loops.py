"""Event loops: uvloop's when installed, and one running in a background thread for sync APIs."""

from __future__ import annotations

import asyncio
import threading


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
