"""`serve()`: start a persistent deployment in background processes and return its client.

The deployment server runs in its own session (it outlives the caller, like MII's), starts the
replicas and publishes itself in the registry once all are ready. `serve` waits for that, and
raises `DeploymentStartError` with the exit code and the end of the log if the server dies first
or does not get ready in time; it never waits forever.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec

from fastgen.config import EngineConfig
from fastgen.models import ModelConfig, check_supported
from fastgen.models.checkpoint import resolve_model

from . import registry
from .client import Client
from .errors import DeploymentStartError
from .guard import HttpPolicy
from .processes import kill_group, log_tail, pid_alive, spawn_module
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
    zmq_port: int = 0,
    start_timeout_s: float = 600.0,
    **engine_config: Any,
) -> Client:
    """Start a persistent deployment of ``model`` (a Hugging Face directory or a GGUF file; None:
    the default model) and return a connected `Client`.

    ``replica_num`` engine processes (each with ``tensor_parallel`` GPUs of its own when there
    are GPUs) sit behind one server that routes each request to the replica with the fewest
    outstanding tokens. ``enable_restful_api`` also serves the HTTP gateway (MII's
    ``/mii/{deployment_name}`` and the OpenAI-compatible routes) on ``restful_api_port``
    (0: a free port, see ``client.info.http_url``), answering as ``restful_api_policy`` says
    (hosts, web origins, body size; default: local names only, see `HttpPolicy`). ``engine_config``
    holds `EngineConfig` fields. Stop the deployment with ``client.terminate_server()``.
    """
    config = EngineConfig.from_options(tensor_parallel=tensor_parallel, **engine_config)
    # a path that cannot be loaded fails here, in one line, rather than in a replica's log
    model = str(Path(resolve_model(model, config.load_format)).resolve())
    check_supported(ModelConfig.from_pretrained(model))
    name = registry.check_name(deployment_name or registry.default_name(model))
    if not isinstance(replica_num, int) or replica_num < 1:
        raise ValueError(f"replica_num must be a positive integer, got {replica_num!r}")
    if config.device_ids is not None and replica_num > 1:
        raise ValueError("device_ids is chosen per replica; leave it unset when replica_num > 1")
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
        zmq_port=zmq_port,
        http=enable_restful_api,
        http_host=restful_api_host,
        http_port=restful_api_port,
        http_policy=restful_api_policy or HttpPolicy(),
        start_timeout_s=start_timeout_s,
    )
    log_path = registry.deployment_dir(name) / "server.log"
    process = spawn_module(
        "fastgen.serving.server", [msgspec.json.encode(spec).decode()], log_path, new_session=True
    )
    deadline = time.monotonic() + start_timeout_s + 30.0
    try:
        while True:
            code = process.poll()
            if code is not None:
                raise DeploymentStartError(
                    f"deployment {name!r}: the server process (pid {process.pid}) exited with code {code} "
                    f"while starting; the end of {log_path}:\n{log_tail(log_path, 40)}"
                )
            info = registry.read(name)
            if info is not None and info.server_pid == process.pid:
                return Client(info, process)
            if time.monotonic() > deadline:
                raise DeploymentStartError(
                    f"deployment {name!r} was not ready within {start_timeout_s:.0f} s; "
                    f"the end of {log_path}:\n{log_tail(log_path, 40)}"
                )
            time.sleep(0.05)
    except BaseException:
        kill_group(process.pid)  # the server leads its own process group: replicas go with it
        process.wait()
        raise
