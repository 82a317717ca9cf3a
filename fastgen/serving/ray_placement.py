"""Replicas on a Ray cluster: `RayPlacement` starts each replica process through a Ray actor on a
node that has the replica's resources (``fastgen.serve(..., cluster="ray")``,
``fastgen serve MODEL --ray``).

The deployment server stays where it was started: its router, front end and HTTP gateway do not
move. Each replica slot gets a placement group of one bundle (STRICT_PACK: the replica and its
tensor-parallel workers, which are its subprocesses, share one node): ``tensor_parallel`` GPUs
when the replicas run on GPUs, ``num_cpus`` CPUs, and any custom resources asked for. The group
is kept across restarts, so a restarted replica finds its resources held for it. In the group
runs a `ReplicaHost` actor (named ``{deployment}/replica-{i}/{n}`` in namespace ``fastgen``, ``n``
counting the replica's starts) that starts ``python -m fastgen.serving.replica`` on its node (Ray
sets the GPUs the process sees), hands it its spec on stdin (the deployment's key travels in the
actor call's arguments, never on a command line or in a log) and reports its exit. The process
watches its parent: it exits when its actor dies.

A replica dials the router over TCP, as a local one does over loopback: the router binds this
node's IP as Ray sees it (or ``router_host``) on ``router_port`` (0: a free port), the only port
fastgen needs open between nodes. Every message of a replica is sealed with the deployment's key
(authenticated, not encrypted: keep the cluster's network private, as Ray's own).

Supervision is the deployment's own (`fastgen.serving.supervision`): a `RayReplicaUnit` is the
`Supervised` handle of one start. Its exit is the replica process's exit code, or `ACTOR_DIED`
when the actor itself died (killed, its node lost), which awaiting the actor's ``wait`` call
tells at once. Ray never restarts these actors (``max_restarts=0``): the supervisor does, with its
backoff, so there is one restart policy, one ``/health`` and one set of metrics for both
placements.

Ray is imported only when a deployment asks for it; `cluster_spec` says what to install when it
is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import msgspec

from fastgen.config import EngineConfig
from fastgen.errors import FastgenError
from fastgen.ipc import private_dir
from fastgen.supervisor import Child, Launch, exit_text, log_tail, spawn

from .errors import DeploymentStartError

logger = logging.getLogger("fastgen.serving.ray_placement")

ACTOR_DIED = 255  # a replica's exit code when its actor died: the process's own code is unknown
NAMESPACE = "fastgen"  # of the replicas' named actors
_STOP_S = 15.0  # for the actor to stop its process, and for a killed actor to be gone


class RayCluster(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where a deployment's replicas run on a Ray cluster, and what each one takes."""

    # ray.init's address: None tries RAY_ADDRESS, then the cluster `ray start` made on this host,
    # and else starts a private one; "auto" never starts one
    address: str | None = None
    num_cpus: float = 1.0  # CPUs a replica takes (Ray gives its torch as many threads)
    # custom resources a replica takes, e.g. {"fastgen": 1} to serve only on nodes that offer it
    resources: dict[str, float] = msgspec.field(default_factory=dict)
    router_host: str | None = None  # the address replicas dial; None: this node's IP as Ray sees it
    router_port: int = 0  # the router's port for replicas; 0: a free one (set one for a firewall)


class RayNotInstalledError(FastgenError, ImportError):
    """A deployment asked for Ray, which is not installed."""


def cluster_spec(cluster: str | RayCluster, ray_address: str | None = None) -> RayCluster | None:
    """The `RayCluster` that ``serve(cluster=..., ray_address=...)`` asks for (None: local
    subprocesses). Raises `RayNotInstalledError`, naming what to install, when Ray is missing."""
    if cluster == "local":
        if ray_address is not None:
            raise ValueError("ray_address needs cluster='ray'")
        return None
    if isinstance(cluster, RayCluster):
        spec = cluster if ray_address is None else msgspec.structs.replace(cluster, address=ray_address)
    elif cluster == "ray":
        spec = RayCluster(address=ray_address)
    else:
        raise ValueError(f"cluster must be 'local', 'ray' or a RayCluster, got {cluster!r}")
    if not ray_installed():
        raise RayNotInstalledError(
            "serving on a Ray cluster (cluster='ray', fastgen serve --ray) needs Ray, which is not "
            "installed here: pip install 'fastgen[ray]' (or pip install ray), here and on every node"
        )
    if spec.num_cpus < 0 or any(value < 0 for value in spec.resources.values()):
        raise ValueError(f"a replica's Ray resources must not be negative: {spec}")
    return spec


def ray_installed() -> bool:
    """Whether Ray can be imported (found, not imported: the server imports it)."""
    return importlib.util.find_spec("ray") is not None


def replica_bundle(cluster: RayCluster, config: EngineConfig, cluster_gpus: float) -> dict[str, float]:
    """What one replica takes: a GPU per tensor-parallel rank unless it runs on the CPU (device
    "cpu", or "auto" on a cluster without GPUs), ``num_cpus`` CPUs, and the custom resources."""
    on_gpu = config.device == "cuda" or (config.device == "auto" and cluster_gpus > 0)
    bundle = {"CPU": float(cluster.num_cpus), **cluster.resources}
    if on_gpu:
        bundle["GPU"] = float(config.tensor_parallel)
    return {name: value for name, value in bundle.items() if value > 0}


def check_fits(bundle: dict[str, float], nodes: list[dict[str, Any]]) -> None:
    """Refuse at once when no live node (``ray.nodes()``) could ever hold one replica's
    ``bundle``, rather than let the deployment wait for its start timeout."""
    alive = [node for node in nodes if node.get("Alive")]
    for node in alive:
        offered = node.get("Resources", {})
        if all(offered.get(name, 0) >= value for name, value in bundle.items()):
            return
    seen = "; ".join(
        f"{node.get('NodeManagerAddress')}: "
        + ", ".join(f"{name}={node.get('Resources', {}).get(name, 0):g}" for name in bundle)
        for node in alive
    )
    raise DeploymentStartError(
        f"no node of the Ray cluster has what one replica needs ({bundle}); nodes: {seen or 'none'}"
    )


def actor_name(deployment: str, replica_id: int, start: int) -> str:
    """The Ray name (in namespace ``fastgen``) of the actor of a replica's ``start``-th process
    (counted from 0): a new name each time, so a restart never waits for the old name to free."""
    return f"{deployment}/replica-{replica_id}/{start}"


# -- the actor, on a node ---------------------------------------------------------------------------


class ReplicaHost:
    """A Ray actor that runs one replica process on its node and reports its exit (``ray.remote``
    is applied by `RayPlacement`, so this module imports without Ray)."""

    def __init__(self) -> None:
        self._child: Child | None = None
        self._started = asyncio.Event()

    async def start(self, name: str, module: str, payload: bytes, log_path: str) -> dict[str, Any]:
        """Start the process; returns where it runs: pid, node id, node IP, log path."""
        import ray

        path = _local_log_path(log_path)
        self._child = spawn(name, module, payload=payload, log_path=path)
        self._started.set()
        return {
            "pid": self._child.pid,
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "log_path": str(path),
        }

    async def wait(self) -> tuple[int, str]:
        """Once the process exited (and was reaped): its exit code and the end of its log."""
        await self._started.wait()
        assert self._child is not None and self._child.log_path is not None
        code = await self._child.wait_exit()
        return code, log_tail(self._child.log_path, 20)

    async def stop(self) -> int | None:
        """Terminate the process, then kill it."""
        if self._child is None:
            return None
        return await self._child.stop(grace_s=0)

    async def ping(self) -> None:
        """Answers while the actor lives (a killed actor's calls fail: that is how we see it gone)."""


def _local_log_path(path: str) -> Path:
    """The server's log path when this node can create its directory (the same host, a shared
    file system), else one in a fresh private directory of this node."""
    wanted = Path(path)
    try:
        wanted.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return wanted
    except OSError:
        return Path(private_dir("fastgen-replica-")) / wanted.name


# -- the server's side ------------------------------------------------------------------------------


class RayReplicaUnit:
    """The `Supervised` handle of one replica started through a `ReplicaHost` actor."""

    def __init__(self, launch: Launch, actor: Any, ray: Any, needs: dict[str, float]):
        self.name = launch.name
        self.node_id = ""  # known once the actor started the process
        self.node_ip = ""
        self.log_path = ""
        self._actor = actor
        self._ray = ray
        self._needs = needs
        self._pid: int | None = None
        self._code: int | None = None
        self._summary = ""
        self._details = ""
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        where = actor.start.remote(launch.name, launch.module, launch.payload, launch.log_path)
        self._tasks = (
            loop.create_task(self._locate(where), name=f"locate {self.name}"),
            loop.create_task(self._follow(actor.wait.remote()), name=f"follow {self.name}"),
        )

    def __repr__(self) -> str:
        where = f"node={self.node_ip or '?'}, pid={self._pid}"
        return f"RayReplicaUnit({self.name!r}, {where}, exit_code={self._code})"

    @property
    def pid(self) -> int | None:
        """Of the replica process, on its node."""
        return self._pid

    @property
    def exit_code(self) -> int | None:
        return self._code

    async def wait_exit(self) -> int:
        return await asyncio.shield(self._exited)

    def exit_summary(self) -> str:
        return self._summary if self._code is not None else "is running"

    def describe_exit(self) -> str:
        where = f"pid {self._pid} on {self.node_ip}" if self._pid else "not started"
        return f"{self.name} ({where}) {self.exit_summary()}{self.output_tail()}"

    def output_tail(self) -> str:
        if self._details:
            return f"; {self._details}"
        if self._pid is None:
            return f"; waiting for Ray to place its actor (it needs {self._needs} on one node)"
        return f"; its log is {self.log_path} on {self.node_ip}"

    async def stop(self, grace_s: float = 5.0) -> int | None:
        """Wait ``grace_s`` for it to exit (after it was asked to), then have its actor terminate
        and kill it, then kill the actor."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.wait_exit(), grace_s)
        if self._pid is not None:  # an actor not placed yet has nothing to stop
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_awaited(self._actor.stop.remote()), _STOP_S)
        self._ray.kill(self._actor, no_restart=True)
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(self.wait_exit(), _STOP_S)
        return self._code

    async def _locate(self, where: Any) -> None:
        with contextlib.suppress(Exception):  # a failure shows in `_follow`'s wait
            found = await where
            self._pid, self.node_id = found["pid"], found["node_id"]
            self.node_ip, self.log_path = found["node_ip"], found["log_path"]
            logger.info("%s runs on node %s (%s), pid %d", self.name, self.node_ip, self.node_id, self._pid)

    async def _follow(self, waited: Any) -> None:
        """Learn the exit (the process's code, or the actor's death) and report it at once; then
        release the actor, whose bundle the next start waits for (Ray queues it until then)."""
        exceptions = self._ray.exceptions
        try:
            code, tail = await waited
            summary, details = exit_text(code), f"the end of {self.log_path} on {self.node_ip}:\n{tail}"
        except exceptions.RayActorError as exc:
            code, summary, details = ACTOR_DIED, "lost its Ray actor", _first_lines(exc)
        except exceptions.RayError as exc:  # the actor could not start the process
            code, summary, details = ACTOR_DIED, "could not start on its Ray node", _first_lines(exc)
        self._code, self._summary, self._details = code, summary, details
        self._exited.set_result(code)
        await self._release()

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(self._actor, no_restart=True)
        with contextlib.suppress(Exception):  # fails (the actor is dead) or times out
            await asyncio.wait_for(_awaited(self._actor.ping.remote()), _STOP_S)


async def _awaited(ref: Any) -> Any:
    """A coroutine of an ObjectRef, for asyncio.wait_for."""
    return await ref


def _first_lines(exc: BaseException, lines: int = 6) -> str:
    return "\n".join(str(exc).splitlines()[:lines])


class RayPlacement:
    """Starts each replica through a `ReplicaHost` actor in its own placement group (see the
    module's docstring); joins the Ray cluster when built."""

    isolates_devices = True  # Ray sets each actor's CUDA_VISIBLE_DEVICES (and OMP_NUM_THREADS)

    def __init__(self, cluster: RayCluster, deployment: str, config: EngineConfig):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self._placement_group = placement_group
        self._remove_placement_group = remove_placement_group
        self._strategy = PlacementGroupSchedulingStrategy
        self._joined = False
        if not ray.is_initialized():
            # log_to_driver off: replicas log to files; Ray's own messages stay in its session logs
            ray.init(
                address=cluster.address,
                namespace=NAMESPACE,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
            self._joined = True
        self.deployment = deployment
        self.cluster = cluster
        self.bundle = replica_bundle(cluster, config, ray.cluster_resources().get("GPU", 0))
        check_fits(self.bundle, ray.nodes())
        self._check_name_free()
        self.router_host = cluster.router_host or ray.util.get_node_ip_address()
        self._groups: dict[int, Any] = {}
        self._starts: dict[int, int] = {}  # per replica: how many actors it had
        self._host_class = ray.remote(ReplicaHost)
        logger.info("replicas go to Ray nodes with %s each; they dial %s", self.bundle, self.router_host)

    def _check_name_free(self) -> None:
        ours = f"{self.deployment}/"
        taken = [name for name in self._ray.util.list_named_actors() if name.startswith(ours)]
        if taken:
            raise DeploymentStartError(
                f"the Ray cluster already runs replicas of a deployment named {self.deployment!r} "
                f"({', '.join(sorted(taken))}): stop it or choose another deployment_name"
            )

    def start(self, launch: Launch) -> RayReplicaUnit:
        slot = launch.device_slot  # the replica's id: its placement group, kept across restarts
        group = self._groups.get(slot)
        if group is None:
            group = self._placement_group(
                [self.bundle], strategy="STRICT_PACK", name=f"fastgen/{self.deployment}/replica-{slot}"
            )
            self._groups[slot] = group
        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        start = self._starts.get(slot, 0)
        self._starts[slot] = start + 1
        actor = self._host_class.options(
            name=actor_name(self.deployment, slot, start),
            num_cpus=self.bundle.get("CPU", 0),
            num_gpus=self.bundle.get("GPU", 0),
            resources=custom,
            max_restarts=0,  # the deployment's supervisor restarts it, with its backoff
            scheduling_strategy=self._strategy(placement_group=group, placement_group_bundle_index=0),
        ).remote()
        return RayReplicaUnit(launch, actor, self._ray, self.bundle)

    def close(self) -> None:
        for group in self._groups.values():
            with contextlib.suppress(Exception):
                self._remove_placement_group(group)
        self._groups.clear()
        if self._joined:
            self._ray.shutdown()
