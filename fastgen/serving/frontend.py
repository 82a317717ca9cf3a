"""`Frontend`: the deployment server's ZeroMQ ROUTER socket, where clients connect.

Each client's DEALER multiplexes any number of requests, told apart by the ids the client picks.
A request's outputs are sent as they arrive; a `Cancel` (or a client that disconnected, which
the ROUTER reports when a send fails) stops the request and frees its KV cache.

Every message must be sealed with the deployment's key (`fastgen.ipc.Seal`; clients read it from
the registry file, which only this user can read). Anything else (``generate``, ``info``,
``shutdown`` alike) is refused with an `AccessDeniedError` and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from fastgen.errors import AccessDeniedError
from fastgen.ipc import Seal, bind, make_socket, unsealed_body

from .backend import Backend
from .errors import describe_error
from .metrics import ServingMetrics
from .protocol import Cancel, Control, Error, Generate, Output, Reply, decode, encode, error_message

logger = logging.getLogger("fastgen.serving.frontend")


class _ClientGone(Exception):
    pass


class Frontend:
    """Serve ``backend`` to ZeroMQ clients; ``info()`` answers the ``info`` command."""

    def __init__(
        self,
        backend: Backend,
        metrics: ServingMetrics,
        info: Callable[[], Any],
        seal: Seal,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.backend = backend
        self.metrics = metrics
        self._info = info
        self.seal = seal
        self.socket = make_socket(zmq.ROUTER)
        self.address = bind(self.socket, host, port)
        self.shutdown_requested = asyncio.Event()
        self._tasks: dict[tuple[bytes, str], asyncio.Task] = {}
        self._controls: set[asyncio.Task] = set()

    async def run(self) -> None:
        while True:
            identity, frame = await self.socket.recv_multipart()
            try:
                data = self.seal.open(frame)
            except AccessDeniedError as exc:
                await self._refuse_unsealed(identity, frame, exc)
                continue
            try:
                message = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await self._refuse_undecodable(identity, data, exc)
                continue
            if isinstance(message, Generate):
                key = (identity, message.request_id)
                if key in self._tasks:
                    await self._send_quietly(
                        identity,
                        Error(message.request_id, "InvalidRequestError", "already in use", "request_id"),
                    )
                    continue
                self._tasks[key] = asyncio.create_task(self._generate(identity, message))
            elif isinstance(message, Cancel):
                task = self._tasks.get((identity, message.request_id))
                if task is not None:
                    task.cancel()
            elif isinstance(message, Control):
                task = asyncio.create_task(self._control(identity, message))
                self._controls.add(task)  # the loop keeps only weak references
                task.add_done_callback(self._controls.discard)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.socket.close(linger=200)  # let replies already queued (the shutdown ack) leave

    async def _generate(self, identity: bytes, message: Generate) -> None:
        outputs = self.metrics.track(self.backend.stream_outputs(message.prompt, message.params))
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    output.request_id = message.request_id
                    await self._send(identity, Output(output))
        except (asyncio.CancelledError, _ClientGone):
            pass  # leaving the stream aborted the request
        except Exception as exc:
            await self._send_quietly(identity, error_message(message.request_id, exc))
        finally:
            self._tasks.pop((identity, message.request_id), None)

    async def _control(self, identity: bytes, message: Control) -> None:
        try:
            if message.command == "info":
                body: Any = self._info()
            elif message.command == "stats":
                body = await self.backend.stats()
            elif message.command == "ping":
                body = "pong" if await self.backend.health() else "unhealthy"
            elif message.command == "shutdown":
                await self._send_quietly(identity, Reply(message.request_id, "ok"))
                self.shutdown_requested.set()  # after the reply: closing the socket would drop it
                return
            else:
                await self._send_quietly(
                    identity, Error(message.request_id, "InvalidRequestError", "unknown command", "command")
                )
                return
        except Exception as exc:
            await self._send_quietly(identity, error_message(message.request_id, exc))
            return
        await self._send_quietly(identity, Reply(message.request_id, body))

    async def _refuse_unsealed(self, identity: bytes, frame: bytes, exc: AccessDeniedError) -> None:
        """Answer a frame without the deployment's seal with the refusal alone (nothing of the
        deployment is told), when an id can be read from it (sealed with another key, or not)."""
        logger.warning("refused a message without this deployment's seal")
        for body in (frame, unsealed_body(frame)):
            request_id = _request_id(body)
            if request_id is not None:
                await self._send_quietly(identity, error_message(request_id, exc))
                return

    async def _refuse_undecodable(self, identity: bytes, data: bytes, exc: Exception) -> None:
        """Answer a malformed request with an error naming the bad field, when it has an id."""
        request_id = _request_id(data)
        if request_id is None:
            logger.warning("dropping an undecodable message: %s", exc)
            return
        info = describe_error(exc)
        await self._send_quietly(identity, Error(request_id, "InvalidRequestError", info.message, info.param))

    async def _send(self, identity: bytes, message) -> None:
        try:
            await self.socket.send_multipart([identity, encode(message)])
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: the client is gone
            raise _ClientGone() from exc

    async def _send_quietly(self, identity: bytes, message) -> None:
        with contextlib.suppress(_ClientGone):
            await self._send(identity, message)


def _request_id(data: bytes) -> str | None:
    """The ``request_id`` of a msgpack map, if it is one and has a string id."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return None
    request_id = raw.get("request_id") if isinstance(raw, dict) else None
    return request_id if isinstance(request_id, str) else None
