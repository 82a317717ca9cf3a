"""Deployment discovery: one small JSON file per running deployment in a runtime directory.

The directory is ``$FASTGEN_RUNTIME_DIR`` when set (tests use temporary ones), else
``$XDG_RUNTIME_DIR/fastgen``, else ``~/.cache/fastgen/deployments``. A deployment named ``name``
keeps ``name/deployment.json`` and its processes' logs under ``name/``.

The file holds the deployment's secret key (every request must be sealed with it, see
`fastgen.ipc.Seal`), so only this user may read it: the runtime directory and each deployment's
directory are 0700 (a directory of ours that is more open is closed; one owned by another user is
refused), the file 0600, written atomically.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from pathlib import Path

import msgspec

from fastgen.errors import DeploymentNotFoundError
from fastgen.supervisor import pid_alive

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ReplicaInfo(msgspec.Struct, kw_only=True):
    """One engine process of a deployment, as the server sees it."""

    replica_id: int
    pid: int  # of its current process (a restart changes it)
    alive: bool = True  # serving now
    exit_code: int | None = None  # of its last process, once one exited
    state: str = "serving"  # starting, serving, restarting, failed (given up on) or stopped
    reason: str = ""  # why it does not serve, when it does not
    restarts: int = 0
    requests_routed: int = 0
    in_flight: int = 0
    outstanding_tokens: int = 0
    # where it runs when a cluster placed it (Ray's node id and the node's IP); empty: a
    # subprocess of the server, on the server's host
    node_id: str = ""
    node_ip: str = ""


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
    secret: str | None = None  # the key that seals requests (hex); only in the registry file

    def public(self) -> DeploymentInfo:
        """The same without the secret (what the ``info`` command answers)."""
        return msgspec.structs.replace(self, secret=None)


def runtime_dir() -> Path:
    """The directory holding the registry (created on first use, 0700)."""
    if os.environ.get("FASTGEN_RUNTIME_DIR"):
        path = Path(os.environ["FASTGEN_RUNTIME_DIR"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "fastgen"
    else:
        path = Path.home() / ".cache" / "fastgen" / "deployments"
    return _private(path)


def _private(path: Path) -> Path:
    """``path`` as a directory only this user can enter: created 0700, or closed to 0700 when it is
    ours; a directory (or a link) owned by someone else is refused."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise PermissionError(f"{path} is not a directory of this user: it cannot hold deployment secrets")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)
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
    """The directory of deployment ``name`` (created 0700): its registry file and its logs."""
    return _private(runtime_dir() / check_name(name))


def register(info: DeploymentInfo) -> Path:
    """Publish ``info`` atomically (readers never see half a file), readable by this user alone."""
    path = deployment_dir(info.name) / "deployment.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(info))
    tmp.replace(path)
    return path


def unregister(name: str) -> None:
    """Forget a deployment (its file and logs)."""
    shutil.rmtree(deployment_dir(name), ignore_errors=True)


def read(name: str) -> DeploymentInfo | None:
    """The registered info of ``name`` (``None`` when absent or unreadable)."""
    path = runtime_dir() / check_name(name) / "deployment.json"
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
