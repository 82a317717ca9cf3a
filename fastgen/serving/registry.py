"""Deployment discovery: one small JSON file per running deployment in a runtime directory.

The directory is ``$FASTGEN_RUNTIME_DIR`` when set (tests use temporary ones), else
``$XDG_RUNTIME_DIR/fastgen``, else ``~/.cache/fastgen/deployments``. A deployment named ``name``
keeps ``name/deployment.json`` and its processes' logs under ``name/``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import msgspec

from fastgen.errors import DeploymentNotFoundError

from .processes import pid_alive

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReplicaInfo(msgspec.Struct, kw_only=True):
    """One engine process of a deployment, as the server sees it."""

    replica_id: int
    pid: int
    alive: bool = True
    exit_code: int | None = None
    requests_routed: int = 0
    in_flight: int = 0
    outstanding_tokens: int = 0


class DeploymentInfo(msgspec.Struct, kw_only=True):
    """What a client needs to find and talk to a deployment."""

    name: str
    model: str
    address: str  # the server's ZeroMQ ROUTER, e.g. tcp://127.0.0.1:41234
    server_pid: int
    replicas: list[ReplicaInfo]
    max_model_len: int
    tensor_parallel: int = 1
    http_url: str | None = None
    log_dir: str = ""


def runtime_dir() -> Path:
    """The directory holding the registry (created on first use)."""
    if os.environ.get("FASTGEN_RUNTIME_DIR"):
        path = Path(os.environ["FASTGEN_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fastgen"
    else:
        path = Path.home() / ".cache" / "fastgen" / "deployments"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid deployment name {name!r}: use letters, digits, '.', '_' and '-' (at most 128)"
        )
    return name


def default_name(model: str) -> str:
    """MII-style default: the model directory's name followed by ``-deployment``."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", Path(model.rstrip("/")).name or "model").lstrip("._-")
    return f"{base or 'model'}-deployment"[:128]


def deployment_dir(name: str) -> Path:
    return runtime_dir() / check_name(name)


def register(info: DeploymentInfo) -> Path:
    """Publish ``info`` atomically (readers never see half a file)."""
    directory = deployment_dir(info.name)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "deployment.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(msgspec.json.encode(info))
    tmp.replace(path)
    return path


def unregister(name: str) -> None:
    """Forget a deployment (its file and logs)."""
    shutil.rmtree(deployment_dir(name), ignore_errors=True)


def read(name: str) -> DeploymentInfo | None:
    """The registered info of ``name`` (``None`` when absent or unreadable)."""
    path = deployment_dir(name) / "deployment.json"
    try:
        return msgspec.json.decode(path.read_bytes(), type=DeploymentInfo)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None


def list_deployments() -> list[DeploymentInfo]:
    """Every registered deployment whose server is alive; stale entries are removed."""
    found = []
    for path in sorted(runtime_dir().glob("*/deployment.json")):
        info = read(path.parent.name)
        if info is None:
            continue
        if pid_alive(info.server_pid):
            found.append(info)
        else:
            unregister(info.name)
    return found


def lookup(name_or_model: str) -> DeploymentInfo:
    """Find a live deployment by name, else by the model it serves (path or directory name)."""
    name_or_model = str(name_or_model)
    live = list_deployments()
    for info in live:
        if info.name == name_or_model:
            return info
    wanted = {name_or_model, os.path.abspath(name_or_model), Path(name_or_model.rstrip("/")).name}
    for info in live:
        if info.model in wanted or Path(info.model).name in wanted:
            return info
    known = ", ".join(info.name for info in live) or "none"
    raise DeploymentNotFoundError(
        f"no running deployment named {name_or_model!r} in {runtime_dir()} (running: {known})"
    )
