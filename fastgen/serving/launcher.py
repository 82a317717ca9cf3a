"""`serve()`: start a persistent deployment in background processes and return its client.

The deployment server runs in its own session (it outlives the caller, like MII's), starts the
replicas and publishes itself in the registry once all are ready (`fastgen.supervisor` starts it
with its spec on stdin and waits). `serve` raises `DeploymentStartError` with the exit code and
the end of the log if the server dies first or does not get ready in time; it never waits forever.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from fastgen.config import EngineConfig
from fastgen.models import ModelConfig, check_supported
from fastgen.models.checkpoint import resolve_model
from fastgen.supervisor import (
    ChildExitedError,
    RestartPolicy,
    StartTimeoutError,
    kill_group,
    log_tail,
    pid_alive,
    spawn,
    wait_started_blocking,
)

from . import registry
from .client import Client
from .device_map import DeviceMap, replica_device_ids
from .errors import DeploymentStartError
from .guard import HttpPolicy
from .ray_placement import RayCluster, cluster_spec
from .server import DeploymentSpec


def serve(
    model: str | Path | None = None,
    deployment_name: str | None = None,
    tensor_parallel: int = 1,
    replica_num: int = 1,
    enable_restful_api: bool = False,
    restful_api_port: int = 28080,
    *,
    restful_api_host: str = "127.0.0.1",
    restful_api_policy: HttpPolicy | None = None,
    device_map: DeviceMap = None,
    zmq_port: int = 0,
    start_timeout_s: float = 600.0,
    restart_policy: RestartPolicy | None = None,
    cluster: str | RayCluster = "local",
    ray_address: str | None = None,
    **engine_config: Any,
) -> Client:
    """Start a persistent deployment of ``model`` (a Hugging Face directory or a GGUF file; None:
    the default model) and return a connected `Client`.

    ``replica_num`` engine processes (each with ``tensor_parallel`` GPUs of its own when there
    are GPUs) sit behind one server that routes each request to the replica with the fewest
    outstanding tokens. ``enable_restful_api`` also serves the HTTP gateway (MII's
    ``/mii/{deployment_name}`` and the OpenAI-compatible routes) on ``restful_api_port``
    (0: a free port, see ``client.info.http_url``), answering as ``restful_api_policy`` says
    (hosts, web origins, body size; default: local names only, see `HttpPolicy`). ``device_map``
    says which GPUs each replica's ranks use, as MII's does (`fastgen.serving.device_map`: ``"auto"``,
    a GPU id, a list of ids for one replica, a list of such lists, ``{"localhost": lists}``); it is
    checked against ``tensor_parallel`` and ``replica_num`` before anything starts. ``engine_config``
    holds `EngineConfig` fields. A replica that stops serving is restarted as ``restart_policy``
    says (default: `RestartPolicy()`, backoff from 0.5 s doubling up to 30 s, giving up at the
    5th failure within 10 minutes). ``cluster="ray"`` places each replica on a node of the Ray
    cluster at ``ray_address`` (a `RayCluster` says more: CPUs and custom resources per replica,
    the router's port for replicas); the server and its gateway stay on this host. Stop the
    deployment with ``client.terminate_server()``.
    """
    ray = cluster_spec(cluster, ray_address)  # without Ray installed: what to install
    config = EngineConfig.from_options(tensor_parallel=tensor_parallel, **engine_config)
    # a path that cannot be loaded fails here, in one line, rather than in a replica's log
    model = str(Path(resolve_model(model, config.load_format)).resolve())
    check_supported(ModelConfig.from_pretrained(model))
    name = registry.check_name(deployment_name or registry.default_name(model))
    if not isinstance(replica_num, int) or replica_num < 1:
        raise ValueError(f"replica_num must be a positive integer, got {replica_num!r}")
    replica_devices = replica_device_ids(
        device_map, tensor_parallel=config.tensor_parallel, replica_num=replica_num
    )
    if ray is not None and (config.device_ids is not None or replica_devices is not None):
        raise ValueError("device_map and device_ids name this host's GPUs; on Ray a replica uses its actor's")
    if config.device_ids is not None and replica_devices is not None:
        raise ValueError("give device_map or device_ids, not both (device_map names each replica's GPUs)")
    if config.device_ids is not None and replica_num > 1:
        raise ValueError(
            "device_ids is chosen per replica: with replica_num > 1 leave it unset or give device_map"
        )
    existing = registry.read(name)
    if existing is not None and pid_alive(existing.server_pid):
        raise ValueError(
            f"a deployment named {name!r} is already running (server pid {existing.server_pid}); "
            "terminate it or choose another deployment_name"
        )
    registry.unregister(name)  # a stale entry, or logs of an earlier run
    spec = DeploymentSpec(
        name=name,
        model=model,
        engine_config=config,
        replica_num=replica_num,
        replica_device_ids=replica_devices,
        zmq_port=zmq_port,
        http=enable_restful_api,
        http_host=restful_api_host,
        http_port=restful_api_port,
        http_policy=restful_api_policy or HttpPolicy(),
        start_timeout_s=start_timeout_s,
        restart_policy=restart_policy or RestartPolicy(),
        ray=ray,
    )
    log_path = registry.deployment_dir(name) / "server.log"
    server = spawn(
        "the server process",
        "fastgen.serving.server",
        payload=msgspec.json.encode(spec),
        log_path=log_path,
        new_session=True,  # it outlives this process
    )

    def pending() -> list:
        info = registry.read(name)  # published once every replica is ready
        return [] if info is not None and info.server_pid == server.pid else [server]

    try:
        try:
            wait_started_blocking([server], pending, start_timeout_s + 30.0)
        except ChildExitedError:
            raise DeploymentStartError(
                f"deployment {name!r}: the server process (pid {server.pid}) {server.exit_summary()} "
                f"while starting; the end of {log_path}:\n{log_tail(log_path, 40)}"
            ) from None
        except StartTimeoutError:
            raise DeploymentStartError(
                f"deployment {name!r} was not ready within {start_timeout_s:.0f} s; "
                f"the end of {log_path}:\n{log_tail(log_path, 40)}"
            ) from None
    except BaseException:
        kill_group(server.pid)  # the server leads its own process group: replicas go with it
        server.process.wait()
        raise
    info = registry.read(name)
    assert info is not None
    return Client(info, server.process)
