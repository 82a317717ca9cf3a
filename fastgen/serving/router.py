"""`Router`: a deployment's replicas behind one `Backend`.

It starts the replica processes, tokenizes each prompt (so a request's cost is exact: prompt
tokens + the most tokens it may generate) and sends it to the live replica with the fewest
outstanding tokens, unless a replica that was sent a prompt with the same beginning (whose prefix
cache likely holds it, see `fastgen.serving.affinity`) is within ``affinity_slack_tokens`` of that
load; a replica whose queue is full refuses, and the request moves on to the next one. A replica
whose process exits is taken out of rotation at once; its in-flight requests fail with
`EngineDeadError`, the other replicas keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from fastgen.config import EngineConfig
from fastgen.errors import EngineDeadError, EngineOverloadedError
from fastgen.inputs import Prompt, max_total_tokens, tokenize_off_loop
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.sampling_params import SamplingParams
from fastgen.streams import output_stream

from .affinity import PrefixAffinity, prefix_keys
from .backend import model_names_for
from .errors import DeploymentStartError
from .processes import log_tail, spawn_module, stop_process
from .protocol import (
    Cancel,
    Control,
    Error,
    Generate,
    Output,
    Ready,
    Reply,
    decode,
    encode,
    error_from_message,
)
from .registry import ReplicaInfo
from .zmq_util import bind, make_socket

logger = logging.getLogger("fastgen.serving.router")

_MONITOR_PERIOD_S = 0.1
_CONTROL_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Replica:
    replica_id: int
    process: Any  # subprocess.Popen
    log_path: Path
    ready: bool = False
    alive: bool = True
    exit_code: int | None = None
    max_model_len: int = 0
    requests_routed: int = 0
    outstanding_tokens: int = 0
    in_flight: set[str] = field(default_factory=set)

    @property
    def identity(self) -> bytes:
        return f"replica-{self.replica_id}".encode()

    @property
    def serving(self) -> bool:
        return self.ready and self.alive

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            replica_id=self.replica_id,
            pid=self.process.pid,
            alive=self.alive,
            exit_code=self.exit_code,
            requests_routed=self.requests_routed,
            in_flight=len(self.in_flight),
            outstanding_tokens=self.outstanding_tokens,
        )


@dataclass(eq=False)
class _Flight:
    replica: _Replica
    cost: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class Router:
    """A `Backend` over ``replica_num`` engine processes (use `start`, then `shutdown`)."""

    def __init__(
        self,
        name: str,
        model: str,
        tokenizer: Any,
        config: EngineConfig,
        replica_num: int,
        log_dir: Path,
        *,
        affinity_slack_tokens: int = 16384,
    ):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.log_dir = log_dir
        self._model_names = model_names_for(model, name)
        self.socket = make_socket(zmq.ROUTER)
        self.address = bind(self.socket)
        self.replicas = [_Replica(i, None, log_dir / f"replica-{i}.log") for i in range(replica_num)]
        self._by_identity = {replica.identity: replica for replica in self.replicas}
        self._flights: dict[str, _Flight] = {}
        self._replies: dict[str, tuple[_Replica, asyncio.Future]] = {}
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.affinity = PrefixAffinity()
        self.affinity_slack_tokens = affinity_slack_tokens

    # -- life cycle -------------------------------------------------------------------------

    async def start(self, timeout_s: float) -> None:
        """Start every replica and wait until all are ready; a replica that exits first (or a
        timeout) raises `DeploymentStartError` with its exit code and the end of its log."""
        config_json = msgspec.json.encode(self.config).decode()
        for replica in self.replicas:
            args = [
                "--address", self.address,
                "--replica-id", str(replica.replica_id),
                "--replicas", str(len(self.replicas)),
                "--model", self.model,
                "--config", config_json,
            ]  # fmt: skip
            replica.process = spawn_module("fastgen.serving.replica", args, replica.log_path)
            logger.info("started replica %d (pid %d)", replica.replica_id, replica.process.pid)
        self._tasks.append(asyncio.create_task(self._read(), name="router-read"))
        deadline = time.monotonic() + timeout_s
        while not all(replica.ready for replica in self.replicas):
            for replica in self.replicas:
                code = replica.process.poll()
                if code is not None:
                    raise DeploymentStartError(
                        f"replica {replica.replica_id} (pid {replica.process.pid}) exited with code {code} "
                        f"while starting; the end of {replica.log_path}:\n{log_tail(replica.log_path, 30)}"
                    )
            if time.monotonic() > deadline:
                waiting = [r.replica_id for r in self.replicas if not r.ready]
                raise DeploymentStartError(f"replicas {waiting} were not ready within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        self._tasks.append(asyncio.create_task(self._monitor(), name="router-monitor"))

    async def shutdown(self) -> None:
        """Stop every replica (politely, then by force) and fail what is still in flight."""
        self._closing = True
        for replica in self.replicas:
            if replica.process is not None and replica.alive and replica.ready:
                self._send_nowait(replica, Control(uuid.uuid4().hex, "shutdown"))
        stopping = [
            asyncio.to_thread(stop_process, r.process, 5.0) for r in self.replicas if r.process is not None
        ]
        await asyncio.gather(*stopping)
        for replica in self.replicas:
            self._mark_dead(replica, EngineDeadError("the deployment is shutting down"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.socket.close()

    # -- the Backend protocol ----------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return self._model_names

    @property
    def max_model_len(self) -> int:
        lengths = [r.max_model_len for r in self.replicas if r.ready]
        return min(lengths) if lengths else 0

    async def stream_outputs(
        self, prompt: Prompt, params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        token_ids = await tokenize_off_loop(self.tokenizer, prompt)  # long prompts: off the loop
        cost = self._cost(len(token_ids), params)
        request_id = request_id if request_id and request_id not in self._flights else uuid.uuid4().hex
        keys = prefix_keys(token_ids) if self.config.enable_prefix_caching else []
        refused: set[_Replica] = set()
        while True:  # a replica whose queue is full refuses; the next least loaded one may take it
            replica = self._pick(refused, keys)
            flight = self._board(request_id, replica, cost)
            self.affinity.record(keys, replica.replica_id)
            try:
                await self._send(replica, Generate(request_id, token_ids, params))
                first = await flight.queue.get()
            except BaseException:
                self._land(request_id, flight, cancel=True)
                raise
            others = self._has_live_replica(refused | {replica})
            if not isinstance(first, EngineOverloadedError) or not others:
                break
            self._land(request_id, flight, cancel=False)
            refused.add(replica)
            self.affinity.discard(keys, replica.replica_id)

        def land(cancel: bool) -> None:
            self._land(request_id, flight, cancel)

        outputs = output_stream(_first_then(first, flight.queue.get), land)
        async with contextlib.aclosing(outputs):
            async for output in outputs:
                yield output

    def _board(self, request_id: str, replica: _Replica, cost: int) -> _Flight:
        flight = _Flight(replica, cost)
        self._flights[request_id] = flight
        replica.in_flight.add(request_id)
        replica.outstanding_tokens += cost
        replica.requests_routed += 1
        return flight

    def _land(self, request_id: str, flight: _Flight, cancel: bool) -> None:
        replica = flight.replica
        self._flights.pop(request_id, None)
        replica.in_flight.discard(request_id)
        replica.outstanding_tokens -= flight.cost
        if cancel and replica.alive:
            self._send_nowait(replica, Cancel(request_id))

    async def stats(self) -> EngineStats:
        """Engine stats summed over the live replicas (those that answer in time)."""
        replies = await asyncio.gather(
            *(self._control(r, "stats") for r in self.replicas if r.serving), return_exceptions=True
        )
        snapshots = [
            msgspec.convert(body, EngineStats) for body in replies if not isinstance(body, BaseException)
        ]
        names = [f.name for f in fields(EngineStats)]
        return EngineStats(**{name: sum(getattr(s, name) for s in snapshots) for name in names})

    async def health(self) -> bool:
        return not self._closing and any(r.serving for r in self.replicas)

    def replica_infos(self) -> list[ReplicaInfo]:
        return [replica.info() for replica in self.replicas]

    # -- routing ------------------------------------------------------------------------------

    def _pick(self, exclude: set[_Replica], keys: list[int] | None = None) -> _Replica:
        live = [r for r in self.replicas if r.serving and r not in exclude]
        if not live:
            raise EngineDeadError(f"deployment {self.name!r} has no live replica")

        def load(replica: _Replica) -> tuple[int, int, int]:
            return replica.outstanding_tokens, replica.requests_routed, replica.replica_id

        least = min(live, key=load)
        owners = set(self.affinity.owners(keys, {r.replica_id for r in live})) if keys else set()
        warm = [r for r in live if r.replica_id in owners]
        if warm:
            best = min(warm, key=load)
            if best.outstanding_tokens - least.outstanding_tokens <= self.affinity_slack_tokens:
                return best
        return least

    def _has_live_replica(self, exclude: set[_Replica]) -> bool:
        return any(r.serving and r not in exclude for r in self.replicas)

    def _cost(self, prompt_len: int, params: SamplingParams) -> int:
        """The most tokens the request may hold (prompt and output): what it costs the replica it goes
        to. A request that the engine would refuse for its length is refused here, by the same rule
        (`max_total_tokens`), before it reaches a replica."""
        if not self.max_model_len:  # no replica has started: `_pick` says so
            return prompt_len
        # the replica validates the options; an invalid max_new_tokens must not make the cost negative
        return max(prompt_len, max_total_tokens(prompt_len, params, self.max_model_len))

    async def _send(self, replica: _Replica, message) -> None:
        try:
            await self.socket.send_multipart([replica.identity, encode(message)])
        except zmq.ZMQError as exc:
            raise EngineDeadError(f"replica {replica.replica_id} is unreachable: {exc}") from None

    def _send_nowait(self, replica: _Replica, message) -> None:
        with contextlib.suppress(zmq.ZMQError):
            future = self.socket.send_multipart([replica.identity, encode(message)])
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # never raise later

    async def _control(self, replica: _Replica, command: str) -> Any:
        request_id = uuid.uuid4().hex
        future = asyncio.get_running_loop().create_future()
        self._replies[request_id] = (replica, future)
        try:
            await self._send(replica, Control(request_id, command))
            return await asyncio.wait_for(future, _CONTROL_TIMEOUT_S)
        finally:
            self._replies.pop(request_id, None)

    # -- background tasks ----------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            identity, data = await self.socket.recv_multipart()
            replica = self._by_identity.get(identity)
            try:
                message = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("undecodable message from %r: %s", identity, exc)
                continue
            if replica is None:
                continue
            if isinstance(message, Output):
                flight = self._flights.get(message.output.request_id)
                if flight is not None:
                    flight.queue.put_nowait(message.output)
            elif isinstance(message, Error):
                flight = self._flights.get(message.request_id)
                if flight is not None:
                    flight.queue.put_nowait(error_from_message(message))
                else:
                    self._resolve(message.request_id, error_from_message(message))
            elif isinstance(message, Reply):
                self._resolve(message.request_id, message.body)
            elif isinstance(message, Ready):
                replica.ready = True
                replica.max_model_len = message.max_model_len
                logger.info("replica %d ready: %d KV blocks", replica.replica_id, message.num_kv_blocks)

    def _resolve(self, request_id: str, value: Any) -> None:
        entry = self._replies.get(request_id)
        if entry is None or entry[1].done():
            return
        if isinstance(value, BaseException):
            entry[1].set_exception(value)
        else:
            entry[1].set_result(value)

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(_MONITOR_PERIOD_S)
            for replica in self.replicas:
                code = replica.process.poll() if replica.alive else None
                if code is None:
                    continue
                logger.error(
                    "replica %d (pid %d) exited with code %s; the end of its log:\n%s",
                    replica.replica_id, replica.process.pid, code, log_tail(replica.log_path, 10),
                )  # fmt: skip
                replica.exit_code = code
                self._mark_dead(
                    replica,
                    EngineDeadError(
                        f"replica {replica.replica_id} (pid {replica.process.pid}) exited with code {code} "
                        "while serving this request"
                    ),
                )

    def _mark_dead(self, replica: _Replica, error: EngineDeadError) -> None:
        replica.alive = False
        self.affinity.forget(replica.replica_id)
        for request_id in list(replica.in_flight):
            flight = self._flights.get(request_id)
            if flight is not None:
                flight.queue.put_nowait(error)
        for owner, future in list(self._replies.values()):
            if owner is replica and not future.done():
                future.set_exception(error)


def _first_then(first: Any, receive: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
    """``receive`` that gives ``first`` before what ``receive`` gives."""
    pending = [first]

    async def next_item() -> Any:
        return pending.pop() if pending else await receive()

    return next_item
