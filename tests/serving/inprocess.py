"""The gateway served on loopback from a background thread of the test process, over an engine of
its own or over a stand-in backend: tests talk real HTTP to it and can reach into its event loop
(quicker to start than ``fastgen serve`` in a process of its own)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from fastgen import AsyncEngine, EngineConfig
from fastgen.outputs import RequestOutput
from fastgen.serving.backend import EngineBackend
from fastgen.serving.gateway import create_app
from fastgen.serving.guard import HttpPolicy
from fastgen.serving.http_server import HttpServer


@dataclass
class Served:
    url: str
    port: int
    loop: asyncio.AbstractEventLoop
    backend: Any
    policy: HttpPolicy

    @property
    def engine(self) -> AsyncEngine:
        return self.backend.engine

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout_s: float = 60.0) -> Any:
        """Run ``coroutine`` on the server's event loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)


@contextlib.contextmanager
def served_gateway(
    model_path: str, *, policy: HttpPolicy | None = None, **engine_options: Any
) -> Iterator[Served]:
    """An engine for ``model_path`` (float32; ``engine_options``: more `EngineConfig` fields)
    behind the gateway, the model named ``toy``."""

    @contextlib.asynccontextmanager
    async def engine_backend() -> AsyncIterator[EngineBackend]:
        config = EngineConfig(dtype="float32", **engine_options)
        async with await AsyncEngine.start(model_path, config) as engine:
            yield EngineBackend(engine, "toy")

    with served_backend(engine_backend, policy=policy) as served:
        yield served


@contextlib.contextmanager
def served_backend(
    open_backend: Callable[[], contextlib.AbstractAsyncContextManager[Any]],
    *,
    policy: HttpPolicy | None = None,
) -> Iterator[Served]:
    """The gateway over the backend that ``open_backend()`` opens in the server's thread."""
    policy = policy or HttpPolicy()
    started: concurrent.futures.Future[tuple[Served, HttpServer]] = concurrent.futures.Future()

    async def main() -> None:
        try:
            async with open_backend() as backend:
                server = HttpServer(create_app(backend, policy=policy), policy=policy)
                served = Served(server.url, server.port, asyncio.get_running_loop(), backend, policy)
                serving = asyncio.ensure_future(server.serve())
                started.set_result((served, server))
                await serving
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=asyncio.run, args=(main(),), name="served-gateway", daemon=True)
    thread.start()
    served, server = started.result(120)
    try:
        yield served
    finally:
        served.loop.call_soon_threadsafe(server.stop)
        thread.join(30)
        assert not thread.is_alive(), "the gateway did not stop"


class EchoBackend:
    """A stand-in `Backend`: each request yields its prompt's text back in one output."""

    model_names: ClassVar[list[str]] = ["toy"]
    max_model_len = 64

    async def stream_outputs(self, prompt: Any, params: Any, *, request_id: str | None = None):
        text = prompt if isinstance(prompt, str) else "?"
        yield RequestOutput(
            request_id=request_id or "r",
            text=text,
            token_ids=[5],
            prompt_tokens=1,
            generated_tokens=1,
            finish_reason="length",
        )

    async def stats(self) -> Any:
        raise RuntimeError("no stats here")

    async def health(self) -> bool:
        return True


@contextlib.asynccontextmanager
async def echo_backend() -> AsyncIterator[EchoBackend]:
    yield EchoBackend()
