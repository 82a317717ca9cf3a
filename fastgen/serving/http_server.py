"""`HttpServer`: uvicorn serving an ASGI app inside an event loop the caller owns.

The socket is bound at construction, so port 0 picks a free port that is known before serving
starts (tests run in parallel without collisions). Signals stay with the caller.

Connections are bounded in time as `HttpPolicy` says: a request's head (request line and headers,
at most 16 KiB) must be complete within ``header_timeout_s`` of the connection opening or of the
previous response ending, and an idle keep-alive connection closes after ``keep_alive_timeout_s``.
uvicorn bounds only the idle time, and only until the first byte arrives, so a client that sends
its headers a byte at a time ("slowloris") would hold a connection forever; the head deadline
closes it. The body's limits are the gateway's (`RequestGuard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .guard import HttpPolicy

MAX_HEAD_BYTES = 16 * 1024  # request line and headers; more is answered 400 and closed
LINGER_S = 2.0  # how long a connection closed with its request's body unread still reads


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the owner of the process handles signals
        yield


class _GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request's head is overdue, and
    lingering before it closes a connection whose client may still be sending a body (a refused
    upload): it stops sending, discards what arrives for `LINGER_S`, then closes. Closing with
    unread data resets the connection, and the client may lose the answer (nginx's lingering_close)."""

    header_timeout_s = 10.0
    _head_deadline: asyncio.TimerHandle | None = None
    _lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._start_head_deadline()

    def data_received(self, data: bytes) -> None:
        if not self._lingering:  # a lingering connection discards what the client still sends
            super().data_received(data)

    def linger(self, transport: asyncio.Transport) -> None:
        if transport.is_closing():  # the client is gone already
            transport.close()
            return
        self._lingering = True
        self._stop_head_deadline()
        if transport.can_write_eof():
            transport.write_eof()  # the answer goes out, then our side of the connection ends
        transport.resume_reading()
        self.loop.call_later(LINGER_S, transport.close)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_deadline()
        super().connection_lost(exc)

    def _start_head_deadline(self) -> None:
        self._stop_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_overdue)

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_overdue(self) -> None:
        self._head_deadline = None
        # IDLE: no request head yet (a request under way is the gateway's to time)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


class _LingeringTransport:
    """A connection's transport whose `close` lingers while the request's body is unread."""

    def __init__(self, transport: Any, protocol: _GuardedProtocol):
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        protocol = self._protocol
        if protocol.conn.their_state is h11.SEND_BODY and not protocol._lingering:
            protocol.linger(self._transport)
        else:
            self._transport.close()

    def is_closing(self) -> bool:
        return self._protocol._lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpServer:
    """Serve ``app`` on ``host:port`` (127.0.0.1 and a free port by default)."""

    def __init__(
        self,
        app,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log_level: str = "warning",
        policy: HttpPolicy | None = None,
    ):
        policy = policy or HttpPolicy()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=2048)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        protocol = type("GuardedProtocol", (_GuardedProtocol,), {})
        protocol.header_timeout_s = policy.header_timeout_s
        config = uvicorn.Config(
            app,
            http=protocol,
            log_level=log_level,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
            timeout_keep_alive=policy.keep_alive_timeout_s,  # type: ignore[arg-type]
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,
            backlog=2048,
        )
        self._server = _Server(config)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def serve(self) -> None:
        """Serve until `stop` is called."""
        try:
            await self._server.serve(sockets=[self.socket])
        finally:
            self.socket.close()

    def stop(self) -> None:
        self._server.should_exit = True
