"""`ReplicaSupervisor`: a deployment's replicas started through a `Placement`, watched, and
restarted when they stop serving.

A replica stops serving when its process exits (an exit event, `Supervised.wait_exit`) or when it
reports `EngineDown` (its engine cannot serve; it exits next). Either way ``on_down`` is called at
once (the router stops routing to it and fails its requests), and a new process is started after
a backoff (`RestartPolicy`: exponential, capped) under a new socket identity; it serves again once
it sends `Ready`. At the policy's ``max_failures``-th failure within ``window_s`` the supervisor
gives up on the replica, which stays down, named by `problems` (and so by ``/health``).

The replicas dial the router's address, so a placement need not know where they listen: it only
starts them and reports their exit. `LocalPlacement` starts subprocesses; `RayPlacement`
(`fastgen.serving.ray_placement`) starts each through a Ray actor on a cluster node and reports
the actor's death as the replica's exit, so both take this one path of restarts and backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from fastgen.config import EngineConfig
from fastgen.errors import EngineDeadError
from fastgen.ipc import Seal
from fastgen.supervisor import (
    Backoff,
    ChildExitedError,
    Launch,
    LocalPlacement,
    Placement,
    RestartPolicy,
    StartTimeoutError,
    Supervised,
    wait_started,
)

from .errors import DeploymentStartError
from .protocol import Ready, ReplicaSpec

logger = logging.getLogger("fastgen.serving.supervision")

STARTING, SERVING, RESTARTING, FAILED, STOPPED = "starting", "serving", "restarting", "failed", "stopped"
ENGINE_DOWN_GRACE_S = 30.0  # a replica whose engine is down stops it (10 s at most), then exits


@dataclass(eq=False)
class ReplicaSlot:
    """One replica of the deployment, across its restarts."""

    replica_id: int
    backoff: Backoff
    state: str = STARTING
    reason: str = ""  # why it does not serve (empty while it does)
    identity: bytes = b""  # the socket identity of its current process
    unit: Supervised | None = None  # its current process
    restarts: int = 0
    exit_code: int | None = None  # of its last process that exited
    max_model_len: int = 0
    num_kv_blocks: int = 0

    @property
    def serving(self) -> bool:
        """Ready, and its process has not exited (asked of the process itself, so a death is known
        before its exit event is handled)."""
        return self.state == SERVING and self.unit is not None and self.unit.exit_code is None

    @property
    def pid(self) -> int:
        return (self.unit.pid if self.unit is not None else None) or 0

    def problem(self) -> str | None:
        """``replica 1 restarting: exited with code -9 (SIGKILL)``; None while it serves."""
        if self.serving:
            return None
        if self.state == SERVING and self.unit is not None:  # its exit event is not handled yet
            return f"replica {self.replica_id} down: {self.unit.exit_summary()}"
        return f"replica {self.replica_id} {self.state}" + (f": {self.reason}" if self.reason else "")


class ReplicaSupervisor:
    """Starts ``replica_num`` replicas that connect to ``address``, and keeps them serving."""

    def __init__(
        self,
        *,
        model: str,
        config: EngineConfig,
        replica_num: int,
        address: str,
        seal: Seal,
        log_dir: Path,
        on_down: Callable[[ReplicaSlot, EngineDeadError], None],
        policy: RestartPolicy | None = None,
        placement: Placement | None = None,
        start_timeout_s: float = 300.0,
        replica_device_ids: list[list[int]] | None = None,
    ):
        if replica_device_ids is not None and len(replica_device_ids) != replica_num:
            raise ValueError(f"{len(replica_device_ids)} lists of device ids for {replica_num} replicas")
        self.model = model
        self.config = config
        self.address = address
        self.seal = seal
        self.log_dir = log_dir
        self.on_down = on_down
        self.policy = policy or RestartPolicy()
        self.placement = placement or LocalPlacement()
        self.start_timeout_s = start_timeout_s
        self.replica_device_ids = replica_device_ids  # GPUs of each replica (device_map); None: by slot
        self.slots = [ReplicaSlot(i, Backoff(self.policy)) for i in range(replica_num)]
        self._by_identity: dict[bytes, ReplicaSlot] = {}
        self._changed = asyncio.Event()  # a replica became ready
        self._watchers: list[asyncio.Task] = []
        self._closing = False

    # -- what the router tells us -----------------------------------------------------------------

    def slot_of(self, identity: bytes) -> ReplicaSlot | None:
        """The replica whose *current* process has this socket identity."""
        return self._by_identity.get(identity)

    def on_ready(self, slot: ReplicaSlot, message: Ready) -> None:
        if slot.state != STARTING:
            return
        slot.state, slot.reason = SERVING, ""
        slot.max_model_len, slot.num_kv_blocks = message.max_model_len, message.num_kv_blocks
        self._changed.set()
        logger.info("replica %d ready: %d KV blocks", slot.replica_id, message.num_kv_blocks)

    def on_engine_down(self, slot: ReplicaSlot, reason: str) -> None:
        """The replica said its engine cannot serve: it is down now; it exits by itself (or is
        stopped), and its exit starts the restart."""
        self._down(slot, f"cannot serve: {reason}")
        unit = slot.unit
        if unit is not None:
            task = asyncio.get_running_loop().create_task(unit.stop(grace_s=ENGINE_DOWN_GRACE_S))
            self._watchers.append(task)

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every replica and wait until all are ready; a replica that exits first, or the
        start timeout, raises `DeploymentStartError` naming it, with the end of its log."""
        for slot in self.slots:
            self._launch(slot)
        units = [slot.unit for slot in self.slots if slot.unit is not None]
        try:
            await wait_started(units, lambda: self._starting(self.slots), self.start_timeout_s, self._changed)
        except ChildExitedError as exc:
            unit = exc.child
            raise DeploymentStartError(
                f"{unit.name} (pid {unit.pid}) {unit.exit_summary()} while starting{unit.output_tail()}"
            ) from None
        except StartTimeoutError as exc:
            waiting = [slot.replica_id for slot in self.slots if not slot.serving]
            raise DeploymentStartError(
                f"replicas {waiting} were not ready within {self.start_timeout_s:.0f} s\n{exc}"
            ) from None
        loop = asyncio.get_running_loop()
        self._watchers += [
            loop.create_task(self._watch(slot), name=f"replica-{slot.replica_id}") for slot in self.slots
        ]

    async def shutdown(self, ask_to_stop: Callable[[ReplicaSlot], None], grace_s: float = 5.0) -> None:
        """Stop restarting, ask the serving replicas to stop (``ask_to_stop``), then stop every
        process (terminating, then killing, those that do not exit within ``grace_s``)."""
        self._closing = True
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        asked = [slot for slot in self.slots if slot.serving]
        for slot in asked:
            ask_to_stop(slot)
        # those not asked (still starting) are terminated at once
        await asyncio.gather(
            *(slot.unit.stop(grace_s if slot in asked else 0) for slot in self.slots if slot.unit is not None)
        )
        for slot in self.slots:
            if slot.state != FAILED:
                slot.state, slot.reason = STOPPED, "the deployment is shutting down"
        self.placement.close()

    def replica_config(self, replica_id: int) -> EngineConfig:
        """The engine config replica ``replica_id`` starts with: its GPUs when a device_map named them."""
        if self.replica_device_ids is None:
            return self.config
        return self.config.replace(device_ids=self.replica_device_ids[replica_id])

    def problems(self) -> list[str]:
        """One line for each replica that cannot serve now (none: all serve)."""
        return [problem for slot in self.slots if (problem := slot.problem()) is not None]

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    # -- internals ------------------------------------------------------------------------------

    def _launch(self, slot: ReplicaSlot) -> None:
        if slot.identity:
            self._by_identity.pop(slot.identity, None)
        slot.identity = secrets.token_bytes(16)  # unguessable: no other process can take its place
        # a placement that gives each replica its own devices (a Ray actor's GPUs) makes every
        # replica the first and only one of what it sees
        isolated = self.placement.isolates_devices
        spec = ReplicaSpec(
            address=self.address,
            replica_id=slot.replica_id,
            identity=slot.identity.hex(),
            key=self.seal.hex(),
            model=self.model,
            config=self.replica_config(slot.replica_id),
            device_slot=0 if isolated else slot.replica_id,
            replicas_on_host=1 if isolated else len(self.slots),
        )
        launch = Launch(
            name=f"replica {slot.replica_id}",
            module="fastgen.serving.replica",
            payload=msgspec.json.encode(spec),
            log_path=str(self.log_dir / f"replica-{slot.replica_id}.log"),
            device_slot=slot.replica_id,
        )
        slot.unit = self.placement.start(launch)
        slot.state = STARTING
        self._by_identity[slot.identity] = slot
        logger.info("started replica %d (pid %s)", slot.replica_id, slot.unit.pid)

    def _down(self, slot: ReplicaSlot, reason: str) -> None:
        """The replica stopped serving (once per process): tell the router, remember why."""
        if slot.state not in (SERVING, STARTING):
            return
        slot.state, slot.reason = RESTARTING, reason
        logger.error("replica %d %s", slot.replica_id, reason)
        self.on_down(slot, EngineDeadError(f"replica {slot.replica_id} {reason} while serving this request"))

    async def _watch(self, slot: ReplicaSlot) -> None:
        """Restart the replica each time its process exits, until the policy gives up."""
        while True:
            unit = slot.unit
            assert unit is not None
            slot.exit_code = await unit.wait_exit()
            if self._closing:
                return
            self._down(slot, unit.exit_summary() + (" while starting" if slot.state == STARTING else ""))
            logger.error("replica %d: %s", slot.replica_id, unit.describe_exit())
            delay = slot.backoff.failed()
            if delay is None:
                policy = self.policy
                slot.state = FAILED
                slot.reason = (
                    f"gave up after {policy.max_failures} failures within {policy.window_s:g} s; "
                    f"the last: {slot.reason}"
                )
                logger.error("replica %d %s", slot.replica_id, slot.reason)
                return
            logger.warning("restarting replica %d in %.1f s", slot.replica_id, delay)
            await asyncio.sleep(delay)
            self._launch(slot)
            try:
                await wait_started(
                    [slot.unit], lambda: self._starting([slot]), self.start_timeout_s, self._changed
                )
            except ChildExitedError:
                continue  # the next turn counts the failure
            except StartTimeoutError:
                self._down(slot, f"was not ready within {self.start_timeout_s:g} s")
                with contextlib.suppress(Exception):
                    await slot.unit.stop(grace_s=0)
                continue
            slot.restarts += 1
            logger.info("replica %d serves again (restart %d)", slot.replica_id, slot.restarts)

    @staticmethod
    def _starting(slots: list[ReplicaSlot]) -> list[Supervised]:
        return [slot.unit for slot in slots if not slot.serving and slot.unit is not None]


class ReplicaMetrics:
    """A Prometheus collector of the replicas' supervision: restarts and which replicas serve."""

    def __init__(self, supervisor: ReplicaSupervisor):
        self.supervisor = supervisor

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        restarts = CounterMetricFamily(
            "fastgen_replica_restarts",
            "Times a replica was restarted after it stopped serving",
            labels=["replica"],
        )
        serving = GaugeMetricFamily(
            "fastgen_replica_serving", "1 while a replica serves, else 0", labels=["replica"]
        )
        for slot in self.supervisor.slots:
            restarts.add_metric([str(slot.replica_id)], slot.restarts)
            serving.add_metric([str(slot.replica_id)], 1.0 if slot.serving else 0.0)
        yield restarts
        yield serving
