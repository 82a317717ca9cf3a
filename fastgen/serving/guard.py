"""`HttpPolicy` and `RequestGuard`: what the gateway accepts before a route sees a request.

A server on 127.0.0.1 is still reachable from every web page the user opens: a page may POST to
it (a ``text/plain`` or untyped body needs no CORS preflight) and, through DNS rebinding, even read
the answers under a name of its own. The guard, an ASGI middleware in front of every route, refuses:

- a ``Host`` that is not allowed (421): by default ``localhost``, ``127.0.0.1``, ``[::1]`` and the
  address the connection arrived at, with any port (a rebinding page's Host is its own name);
- an ``Origin`` header (sent by browsers) that is neither the server's own host nor allowed (403);
  CORS preflights are answered only for allowed origins;
- a body on a route that does not say ``Content-Type: application/json`` (415), so no page can
  have a simple form or ``fetch`` parsed;
- a body longer than ``max_body_bytes`` (413), judged by ``Content-Length`` before reading and
  while reading a chunked body; a body that does not arrive within ``body_timeout_s`` (408).
  These two close the connection, so the rest of the body is never read; other refusals read the
  body (within the same limits) and keep the connection.

The route then gets the body in one piece. The timeouts for a request's head and for idle
keep-alive connections belong to the server (`HttpServer`), which also takes an `HttpPolicy`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import (
    HostNotAllowedError,
    OriginNotAllowedError,
    RequestTimeoutError,
    RequestTooLargeError,
    UnsupportedMediaTypeError,
    describe_error,
)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# The largest legitimate body is about one prompt of max_model_len tokens, or a batch of prompts:
# 128k tokens take ~1 MB as token ids and ~0.5-3 MB as JSON text (non-ASCII text escapes to 6-12
# bytes a character); 16 MiB leaves room for batches of evaluation prompts.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_BODY_METHODS = ("POST", "PUT", "PATCH")
_REFUSALS = (HostNotAllowedError, OriginNotAllowedError, UnsupportedMediaTypeError)
_JSON = "application/json"


class HttpPolicy(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Who may talk to the HTTP gateway and how much it reads (`fastgen serve` flags in brackets).

    - ``allowed_hosts`` [``--allowed-hosts``]: ``Host`` names served (``name`` for any port,
      ``name:port`` for one); the address a connection arrived at is always served. ``*``: any.
    - ``allowed_origins`` [``--allowed-origins``]: web origins (``https://app.example:8443``)
      that may call the API from a browser, besides pages of the server's own host. ``*``: any.
    - ``max_body_bytes`` [``--max-body-bytes``]: the largest request body.
    - ``body_timeout_s``: the longest a body may take to arrive once its head has.
    - ``header_timeout_s``: the longest a request's head (request line and headers) may take, from
      the connection's start or the previous response's end (`HttpServer`).
    - ``keep_alive_timeout_s``: how long an idle keep-alive connection stays open (`HttpServer`).
    """

    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be a positive integer, got {self.max_body_bytes!r}")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")

    def serving(self, *hosts: str) -> HttpPolicy:
        """This policy with ``hosts`` (e.g. the address the server binds) allowed as well."""
        added = [host for host in hosts if host and host not in self.allowed_hosts]
        return msgspec.structs.replace(self, allowed_hosts=(*self.allowed_hosts, *added))


def split_host(value: str) -> tuple[str, str | None]:
    """``host[:port]`` -> (host, port or None), lower case, IPv6 in brackets, no trailing dot."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        host, rest = (value[: end + 1], value[end + 1 :]) if end > 0 else (value, "")
        port = rest[1:] if rest.startswith(":") else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif value.count(":") > 1:  # a bare IPv6 address (as given on a command line)
        host, port = f"[{value}]", None
    else:
        host, port = value, None
    return host.rstrip("."), port


class RequestGuard:
    """ASGI middleware applying an `HttpPolicy` to every HTTP request of ``app``."""

    def __init__(self, app: ASGIApp, policy: HttpPolicy | None = None):
        self.app = app
        self.policy = policy or HttpPolicy()
        self._any_host = "*" in self.policy.allowed_hosts
        self._hosts = {split_host(entry) for entry in self.policy.allowed_hosts if entry != "*"}
        self._any_origin = "*" in self.policy.allowed_origins
        self._origins = {_origin_key(entry) for entry in self.policy.allowed_origins if entry != "*"}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        origin = headers.get("origin")
        cross_origin = origin is not None and not _same_host(origin, headers.get("host"))
        refusal: Exception | None = None
        try:
            self._check_host(scope, headers.get("host"))
            if cross_origin and not self._origin_allowed(origin):
                raise OriginNotAllowedError(f"requests from the web origin {origin!r} are not allowed")
            if scope["method"] in _BODY_METHODS:
                _check_json(headers.get("content-type"))
        except _REFUSALS as exc:
            refusal = exc
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if refusal is None and origin is not None and preflight:
            await _answer_preflight(send, origin, headers)
            return
        if scope["method"] in _BODY_METHODS:
            # read the body even of a refused request (within the limits), so the connection can
            # go on: a server that answers and closes with a body unread resets the connection,
            # and the client may lose the answer
            try:
                receive = await self._read_body(receive, headers.get("content-length"))
            except _ClientGone:
                return
            except (RequestTooLargeError, RequestTimeoutError) as exc:
                await _refuse(send, exc, close=True)  # the rest of the body is never read
                return
        if refusal is not None:
            await _refuse(send, refusal)
            return
        if cross_origin:
            send = _with_cors(send, origin)  # type: ignore[arg-type]
        await self.app(scope, receive, send)

    def _check_host(self, scope: Scope, header: str | None) -> None:
        if self._any_host or header is None:  # no Host header, no rebinding: only browsers rebind
            return
        host, port = split_host(header)
        if (host, port) in self._hosts or (host, None) in self._hosts:
            return
        server = scope.get("server")
        if server and host.strip("[]") == str(server[0]).lower():  # the address it arrived at
            return
        raise HostNotAllowedError(
            f"this server does not answer for the host {header!r} (see --allowed-hosts)"
        )

    def _origin_allowed(self, origin: str) -> bool:
        return self._any_origin or _origin_key(origin) in self._origins

    async def _read_body(self, receive: Receive, content_length: str | None) -> Receive:
        """Read the whole body within the limits; returns a ``receive`` that hands it over."""
        limit = self.policy.max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise RequestTooLargeError(f"the body has {content_length} bytes; at most {limit} are accepted")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.policy.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _ClientGone()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise RequestTooLargeError(f"the body exceeds {limit} bytes")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise RequestTimeoutError(
                f"the body did not arrive within {self.policy.body_timeout_s:g} s"
            ) from None
        return _replay(b"".join(chunks), receive)


class _ClientGone(Exception):
    pass


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lower-case name (the first of repeated ones)."""
    headers: dict[str, str] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return headers


def _check_json(content_type: str | None) -> None:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type != _JSON:
        raise UnsupportedMediaTypeError(
            f"request bodies must be JSON sent with 'Content-Type: {_JSON}', got {content_type!r}"
        )


def _origin_key(origin: str) -> tuple[str, str, str | None]:
    parts = urlsplit(origin.strip())
    host, port = split_host(parts.netloc)
    default_port = {"http": "80", "https": "443"}.get(parts.scheme.lower())
    return parts.scheme.lower(), host, None if port == default_port else port


def _same_host(origin: str, host_header: str | None) -> bool:
    """Whether a page of ``origin`` was served by this very host and port (no cross-origin call)."""
    if host_header is None:
        return False
    scheme, host, port = _origin_key(origin)
    own_host, own_port = split_host(host_header)
    default_port = {"http": "80", "https": "443"}.get(scheme)
    return scheme in ("http", "https") and (host, port) == (
        own_host,
        None if own_port == default_port else own_port,
    )


def _replay(body: bytes, receive: Receive) -> Receive:
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, whenever it comes

    return replay


def _with_cors(send: Send, origin: str) -> Callable[[Message], Awaitable[None]]:
    async def send_with_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"origin")]
            message = {**message, "headers": headers}
        await send(message)

    return send_with_cors


async def _answer_preflight(send: Send, origin: str, headers: dict[str, Any]) -> None:
    allow = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", b"GET, POST, OPTIONS"),
        (
            b"access-control-allow-headers",
            headers.get("access-control-request-headers", "").encode("latin-1"),
        ),
        (b"access-control-max-age", b"600"),
        (b"vary", b"origin"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": allow})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _refuse(send: Send, exc: Exception, *, close: bool = False) -> None:
    """The error response of a refused request (``close``: and the connection closes after it)."""
    info = describe_error(exc)
    body = msgspec.json.encode(info.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": info.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
