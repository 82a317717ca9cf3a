"""`ZmqExecutor`: step plans fanned out over ZeroMQ to one worker process per tensor-parallel rank.

The engine process (which never imports torch) pushes each msgspec-encoded plan to every rank
over ipc sockets and gathers one answer per rank; rank 0's carries the sampled tokens. Workers are
supervised: start-up has a timeout, a worker that exits is noticed within `_POLL_S` while a step
waits, its error names the rank, exit code and last output lines, and shutdown leaves no process
behind (workers also exit by themselves when the engine process dies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

import zmq

from fastgen.config import EngineConfig
from fastgen.errors import EngineDeadError, StepError
from fastgen.models.config import ModelConfig
from fastgen.plan import StepPlan, StepResult

from .wire import (
    SHUTDOWN,
    PlanCodec,
    Reply,
    ReplyCodec,
    StepDone,
    StepFailed,
    WorkerReady,
    WorkerSpec,
    WorkerStartFailed,
)

logger = logging.getLogger("fastgen.executor")

DEFAULT_RUNNER_FACTORY = "fastgen.worker:build_model_runner"
_POLL_S = 0.2  # how often a waiting executor checks that its workers live
_OUT_OF_STEP_GRACE_S = 5.0  # after one rank failed a step, how long the others may take to answer
_STOP_GRACE_S = 5.0  # after the shutdown frame, how long workers may take to exit
_OUTPUT_LINES = 40  # lines of each worker's output kept for error messages


class WorkerError(EngineDeadError):
    """A worker process failed to start or died; the executor cannot run steps any more."""

    def __init__(self, message: str, *, rank: int | None = None, exit_code: int | None = None):
        super().__init__(message)
        self.rank = rank
        self.exit_code = exit_code


class WorkerStepError(StepError):
    """A step raised inside the workers; only that step's requests fail, the workers keep serving."""

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class _Worker:
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


def _stop_processes(processes: list[subprocess.Popen], socket_dir: str) -> None:
    """Last resort (garbage collection, interpreter exit): kill what runs, remove the sockets."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.wait(timeout=5)
    shutil.rmtree(socket_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _socket_dir() -> str:
    base = tempfile.gettempdir()
    if len(base) > 60 and os.path.isdir("/tmp"):  # ipc paths are limited to ~107 bytes
        base = "/tmp"
    return tempfile.mkdtemp(prefix="fastgen-", dir=base)


class ZmqExecutor:
    """Runs steps in ``tensor_parallel`` worker processes (also useful with one: the model's Python
    then never shares a GIL with the host's event loop)."""

    def __init__(self, spec: WorkerSpec, context: zmq.Context, workers: list[_Worker]):
        self.spec = spec
        self.size = spec.config.tensor_parallel
        self.num_kv_blocks = 0
        self.workers = workers
        self._context = context
        self._plan_codec = PlanCodec()
        self._reply_codec = ReplyCodec()
        self._plan_sockets: list[zmq.Socket] = []
        for rank in range(self.size):
            push = context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.bind(spec.plan_address(rank))
            self._plan_sockets.append(push)
        self._replies = context.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(spec.reply_address)
        self._inbox: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._replies.FD, self._drain)
        self._error: WorkerError | None = None
        self._ready = False
        self._closed = False
        self._finalizer = weakref.finalize(
            self, _stop_processes, [w.process for w in workers], spec.socket_dir
        )

    # -- start-up -------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        model_path: str,
        config: EngineConfig,
        model_config: ModelConfig,
        max_model_len: int,
        *,
        runner_factory: str = DEFAULT_RUNNER_FACTORY,
    ) -> ZmqExecutor:
        """Start the workers and wait (at most ``config.worker_start_timeout_s``) until every
        rank is ready; raises `WorkerError` naming the rank that failed."""
        spec = WorkerSpec(
            model_path=str(model_path),
            config=config,
            model_config=model_config.raw,
            max_model_len=max_model_len,
            socket_dir=_socket_dir(),
            parent_pid=os.getpid(),
            runner_factory=runner_factory,
            log_level=logging.getLogger("fastgen").getEffectiveLevel(),
        )
        spec_file = Path(spec.socket_dir) / "spec.json"
        spec.write(spec_file)
        context = zmq.Context()
        executor = cls(spec, context, [])  # bind the sockets before any worker connects
        try:
            env = cls._worker_environment()
            for rank in range(config.tensor_parallel):
                process = subprocess.Popen(
                    [sys.executable, "-m", "fastgen.worker", str(spec_file), str(rank)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
                executor.workers.append(_Worker(rank, process))
            executor._finalizer.detach()
            executor._finalizer = weakref.finalize(
                executor, _stop_processes, [w.process for w in executor.workers], spec.socket_dir
            )
            await executor._wait_ready(config.worker_start_timeout_s)
        except BaseException:
            await executor.shutdown()
            raise
        return executor

    @staticmethod
    def _worker_environment() -> dict[str, str]:
        env = dict(os.environ)
        env["MASTER_ADDR"] = "127.0.0.1"
        env["MASTER_PORT"] = str(_free_port())
        env["NCCL_NVLS_ENABLE"] = "0"  # NVLink multicast stays off
        env["PYTHONUNBUFFERED"] = "1"
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank is on this host
        return env

    async def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        ready: dict[int, WorkerReady] = {}
        while len(ready) < self.size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = [w for w in self.workers if w.rank not in ready]
                details = "\n".join(f"rank {w.rank}{w.output_tail()}" for w in missing)
                raise WorkerError(
                    f"tensor-parallel worker(s) {[w.rank for w in missing]} not ready after "
                    f"worker_start_timeout_s={timeout_s:g}\n{details}",
                    rank=missing[0].rank,
                )
            reply = await self._next_reply(min(remaining, _POLL_S))
            if reply is None:
                self._check_processes(starting=True)
            elif isinstance(reply, WorkerStartFailed):
                raise WorkerError(
                    f"tensor-parallel worker rank {reply.rank} failed to start:\n{reply.error}",
                    rank=reply.rank,
                )
            elif isinstance(reply, WorkerReady):
                ready[reply.rank] = reply
        blocks = {reply.num_kv_blocks for reply in ready.values()}
        if len(blocks) != 1:
            raise WorkerError(f"ranks disagree on the KV-cache size: {sorted(blocks)} blocks")
        self.num_kv_blocks = blocks.pop()
        self._ready = True
        logger.info("%d worker(s) ready: %d KV blocks", self.size, self.num_kv_blocks)

    # -- steps ----------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        if self._closed or self._error is not None:
            return False
        return all(worker.exit_code is None for worker in self.workers)

    def submit(self, plan: StepPlan) -> asyncio.Future[StepResult]:
        """Send ``plan`` to every rank now; the future resolves to rank 0's result. It raises
        `WorkerStepError` when the step failed on every rank (the workers keep serving), and
        `WorkerError` when a worker died or the ranks fell out of step (the executor is dead)."""
        loop = asyncio.get_running_loop()
        try:
            self._send(plan)
        except WorkerError as exc:
            failed: asyncio.Future[StepResult] = loop.create_future()
            failed.set_exception(exc)
            return failed
        return loop.create_task(self._gather(plan.step_id), name=f"fastgen-step-{plan.step_id}")

    async def execute(self, plan: StepPlan) -> StepResult:
        return await self.submit(plan)

    def _send(self, plan: StepPlan) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise WorkerError("the executor was shut down")
        frame = self._plan_codec.encode(plan)
        for rank, push in enumerate(self._plan_sockets):
            try:
                push.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                self._check_processes()
                raise self._die(WorkerError(f"rank {rank} does not accept plans", rank=rank)) from None

    async def _gather(self, step_id: int) -> StepResult:
        done: dict[int, StepDone] = {}
        failed: dict[int, StepFailed] = {}
        first_failure_s: float | None = None
        while len(done) + len(failed) < self.size:
            reply = await self._next_reply(_POLL_S)
            if reply is None:
                self._check_processes()
                if first_failure_s is not None and time.monotonic() - first_failure_s > _OUT_OF_STEP_GRACE_S:
                    silent = sorted(set(range(self.size)) - set(done) - set(failed))
                    raise self._die(
                        WorkerError(
                            f"step {step_id} failed on rank(s) {sorted(failed)} and rank(s) {silent} "
                            f"did not answer within {_OUT_OF_STEP_GRACE_S:g} s: the ranks are out of step; "
                            f"first error: {_first_line(next(iter(failed.values())).error)}"
                        )
                    )
                continue
            if not isinstance(reply, StepDone | StepFailed) or reply.step_id != step_id:
                logger.warning("ignoring a stray worker reply: %r", reply)
                continue
            if isinstance(reply, StepDone):
                done[reply.rank] = reply
            else:
                failed[reply.rank] = reply
                if first_failure_s is None:
                    first_failure_s = time.monotonic()
        if not failed:
            result = done[0].result
            if result is None:
                raise self._die(WorkerError(f"rank 0 answered step {step_id} without a result", rank=0))
            return result
        self._check_processes()
        first = failed[min(failed)]
        if done:
            raise self._die(
                WorkerError(
                    f"step {step_id} failed on rank(s) {sorted(failed)} but not on {sorted(done)}: "
                    f"the ranks are out of step; error: {_first_line(first.error)}",
                    rank=first.rank,
                )
            )
        logger.error("step %d failed on every rank; rank %d says:\n%s", step_id, first.rank, first.error)
        raise WorkerStepError(_first_line(first.error), first.error)

    def _drain(self) -> None:
        """Move every queued reply into the inbox and wake the waiting step (the reader callback of
        the replies socket: its descriptor only signals edges, so read until nothing is left)."""
        try:
            while self._replies.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._inbox.append(self._reply_codec.decode(self._replies.recv(zmq.NOBLOCK)))
        except zmq.ZMQError:  # closed under us
            return
        if self._inbox and self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _next_reply(self, timeout_s: float) -> Reply | None:
        """The next worker reply, or None after ``timeout_s``."""
        if not self._inbox:
            self._drain()
        if not self._inbox:
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout_s, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._inbox.popleft() if self._inbox else None

    def _check_processes(self, *, starting: bool = False) -> None:
        """Raise `WorkerError` (and stop the other workers) if a worker exited."""
        for worker in self.workers:
            code = worker.exit_code
            if code is not None:
                what = "failed to start" if starting else "died"
                message = f"tensor-parallel worker {what}: {worker.describe_exit()}"
                raise self._die(WorkerError(message, rank=worker.rank, exit_code=code))

    def _die(self, error: WorkerError) -> WorkerError:
        """Mark the executor dead and stop the remaining workers (they may be stuck in a collective)."""
        if self._error is None:
            self._error = error
            logger.error("%s", error)
            for worker in self.workers:
                if worker.exit_code is None:
                    worker.process.terminate()
        return error

    # -- shutdown -------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """Ask the workers to exit, then terminate and kill what is left; idempotent."""
        if self._closed:
            return
        self._closed = True
        graceful = self._ready and self._error is None
        if graceful:  # serving workers finish their step and exit
            for push in self._plan_sockets:
                with contextlib.suppress(zmq.ZMQError):
                    push.send(SHUTDOWN, zmq.NOBLOCK)
            await self._wait_exit(_STOP_GRACE_S)
        for worker in self.workers:
            if worker.exit_code is None:
                if graceful:
                    logger.warning("worker rank %d did not exit; terminating it", worker.rank)
                worker.process.terminate()
        await self._wait_exit(2.0)
        for worker in self.workers:
            if worker.exit_code is None:
                worker.process.kill()
        await self._wait_exit(5.0)
        for worker in self.workers:
            worker.close()
        if not self._loop.is_closed():
            self._loop.remove_reader(self._replies.FD)
        for sock in [*self._plan_sockets, self._replies]:
            sock.close(linger=0)
        self._context.destroy(linger=0)
        self._finalizer()  # removes the socket directory (and would kill any survivor)

    async def _wait_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while any(w.exit_code is None for w in self.workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"
