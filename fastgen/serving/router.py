"""`Router`: a deployment's replicas behind one `Backend`.

It starts the replica processes, tokenizes each prompt (so a request's cost is exact: prompt
tokens + the most tokens it may generate) and sends it to the live replica with the fewest
outstanding tokens, unless a replica that was sent a prompt with the same beginning (whose prefix
cache likely holds it, see `fastgen.serving.affinity`) is within ``affinity_slack_tokens`` of that
load; a replica whose queue is full refuses, and the request moves on to the next one.

The replicas' processes belong to a `ReplicaSupervisor` (`fastgen.serving.supervision`). A replica
is out of rotation the moment its death is known (its process's exit event, or its own
`EngineDown` message; a request finds its process gone even before that event is handled): its
in-flight requests fail with `EngineDeadError`, one that could not be sent to it moves on to
another replica, and the supervisor restarts it. Every message from a replica must be sealed with
the deployment's key; ``health`` is false while any replica cannot serve, and ``health_problems``
says which and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from fastgen.config import EngineConfig
from fastgen.errors import AccessDeniedError, EngineDeadError, EngineOverloadedError
from fastgen.inputs import Prompt, max_total_tokens, tokenize_off_loop
from fastgen.ipc import Seal, bind, make_socket
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.sampling_params import SamplingParams
from fastgen.streams import output_stream
from fastgen.supervisor import Placement, RestartPolicy

from .affinity import PrefixAffinity, prefix_keys
from .backend import model_names_for
from .protocol import (
    Cancel,
    Control,
    EngineDown,
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
from .supervision import ReplicaSlot, ReplicaSupervisor

logger = logging.getLogger("fastgen.serving.router")

_CONTROL_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Replica:
    slot: ReplicaSlot  # its process and state, kept by the supervisor
    requests_routed: int = 0
    outstanding_tokens: int = 0
    in_flight: set[str] = field(default_factory=set)

    @property
    def replica_id(self) -> int:
        return self.slot.replica_id

    @property
    def identity(self) -> bytes:
        return self.slot.identity

    @property
    def serving(self) -> bool:
        return self.slot.serving

    @property
    def max_model_len(self) -> int:
        return self.slot.max_model_len

    def info(self) -> ReplicaInfo:
        slot = self.slot
        return ReplicaInfo(
            replica_id=slot.replica_id,
            pid=slot.pid,
            alive=slot.serving,
            exit_code=slot.exit_code,
            state=slot.state,
            reason=slot.reason,
            restarts=slot.restarts,
            requests_routed=self.requests_routed,
            in_flight=len(self.in_flight),
            outstanding_tokens=self.outstanding_tokens,
            node_id=getattr(slot.unit, "node_id", ""),
            node_ip=getattr(slot.unit, "node_ip", ""),
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
        seal: Seal | None = None,
        restart_policy: RestartPolicy | None = None,
        placement: Placement | None = None,
        bind_host: str = "127.0.0.1",
        bind_port: int = 0,
        replica_device_ids: list[list[int]] | None = None,
    ):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.log_dir = log_dir
        self._model_names = model_names_for(model, name)
        self.socket = make_socket(zmq.ROUTER)
        # the replicas dial this address: loopback, or a cluster node's IP when they run elsewhere
        self.address = bind(self.socket, bind_host, bind_port)
        self.seal = seal or Seal.new()
        self.supervisor = ReplicaSupervisor(
            model=model,
            config=config,
            replica_num=replica_num,
            address=self.address,
            seal=self.seal,
            log_dir=log_dir,
            on_down=self._replica_down,
            policy=restart_policy,
            placement=placement,
            replica_device_ids=replica_device_ids,
        )
        self.replicas = [_Replica(slot) for slot in self.supervisor.slots]
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
        self._tasks.append(asyncio.create_task(self._read(), name="router-read"))
        self.supervisor.start_timeout_s = timeout_s
        await self.supervisor.start()

    async def shutdown(self) -> None:
        """Stop every replica (politely, then by force) and fail what is still in flight."""
        self._closing = True

        def ask_to_stop(slot: ReplicaSlot) -> None:
            self._send_nowait(self.replicas[slot.replica_id], Control(uuid.uuid4().hex, "shutdown"))

        await self.supervisor.shutdown(ask_to_stop)
        for replica in self.replicas:
            self._fail_in_flight(replica, EngineDeadError("the deployment is shutting down"))
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
        lengths = [r.max_model_len for r in self.replicas if r.serving]
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
                try:
                    await self._send(replica, Generate(request_id, token_ids, params))
                except EngineDeadError as exc:  # its socket is gone: it never got the request
                    first, unreachable = exc, True
                else:
                    first, unreachable = await flight.queue.get(), False
            except BaseException:
                self._land(request_id, flight, cancel=True)
                raise
            others = self._has_live_replica(refused | {replica})
            # refused (full), or never reached: another replica may take it
            if not (unreachable or isinstance(first, EngineOverloadedError)) or not others:
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
        if cancel and replica.serving:
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
        """True while every replica serves (no engine round-trip: the supervisor's state)."""
        return not self._closing and not self.supervisor.problems()

    def health_problems(self) -> list[str]:
        """Why ``health`` is false: one line per replica that cannot serve."""
        return ["the deployment is shutting down"] if self._closing else self.supervisor.problems()

    def replica_infos(self) -> list[ReplicaInfo]:
        return [replica.info() for replica in self.replicas]

    # -- routing ------------------------------------------------------------------------------

    def _pick(self, exclude: set[_Replica], keys: list[int] | None = None) -> _Replica:
        live = [r for r in self.replicas if r.serving and r not in exclude]
        if not live:
            why = "; ".join(self.health_problems())
            raise EngineDeadError(
                f"deployment {self.name!r} has no live replica" + (f" ({why})" if why else "")
            )

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
            identity, frame = await self.socket.recv_multipart()
            slot = self.supervisor.slot_of(identity)
            if slot is None:  # not a replica's current process: dropped unread
                continue
            try:
                message = decode(self.seal.open(frame))
            except AccessDeniedError:
                logger.warning(
                    "dropping a message without the deployment's seal (replica %d)", slot.replica_id
                )
                continue
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("undecodable message from replica %d: %s", slot.replica_id, exc)
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
                self.supervisor.on_ready(slot, message)
            elif isinstance(message, EngineDown):
                self.supervisor.on_engine_down(slot, message.reason)

    def _resolve(self, request_id: str, value: Any) -> None:
        entry = self._replies.get(request_id)
        if entry is None or entry[1].done():
            return
        if isinstance(value, BaseException):
            entry[1].set_exception(value)
        else:
            entry[1].set_result(value)

    def _replica_down(self, slot: ReplicaSlot, error: EngineDeadError) -> None:
        """The supervisor learnt that a replica stopped serving: it is out of rotation already
        (``serving`` is false); fail what it was doing."""
        self._fail_in_flight(self.replicas[slot.replica_id], error)

    def _fail_in_flight(self, replica: _Replica, error: EngineDeadError) -> None:
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
