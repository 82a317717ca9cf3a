"""ZeroMQ socket settings shared by every process of a deployment."""

from __future__ import annotations

import zmq
import zmq.asyncio


def make_socket(kind: int, *, identity: bytes | None = None) -> zmq.asyncio.Socket:
    """An asyncio socket that never drops or blocks on a full queue (the streams are bounded
    by their requests) and closes at once; ROUTER sockets report unreachable peers."""
    socket = zmq.asyncio.Context.instance().socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.SNDHWM, 0)
    socket.setsockopt(zmq.RCVHWM, 0)
    if kind == zmq.ROUTER:
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if identity is not None:
        socket.setsockopt(zmq.IDENTITY, identity)
    return socket


def bind(socket: zmq.asyncio.Socket, host: str = "127.0.0.1", port: int = 0) -> str:
    """Bind to ``host:port`` (a free port when 0); returns the address to connect to."""
    if port == 0:
        port = socket.bind_to_random_port(f"tcp://{host}")
    else:
        socket.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"
