"""Worker processes of the `ZmqExecutor`: spawning, forwarding their output, describing how they
exited, and killing them as a last resort."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

_OUTPUT_LINES = 40  # lines of each worker's output kept for error messages


class WorkerProcess:
    """One worker process and the tail of its output (which is forwarded to our stderr)."""

    def __init__(self, rank: int, process: subprocess.Popen):
        self.rank = rank
        self.process = process
        self.output: collections.deque[str] = collections.deque(maxlen=_OUTPUT_LINES)
        self._reader = threading.Thread(
            target=self._forward, name=f"fastgen-worker-{rank}-output", daemon=True
        )
        self._reader.start()

    def _forward(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        with contextlib.suppress(ValueError, OSError):
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self.output.append(line)
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"(fastgen worker {self.rank}) {line}\n")

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def describe_exit(self) -> str:
        """``rank 1 (pid 42) exited with code -9 (SIGKILL); last output: ...``."""
        self._reader.join(timeout=1.0)  # let the last lines arrive
        code = self.process.returncode
        how = f"exited with code {code}"
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                how += f" ({signal.Signals(-code).name})"
        return f"rank {self.rank} (pid {self.process.pid}) {how}{self.output_tail()}"

    def close(self) -> None:
        """After the process exited: finish forwarding its output and close the pipe."""
        self._reader.join(timeout=1.0)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def output_tail(self) -> str:
        lines = list(self.output)[-15:]
        return "; last output:\n" + "\n".join(lines) if lines else "; it printed nothing"


def stop_processes(processes: list[subprocess.Popen], socket_dir: str) -> None:
    """Last resort (garbage collection, interpreter exit): kill what runs, remove the sockets."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.wait(timeout=5)
    shutil.rmtree(socket_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_socket_dir() -> str:
    base = tempfile.gettempdir()
    if len(base) > 60 and os.path.isdir("/tmp"):  # ipc paths are limited to ~107 bytes
        base = "/tmp"
    return tempfile.mkdtemp(prefix="fastgen-", dir=base)


def spawn(spec_file: str, rank: int, env: dict[str, str]) -> WorkerProcess:
    """Start ``python -m fastgen.worker SPEC_FILE RANK`` with its output piped to us."""
    process = subprocess.Popen(
        [sys.executable, "-m", "fastgen.worker", spec_file, str(rank)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return WorkerProcess(rank, process)


def worker_environment() -> dict[str, str]:
    """Our environment plus the rendezvous of ``torch.distributed`` on this host."""
    env = dict(os.environ)
    env["MASTER_ADDR"] = "127.0.0.1"
    env["MASTER_PORT"] = str(free_port())
    env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off
    env["PYTHONUNBUFFERED"] = "1"
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this host
    return env
