"""`Client`: talks to a persistent deployment over ZeroMQ, from any process.

MII's API (``client.generate(prompts, **options)`` or ``client(prompts, ...)`` returning
`Response` objects, ``client.terminate_server()``), its async twins (``await client.agenerate``,
``async for r in client.astream(prompt)``), and the `Backend` protocol, so an HTTP gateway in
another process can front a deployment.

Each event loop that uses the client gets its own DEALER socket (sockets belong to one loop);
the synchronous methods run on a private background loop. A socket monitor notices a lost
connection, which fails the requests in flight instead of leaving them waiting. Every message is
sealed with the deployment's key, read from its registry file (`fastgen.ipc.Seal`); without it the
deployment answers `AccessDeniedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from fastgen.errors import AccessDeniedError, EngineDeadError, InvalidRequestError
from fastgen.inputs import Prompt
from fastgen.ipc import Seal, make_socket
from fastgen.loops import BackgroundLoop
from fastgen.mii import Response, mii_response, parse_mii_options
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.sampling_params import SamplingParams
from fastgen.streams import StreamGroup, collect_group, output_stream
from fastgen.supervisor import kill, kill_group, pid_alive, wait_gone

from . import registry
from .backend import model_names_for
from .protocol import Cancel, Control, Error, Generate, Output, Reply, decode, encode, error_from_message
from .registry import DeploymentInfo

logger = logging.getLogger("fastgen.serving.client")

CONNECT_TIMEOUT_S = 10.0
CONTROL_TIMEOUT_S = 10.0


class _Connection:
    """One DEALER socket and its reader, in one event loop."""

    def __init__(self, info: DeploymentInfo, on_close):
        self.info = info
        self._seal = Seal.from_hex(info.secret) if info.secret else None
        self.socket = make_socket(zmq.DEALER)
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(info.address)
        self.connected = asyncio.Event()
        self._pending: dict[str, asyncio.Queue] = {}
        self._on_close = on_close
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._watch())]

    async def open(self, request_id: str) -> asyncio.Queue:
        """Register ``request_id``; waits (bounded) until the server is reachable."""
        if not self.connected.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), CONNECT_TIMEOUT_S)
            except TimeoutError:
                state = "running" if pid_alive(self.info.server_pid) else "not running"
                raise EngineDeadError(
                    f"cannot reach deployment {self.info.name!r} at {self.info.address} "
                    f"(server pid {self.info.server_pid}: {state})"
                ) from None
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request_id] = queue
        return queue

    def forget(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def _frame(self, message) -> bytes:
        body = encode(message)
        return self._seal.seal(body) if self._seal is not None else body  # without: refused

    async def send(self, message) -> None:
        await self.socket.send(self._frame(message))

    def send_nowait(self, message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            future = self.socket.send(self._frame(message))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _read(self) -> None:
        try:
            while True:
                data = await self.socket.recv()
                try:
                    message = decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    logger.error("undecodable message from the deployment: %s", exc)
                    continue
                if isinstance(message, Output):
                    queue = self._pending.get(message.output.request_id)
                    item: Any = message.output
                elif isinstance(message, Error):
                    queue = self._pending.get(message.request_id)
                    item = error_from_message(message)
                elif isinstance(message, Reply):
                    queue = self._pending.get(message.request_id)
                    item = message.body
                else:
                    continue
                if queue is not None:
                    queue.put_nowait(item)
        finally:  # the loop is closing (or the client is): release the sockets
            for task in self._tasks:
                if task is not asyncio.current_task():
                    task.cancel()
            self._monitor.close()
            self.socket.close()
            self._on_close(self)

    async def _watch(self) -> None:
        while True:
            event = await recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected.set()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                error = EngineDeadError(f"lost the connection to deployment {self.info.name!r}")
                for queue in self._pending.values():
                    queue.put_nowait(error)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class Client:
    """A client of a persistent deployment (see `fastgen.client` and `fastgen.serve`)."""

    def __init__(self, info: DeploymentInfo, process: subprocess.Popen | None = None):
        self.info = info
        self._process = process  # the server, when this process started it
        self._connections: dict[asyncio.AbstractEventLoop, _Connection] = {}
        self._lock = threading.Lock()
        self._background = None

    def __repr__(self) -> str:
        return f"Client(deployment={self.info.name!r}, address={self.info.address!r})"

    @property
    def name(self) -> str:
        return self.info.name

    # -- plumbing ---------------------------------------------------------------------------

    def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        with self._lock:
            connection = self._connections.get(loop)
            if connection is None:
                connection = _Connection(self.info, self._drop)
                self._connections[loop] = connection
        return connection

    def _drop(self, connection: _Connection) -> None:
        with self._lock:
            for loop, known in list(self._connections.items()):
                if known is connection:
                    del self._connections[loop]

    def _run(self, coroutine, timeout: float | None = None):
        with self._lock:
            if self._background is None:
                self._background = BackgroundLoop(name=f"fastgen-client-{self.info.name}")
        return self._background.run(coroutine, timeout)

    async def _control(self, command: str, timeout_s: float = CONTROL_TIMEOUT_S) -> Any:
        connection = self._connection()
        request_id = uuid.uuid4().hex
        queue = await connection.open(request_id)
        try:
            await connection.send(Control(request_id, command))
            item = await asyncio.wait_for(queue.get(), timeout_s)
        finally:
            connection.forget(request_id)
        if isinstance(item, BaseException):
            raise item
        return item

    # -- the Backend protocol ------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return model_names_for(self.info.model, self.info.name)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    async def stream_outputs(
        self, prompt: Prompt, params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        connection = self._connection()
        request_id = uuid.uuid4().hex
        queue = await connection.open(request_id)

        def close(cancel: bool) -> None:
            connection.forget(request_id)
            if cancel:
                connection.send_nowait(Cancel(request_id))

        try:
            await connection.send(Generate(request_id, prompt, params))
        except BaseException:
            close(True)
            raise
        async with contextlib.aclosing(output_stream(queue.get, close)) as outputs:
            async for output in outputs:
                yield output

    async def stats(self) -> EngineStats:
        """Engine stats summed over the deployment's replicas."""
        body = await self._control("stats")
        return msgspec.convert(body, EngineStats)

    async def health(self) -> bool:
        try:
            return await self._control("ping", timeout_s=2.0) == "pong"
        except Exception:
            return False

    # -- MII's API --------------------------------------------------------------------------

    async def agenerate(self, prompts: str | Sequence[str], **options: Any) -> list[Response]:
        """Generate for every prompt concurrently; MII option names (``max_new_tokens``, ...)."""
        prompts = _prompt_list(prompts)
        params, full_text = parse_mii_options(options)
        group = StreamGroup([self.stream_outputs(prompt, params) for prompt in prompts])
        results = await collect_group(group, len(prompts))
        return [mii_response(prompt, r.text, r, full_text=full_text) for prompt, r in zip(prompts, results)]

    def generate(self, prompts: str | Sequence[str], **options: Any) -> list[Response]:
        """MII's ``client.generate``: a list of `Response`, one per prompt."""
        return self._run(self.agenerate(prompts, **options))

    __call__ = generate

    async def astream(self, prompt: str, **options: Any) -> AsyncIterator[Response]:
        """Stream one prompt: `Response` deltas (``finish_reason`` is ``"none"`` until the last)."""
        (prompt,) = _prompt_list(prompt)
        params, full_text = parse_mii_options(options)
        first = True
        async with contextlib.aclosing(self.stream_outputs(prompt, params)) as outputs:
            async for output in outputs:
                yield mii_response(prompt, output.text, output, full_text=full_text, first=first)
                first = False

    def stream(self, prompt: str, **options: Any) -> Iterator[Response]:
        """`astream` for synchronous code."""
        deltas = self.astream(prompt, **options)
        try:
            while True:
                try:
                    yield self._run(anext(deltas))
                except StopAsyncIteration:
                    return
        finally:  # at interpreter exit the loop is gone, and with it the stream's state: nothing to close
            background = self._background
            if background is not None and background.can_run:
                background.run(deltas.aclose())

    # -- deployment management ----------------------------------------------------------------

    async def ainfo(self) -> DeploymentInfo:
        return msgspec.convert(await self._control("info"), DeploymentInfo)

    def deployment_info(self) -> DeploymentInfo:
        """The live state of the deployment (replica pids, liveness, requests routed)."""
        return self._run(self.ainfo())

    def terminate_server(self, timeout_s: float = 30.0) -> None:
        """Stop the deployment: its server and every replica. Returns once their processes are
        gone (killing them if they do not exit within ``timeout_s``)."""
        pids = _local_pids(self.info)
        if not pid_alive(self.info.server_pid):  # already stopped (or died): only clean up
            kill_group(self.info.server_pid)
            if self._process is not None:
                self._process.wait(timeout_s)
            wait_gone(pids, timeout_s)
            self._forget_registration()
            self.close()
            return
        try:
            info = self.deployment_info()
            pids = _local_pids(info)
            self._run(self._control("shutdown"))
        except AccessDeniedError:
            raise  # not ours to stop
        except Exception as exc:
            logger.warning("deployment %r did not take the shutdown order (%s): killing it", self.name, exc)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout_s)
        alive = wait_gone(pids, timeout_s)
        if alive:
            kill_group(self.info.server_pid)  # the server leads its own process group
            for pid in alive:
                kill(pid)
            if self._process is not None:
                self._process.wait(5)
            alive = wait_gone(alive, 5.0)
            if alive:
                raise RuntimeError(f"processes {alive} of deployment {self.name!r} survived SIGKILL")
        self._forget_registration()
        self.close()

    def _forget_registration(self) -> None:
        current = registry.read(self.name)
        if current is not None and current.server_pid == self.info.server_pid:
            registry.unregister(self.name)

    def close(self) -> None:
        """Close this client's sockets (the deployment keeps running)."""
        with self._lock:
            connections = list(self._connections.items())
            background, self._background = self._background, None
        for loop, connection in connections:
            if not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(connection.close)
        if background is not None:
            with contextlib.suppress(Exception):
                background.run(asyncio.sleep(0.01), timeout=1)  # let the cancelled readers clean up
            background.close()


def _local_pids(info: DeploymentInfo) -> list[int]:
    """The deployment's processes on this host: the server and its replica subprocesses (a replica
    placed by Ray runs elsewhere, its pid another host's; the server stops it through Ray)."""
    return [info.server_pid, *(replica.pid for replica in info.replicas if not replica.node_id)]


def _prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts:
        raise InvalidRequestError("prompts", "expected a prompt or a non-empty list of prompts")
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequestError("prompts", "every prompt must be a non-empty string")
    return list(prompts)


def client(name_or_model: str) -> Client:
    """Connect to the running deployment named ``name_or_model`` (or serving that model), from
    any process on this machine. Raises `DeploymentNotFoundError` when there is none."""
    return Client(registry.lookup(name_or_model))
