"""The deployment server process: replicas behind a `Router`, a ZeroMQ `Frontend` for clients and,
optionally, the HTTP gateway, all on one uvloop event loop.

``python -m fastgen.serving.server`` reads its `DeploymentSpec` from stdin (started by
`fastgen.serve`, through `fastgen.supervisor`). It makes the deployment's secret key, which seals
every request to the front end and every message of a replica to the router. The deployment is
published in the registry (key included; the file is this user's alone) only once every replica
is ready; a replica that stops serving later is restarted by the router's `ReplicaSupervisor`.
It stops on a ``shutdown`` command, SIGTERM or SIGINT, stopping its replicas and removing its
registry entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import msgspec

from fastgen.config import EngineConfig
from fastgen.ipc import Seal
from fastgen.loops import new_event_loop
from fastgen.supervisor import RestartPolicy, read_payload

from . import registry
from .errors import DeploymentStartError
from .gateway import create_app
from .guard import HttpPolicy
from .http_server import HttpServer
from .metrics import ServingMetrics
from .ray_placement import RayCluster, RayPlacement
from .router import Router
from .supervision import ReplicaMetrics

logger = logging.getLogger("fastgen.serving.server")


class DeploymentSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the server process needs to start a deployment."""

    name: str
    model: str
    engine_config: EngineConfig
    replica_num: int = 1
    replica_device_ids: list[list[int]] | None = None  # from device_map; None: slot i takes GPUs i*tp..
    zmq_host: str = "127.0.0.1"
    zmq_port: int = 0
    http: bool = False
    http_host: str = "127.0.0.1"
    http_port: int = 28080
    http_policy: HttpPolicy = HttpPolicy()
    start_timeout_s: float = 300.0
    restart_policy: RestartPolicy = RestartPolicy()
    ray: RayCluster | None = None  # place the replicas on a Ray cluster (None: subprocesses here)


def _load_tokenizer(path: str):
    from fastgen.models.checkpoint import load_tokenizer

    return load_tokenizer(path)  # GGUF files too


async def run_deployment(spec: DeploymentSpec) -> None:
    from .frontend import Frontend

    log_dir = registry.deployment_dir(spec.name)
    seal = Seal.new()
    placement, bind_host, bind_port = None, "127.0.0.1", 0
    if spec.ray is not None:
        placement = RayPlacement(spec.ray, spec.name, spec.engine_config)  # joins the cluster
        bind_host, bind_port = placement.router_host, spec.ray.router_port
    router = Router(
        spec.name, spec.model, None, spec.engine_config, spec.replica_num, log_dir,
        seal=seal, restart_policy=spec.restart_policy, replica_device_ids=spec.replica_device_ids,
        placement=placement, bind_host=bind_host, bind_port=bind_port,
    )  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    frontend: Frontend | None = None
    http: HttpServer | None = None
    http_task: asyncio.Task | None = None
    tasks: list[asyncio.Task] = []
    registered = False

    def info() -> registry.DeploymentInfo:
        return registry.DeploymentInfo(
            name=spec.name,
            model=spec.model,
            address=frontend.address,
            server_pid=os.getpid(),
            replicas=router.replica_infos(),
            max_model_len=router.max_model_len,
            tensor_parallel=spec.engine_config.tensor_parallel,
            http_url=http.url if http is not None else None,
            log_dir=str(log_dir),
            secret=seal.hex(),
        )

    try:
        # bind both ports first: a port in use fails the deployment before any engine loads
        metrics = ServingMetrics()
        metrics.registry.register(ReplicaMetrics(router.supervisor))
        frontend = Frontend(router, metrics, lambda: info().public(), seal, spec.zmq_host, spec.zmq_port)
        if spec.http:
            policy = spec.http_policy.serving(spec.http_host)
            app = create_app(router, metrics=metrics, policy=policy)
            http = HttpServer(app, spec.http_host, spec.http_port, policy=policy)
        starting = asyncio.create_task(_start(router, spec))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait((starting, stopped), return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not starting.done():
            starting.cancel()
            logger.info("stopped while starting")
            return
        starting.result()

        tasks.append(asyncio.create_task(frontend.run(), name="frontend"))
        tasks.append(asyncio.create_task(_wait_and_set(frontend.shutdown_requested, stop)))
        if http is not None:
            http_task = asyncio.create_task(http.serve(), name="http")
        registry.register(info())
        registered = True
        logger.info(
            "deployment %r ready: zmq %s, http %s, replicas %s",
            spec.name, frontend.address, http.url if http else "off", [r.pid for r in router.replica_infos()],
        )  # fmt: skip
        await stop.wait()
        logger.info("shutting down")
    finally:
        if registered:
            with contextlib.suppress(OSError):
                (log_dir / "deployment.json").unlink()
        if http is not None:
            http.stop()
        if http_task is not None:
            await asyncio.wait([http_task], timeout=3)  # graceful: open streams get a moment
            tasks.append(http_task)
        if frontend is not None:
            await frontend.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await router.shutdown()
        if registered:
            registry.unregister(spec.name)


async def _start(router: Router, spec: DeploymentSpec) -> None:
    """Start the replicas while this process loads the tokenizer (the router tokenizes)."""
    loading = asyncio.to_thread(_load_tokenizer, spec.engine_config.tokenizer or spec.model)
    router.tokenizer, _ = await asyncio.gather(loading, router.start(spec.start_timeout_s))


async def _wait_and_set(event: asyncio.Event, target: asyncio.Event) -> None:
    await event.wait()
    target.set()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s server %(levelname)s %(name)s: %(message)s")
    if argv:
        print("usage: python -m fastgen.serving.server < SPEC_JSON", file=sys.stderr)
        return 2
    spec = msgspec.json.decode(read_payload(), type=DeploymentSpec)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(run_deployment(spec))
    except DeploymentStartError as exc:  # expected: the message holds the failing replica's log
        logger.error("deployment %r failed to start: %s", spec.name, exc)
        return 1
    except Exception:
        logger.exception("deployment %r failed", spec.name)
        return 1
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # everything is released; skip the interpreter's slow teardown
