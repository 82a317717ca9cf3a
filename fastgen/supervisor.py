"""One supervisor for every child process fastgen starts: tensor-parallel workers, deployment
replicas and the deployment server (no torch here).

- `spawn` starts ``python -m MODULE`` with its output appended to a log file, or forwarded line by
  line to our stderr; a ``payload`` (a spec that may hold a secret) goes to its stdin, never to its
  command line, which every local user can read.
- `Child` knows its exit: `wait_exit` is an event (a pidfd watched by the event loop; a waiting
  thread where there is none), and the child is reaped the moment it exits, so none is left a
  zombie; `describe_exit` names the code, the signal and the end of its output; `stop` asks, then
  terminates, then kills.
- `wait_started` (and `wait_started_blocking` for synchronous callers) waits until children report
  ready: a child that exits first raises `ChildExitedError`, the deadline `StartTimeoutError`, both
  with the children's output.
- `RestartPolicy` and `Backoff`: exponential, capped, giving up after N failures in a window.
- `Placement` is where a supervised unit runs: `LocalPlacement` starts a subprocess on this host;
  `fastgen.serving.ray_placement.RayPlacement` starts it through a Ray actor on a cluster's node
  and returns its own `Supervised` handle.
- The child's side: `watch_parent` / `parent_gone` notice that the process that started us is gone.
- For processes started elsewhere (a deployment seen from a client): `pid_alive`, `wait_gone`,
  `kill`, `kill_group`, `log_tail`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import msgspec

from fastgen.errors import FastgenError

_TAIL_LINES = 40  # lines of a forwarded output kept for error messages
_PARENT_POLL_S = 0.5


class ChildExitedError(FastgenError, RuntimeError):
    """A child exited before it reported ready."""

    def __init__(self, child: Supervised):
        self.child = child
        super().__init__(child.describe_exit())


class StartTimeoutError(FastgenError, TimeoutError):
    """Children did not report ready before the deadline."""

    def __init__(self, children: Sequence[Supervised], timeout_s: float):
        self.children = list(children)
        self.timeout_s = timeout_s
        names = ", ".join(child.name for child in children)
        tails = "\n".join(f"{child.name} (pid {child.pid}){child.output_tail()}" for child in children)
        super().__init__(f"{names} not ready after {timeout_s:g} s\n{tails}")


class Supervised(Protocol):
    """What the supervisor needs of a started unit, wherever it runs."""

    name: str

    @property
    def pid(self) -> int | None: ...

    @property
    def exit_code(self) -> int | None:
        """None while it runs."""
        ...

    async def wait_exit(self) -> int:
        """Returns its exit code once it is gone (an event, not a poll)."""
        ...

    def describe_exit(self) -> str:
        """``replica 1 (pid 42) exited with code -9 (SIGKILL)`` and the end of its output."""
        ...

    def exit_summary(self) -> str:
        """``exited with code -9 (SIGKILL)``: no pid, no output (fit for a health answer)."""
        ...

    def output_tail(self) -> str: ...

    async def stop(self, grace_s: float = 5.0) -> int | None:
        """Wait ``grace_s`` for it to exit (after it was asked to), then terminate, then kill."""
        ...


class Child:
    """A child process started by `spawn`."""

    def __init__(self, name: str, process: subprocess.Popen, log_path: Path | None = None):
        self.name = name
        self.process = process
        self.log_path = log_path
        self._output: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._reader: threading.Thread | None = None
        self._exited: asyncio.Future[int] | None = None
        self._pidfd: int | None = None
        if log_path is None and process.stdout is not None:
            self._reader = threading.Thread(target=self._forward, name=f"fastgen-{name}-output", daemon=True)
            self._reader.start()

    def __repr__(self) -> str:
        return f"Child({self.name!r}, pid={self.pid}, exit_code={self.exit_code})"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    # -- output ---------------------------------------------------------------------------------

    def _forward(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        with contextlib.suppress(ValueError, OSError):
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                self._output.append(line)
                with contextlib.suppress(Exception):
                    sys.stderr.write(f"(fastgen {self.name}) {line}\n")

    def output_tail(self, lines: int = 20) -> str:
        if self.log_path is not None:
            text = log_tail(self.log_path, lines)
            return f"; the end of {self.log_path}:\n{text}" if text else f"; {self.log_path} is empty"
        if self._reader is not None:
            self._reader.join(timeout=1.0 if self.exit_code is not None else 0.0)  # the last lines
        tail = list(self._output)[-lines:]
        return "; last output:\n" + "\n".join(tail) if tail else "; it printed nothing"

    def exit_summary(self) -> str:
        return exit_text(self.exit_code)

    def describe_exit(self) -> str:
        return f"{self.name} (pid {self.pid}) {self.exit_summary()}{self.output_tail()}"

    # -- exit -----------------------------------------------------------------------------------

    def _exit_future(self) -> asyncio.Future[int]:
        loop = asyncio.get_running_loop()
        if self._exited is not None and self._exited.get_loop() is loop:
            return self._exited
        future: asyncio.Future[int] = loop.create_future()
        self._exited = future
        code = self.process.poll()
        if code is not None:
            future.set_result(code)
            return future
        try:
            pidfd = os.pidfd_open(self.pid)
            loop.add_reader(pidfd, self._on_pidfd, loop, pidfd, future)
        except (AttributeError, OSError, NotImplementedError):  # no pidfd: a thread waits
            threading.Thread(
                target=self._wait_in_thread,
                args=(loop, future),
                name=f"fastgen-{self.name}-wait",
                daemon=True,
            ).start()
        else:
            self._pidfd = pidfd
        return future

    def _on_pidfd(self, loop: asyncio.AbstractEventLoop, pidfd: int, future: asyncio.Future[int]) -> None:
        self._close_pidfd(loop)
        code = self.process.wait()  # it exited: returns at once, and reaps it
        if not future.done():
            future.set_result(code)

    def _close_pidfd(self, loop: asyncio.AbstractEventLoop) -> None:
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            if not loop.is_closed():
                loop.remove_reader(pidfd)
            os.close(pidfd)

    def _wait_in_thread(self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[int]) -> None:
        code = self.process.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, future, code)

    async def wait_exit(self) -> int:
        return await asyncio.shield(self._exit_future())

    def on_exit(self, callback: Callable[[Child], None]) -> None:
        """Call ``callback(self)`` in the running event loop as soon as the child exits."""
        self._exit_future().add_done_callback(lambda _: callback(self))

    def terminate(self) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    def kill(self) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()

    async def stop(self, grace_s: float = 5.0, terminate_grace_s: float = 2.0) -> int | None:
        for action, wait_s in ((None, grace_s), (self.terminate, terminate_grace_s), (self.kill, 5.0)):
            if action is not None:
                action()
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(self.wait_exit(), wait_s)
        return self.exit_code

    def stop_blocking(self, grace_s: float = 5.0, terminate_grace_s: float = 2.0) -> int | None:
        """`stop` for code without an event loop."""
        for action, wait_s in ((None, grace_s), (self.terminate, terminate_grace_s), (self.kill, 5.0)):
            if action is not None:
                action()
            with contextlib.suppress(subprocess.TimeoutExpired):
                return self.process.wait(wait_s)
        return self.exit_code

    def close(self) -> None:
        """After it exited: finish forwarding its output, release the pipe and the pidfd."""
        if self._reader is not None:
            self._reader.join(timeout=1.0)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._exited is not None:
            self._close_pidfd(self._exited.get_loop())


def exit_text(code: int | None) -> str:
    """``exited with code -9 (SIGKILL)``, or ``is running`` for None."""
    if code is None:
        return "is running"
    text = f"exited with code {code}"
    if code < 0:
        with contextlib.suppress(ValueError):
            text += f" ({signal.Signals(-code).name})"
    return text


def _resolve(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


def spawn(
    name: str,
    module: str,
    args: Sequence[str] = (),
    *,
    payload: bytes | None = None,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    new_session: bool = False,
) -> Child:
    """Start ``python -m module args...``: output appended to ``log_path``, or forwarded to our
    stderr when there is none; ``payload`` is written to its stdin (then closed)."""
    stdin = subprocess.PIPE if payload is not None else subprocess.DEVNULL
    command = [sys.executable, "-m", module, *args]
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                command, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=new_session, close_fds=True,
            )  # fmt: skip
    else:
        process = subprocess.Popen(
            command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            start_new_session=new_session, close_fds=True,
        )  # fmt: skip
    if payload is not None:
        threading.Thread(
            target=_feed, args=(process, payload), name=f"fastgen-{name}-stdin", daemon=True
        ).start()
    return Child(name, process, log_path)


def _feed(process: subprocess.Popen, payload: bytes) -> None:
    """Write the payload in a thread: a pipe holds 64 KiB until the child reads it."""
    assert process.stdin is not None
    with contextlib.suppress(OSError):  # it died before reading: its exit tells why
        process.stdin.write(payload)
    with contextlib.suppress(OSError):
        process.stdin.close()


def read_payload() -> bytes:
    """The child's side of ``spawn(payload=...)``."""
    return sys.stdin.buffer.read()


def kill_all(children: Sequence[Child]) -> None:
    """Last resort (garbage collection, interpreter exit): kill what runs and reap it."""
    for child in children:
        child.kill()
    for child in children:
        with contextlib.suppress(Exception):
            child.process.wait(timeout=5)


# -- waiting for start-up -----------------------------------------------------------------------


def _check_start(
    children: Sequence[Supervised], waiting: Sequence[Supervised], left_s: float, timeout_s: float
):
    for child in children:
        if child.exit_code is not None:
            raise ChildExitedError(child)
    if left_s <= 0:
        raise StartTimeoutError(waiting, timeout_s)


async def wait_started(
    children: Sequence[Supervised],
    pending: Callable[[], Sequence[Supervised]],
    timeout_s: float,
    changed: asyncio.Event,
) -> None:
    """Wait until ``pending()`` (the children not ready yet) is empty; the caller sets ``changed``
    when a child may have become ready. Raises `ChildExitedError` as soon as any of ``children``
    exits, `StartTimeoutError` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while waiting := pending():
        _check_start(children, waiting, deadline - loop.time(), timeout_s)
        changed.clear()
        waits = [
            asyncio.ensure_future(changed.wait()),
            *(asyncio.ensure_future(c.wait_exit()) for c in children),
        ]
        try:
            await asyncio.wait(waits, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()


def wait_started_blocking(
    children: Sequence[Supervised],
    pending: Callable[[], Sequence[Supervised]],
    timeout_s: float,
    poll_s: float = 0.05,
) -> None:
    """`wait_started` for code without an event loop (polls ``pending`` every ``poll_s``)."""
    deadline = time.monotonic() + timeout_s
    while waiting := pending():
        _check_start(children, waiting, deadline - time.monotonic(), timeout_s)
        time.sleep(poll_s)


# -- restarts -----------------------------------------------------------------------------------


class RestartPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a unit that stopped serving is restarted: after ``first_delay_s``, doubling up to
    ``max_delay_s`` while it keeps failing; at the ``max_failures``-th failure within ``window_s``
    the supervisor gives up on it (and says so)."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_failures: int = 5
    window_s: float = 600.0


class Backoff:
    """The failures of one unit under a `RestartPolicy`."""

    def __init__(self, policy: RestartPolicy):
        self.policy = policy
        self._failures: collections.deque[float] = collections.deque()

    def failed(self, now: float | None = None) -> float | None:
        """Record a failure; returns the delay before the next start, or None: give up."""
        now = time.monotonic() if now is None else now
        self._failures.append(now)
        while self._failures and now - self._failures[0] > self.policy.window_s:
            self._failures.popleft()
        count = len(self._failures)
        if count >= self.policy.max_failures:
            return None
        return min(self.policy.max_delay_s, self.policy.first_delay_s * 2 ** (count - 1))

    @property
    def recent_failures(self) -> int:
        return len(self._failures)


# -- placement ----------------------------------------------------------------------------------


class Launch(msgspec.Struct, kw_only=True):
    """What a `Placement` is asked to start."""

    name: str  # e.g. "replica 1"
    module: str  # run as ``python -m module``
    payload: bytes  # its spec (secrets included), delivered privately
    log_path: str  # where its output goes (on the machine that runs it)
    # which group of devices it takes: of its host (a replica: GPUs slot*tp..), or placed by Ray,
    # which placement group (one per replica, kept across its restarts)
    device_slot: int = 0


class Placement(Protocol):
    """Where supervised units run. Starting returns at once; readiness is the unit's own message
    (it connects back to the address in its payload), death is `Supervised.wait_exit`."""

    # True when each unit sees only the devices it was given (Ray sets CUDA_VISIBLE_DEVICES per
    # actor): every unit then takes device slot 0 of what it sees, and shares no cores
    isolates_devices: bool

    def start(self, launch: Launch) -> Supervised: ...

    def close(self) -> None:
        """Release what the placement holds (after every unit it started has exited)."""
        ...


class LocalPlacement:
    """Every unit is a subprocess of this process, on this host."""

    isolates_devices = False

    def start(self, launch: Launch) -> Child:
        return spawn(launch.name, launch.module, payload=launch.payload, log_path=Path(launch.log_path))

    def close(self) -> None:
        pass


# -- the child's side ---------------------------------------------------------------------------


def watch_parent(parent_pid: int, exit_code: int = 3) -> None:
    """Exit this process (at once, from a thread) as soon as ``parent_pid`` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(exit_code)

    threading.Thread(target=watch, name="fastgen-parent-watch", daemon=True).start()


async def parent_gone(parent_pid: int) -> None:
    """Returns once ``parent_pid`` is no longer this process's parent."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(_PARENT_POLL_S)


# -- processes started elsewhere ----------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError, IndexError):
        # the state follows the parenthesised command name, which may itself hold spaces
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive; returns those still alive after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = [pid for pid in pids if pid_alive(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [pid for pid in alive if pid_alive(pid)]
    return alive


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_group(pgid: int) -> None:
    """SIGKILL every process of group ``pgid`` (a deployment server and all it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def log_tail(path: str | Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
