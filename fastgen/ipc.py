"""How fastgen's processes talk: one msgpack codec for typed messages, the seal that authenticates
what enters a deployment, and the ZeroMQ socket settings every process uses (no torch here).

- `Codec(type)`: a reused msgspec msgpack encoder and a decoder for one message type (a tagged
  union of structs, or one struct). Building them per message costs more than encoding a small one.
- `Seal(key)`: HMAC-SHA256 of a frame's bytes under a deployment's 32-byte key, prepended to the
  frame; `open` checks it in constant time and raises `AccessDeniedError` when it does not match.
  What a deployment socket *receives* from a peer that connected to it is sealed (requests of
  clients, messages of replicas); its answers are not (a peer only reaches the address it found
  in a private place: the 0600 registry file, or the spec a replica reads from its stdin).
- `make_socket`, `bind`: asyncio sockets that never drop or block on a full queue and close at once.
- `private_dir`: a fresh 0700 directory for ``ipc://`` sockets that only this user can reach.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import socket as _socket
import tempfile
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio

from fastgen.errors import AccessDeniedError

T = TypeVar("T")


class Codec(Generic[T]):
    """msgpack encoding of ``message_type`` values (decoding raises `msgspec.DecodeError` or
    `msgspec.ValidationError` on garbage)."""

    def __init__(self, message_type: Any):
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(message_type)

    def encode(self, message: T) -> bytes:
        return self._encoder.encode(message)

    def decode(self, frame: bytes | memoryview) -> T:
        return self._decoder.decode(frame)


class Seal:
    """Authenticates frames with a deployment's secret key (HMAC-SHA256, constant-time check)."""

    KEY_BYTES = 32
    MAC_BYTES = hashlib.sha256().digest_size

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("a deployment key has at least 16 bytes")
        self._key = key

    @classmethod
    def new(cls) -> Seal:
        return cls(secrets.token_bytes(cls.KEY_BYTES))

    @classmethod
    def from_hex(cls, text: str) -> Seal:
        return cls(bytes.fromhex(text))

    def hex(self) -> str:
        return self._key.hex()

    def seal(self, body: bytes) -> bytes:
        return hmac.digest(self._key, body, "sha256") + body

    def open(self, frame: bytes) -> bytes:
        """The body of a sealed ``frame``; raises `AccessDeniedError` if the seal does not match."""
        mac, body = frame[: self.MAC_BYTES], frame[self.MAC_BYTES :]
        if len(mac) < self.MAC_BYTES or not hmac.compare_digest(mac, hmac.digest(self._key, body, "sha256")):
            raise AccessDeniedError("the message is not signed with this deployment's key")
        return body


def unsealed_body(frame: bytes) -> bytes:
    """A frame's body assuming it carries a seal, without checking it: only to find the request id
    that a refusal answers."""
    return frame[Seal.MAC_BYTES :]


# -- sockets ------------------------------------------------------------------------------------


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


def bind(socket: zmq.Socket, host: str = "127.0.0.1", port: int = 0) -> str:
    """Bind to ``host:port`` (a free port when 0); returns the address to connect to."""
    if port == 0:
        port = socket.bind_to_random_port(f"tcp://{host}")
    else:
        socket.bind(f"tcp://{host}:{port}")
    return f"tcp://{host}:{port}"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def private_dir(prefix: str = "fastgen-") -> str:
    """A new directory only this user can enter (0700), short enough for ``ipc://`` paths."""
    base = tempfile.gettempdir()
    if len(base) > 60 and os.path.isdir("/tmp"):  # ipc paths are limited to ~107 bytes
        base = "/tmp"
    return tempfile.mkdtemp(prefix=prefix, dir=base)  # mkdtemp creates it 0700
