"""`ZmqExecutor`: step plans fanned out over ZeroMQ to one worker process per tensor-parallel rank.

The engine process pushes each msgspec-encoded plan to every rank over ipc sockets (in a 0700
directory: no other user can connect) and gathers one answer per rank; rank 0's carries the
sampled tokens (this module imports no torch; the workers do). Workers are supervised
(`fastgen.supervisor`): start-up has a timeout; a worker that exits is noticed at once (an exit
event), which stops the other ranks (they may wait in a collective for it) and fails the waiting
step with an error naming the rank, exit code and last output lines; every worker is reaped as it
exits. A step that gets no answer within ``step_timeout_s`` (a worker alive but hung) kills the
executor and names the silent ranks; shutdown leaves no process behind (workers also exit by
themselves when the engine process dies).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import sys
import time
import weakref
from pathlib import Path

import zmq

from fastgen.config import EngineConfig
from fastgen.errors import EngineDeadError, StepError
from fastgen.ipc import free_port, private_dir
from fastgen.models.config import ModelConfig
from fastgen.plan import StepPlan, StepResult
from fastgen.supervisor import Child, ChildExitedError, StartTimeoutError, kill_all, spawn, wait_started

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

DEFAULT_RUNNER_FACTORY = "fastgen.worker:build_model_runner"  # "module:callable" (see fastgen.worker)
_POLL_S = 0.2  # how often a waiting executor checks that its workers live
_OUT_OF_STEP_GRACE_S = 5.0  # after one rank failed a step, how long the others may take to answer
_STOP_GRACE_S = 5.0  # after the shutdown frame, how long workers may take to exit


class WorkerError(EngineDeadError):
    """A worker process failed to start or died; the executor cannot run steps any more."""

    def __init__(
        self, message: str, *, rank: int | None = None, exit_code: int | None = None, summary: str = ""
    ):
        super().__init__(message)
        self.rank = rank
        self.exit_code = exit_code
        # one line without pids or output, for health reports (default: the message's first line)
        self.summary = summary or message.strip().splitlines()[0]


class WorkerStepError(StepError):
    """A step raised inside the workers; only that step's requests fail, the workers keep serving."""

    def __init__(self, message: str, remote_traceback: str = ""):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class ZmqExecutor:
    """Runs steps in ``tensor_parallel`` worker processes (also useful with one: the model's Python
    then never shares a GIL with the host's event loop)."""

    def __init__(self, spec: WorkerSpec, context: zmq.Context, workers: list[Child]):
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
        self._inbox: collections.deque[Reply] = collections.deque()  # start-up replies
        self._answers: dict[int, dict[int, StepDone | StepFailed]] = {}  # step -> rank -> answer
        self._received = 0
        self._waiter: asyncio.Future[None] | None = None
        self._replied = asyncio.Event()  # a reply arrived (start-up waits on it)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._replies.FD, self._drain)
        self._error: WorkerError | None = None
        self._last_step: asyncio.Task[StepResult] | None = None
        self._ready = False
        self._closed = False
        self._finalizer = weakref.finalize(self, _release, workers, spec.socket_dir)

    # -- start-up -------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        model_path: str,
        config: EngineConfig,
        model_config: ModelConfig,
        max_model_len: int,
        *,
        runner_factory: str | None = None,
    ) -> ZmqExecutor:
        """Start the workers and wait (at most ``config.worker_start_timeout_s``) until every
        rank is ready; raises `WorkerError` naming the rank that failed."""
        spec = WorkerSpec(
            model_path=str(model_path),
            config=config,
            model_config=model_config.raw,
            max_model_len=max_model_len,
            socket_dir=private_dir(),
            parent_pid=os.getpid(),
            runner_factory=runner_factory or DEFAULT_RUNNER_FACTORY,
            log_level=logging.getLogger("fastgen").getEffectiveLevel(),
        )
        spec_file = Path(spec.socket_dir) / "spec.json"
        spec.write(spec_file)
        context = zmq.Context()
        executor = cls(spec, context, [])  # bind the sockets before any worker connects
        try:
            env = worker_environment()
            for rank in range(config.tensor_parallel):
                worker = spawn(f"rank {rank}", "fastgen.worker", [str(spec_file), str(rank)], env=env)
                executor.workers.append(worker)  # the finalizer holds this list
                worker.on_exit(executor._worker_exited)
            await executor._wait_ready(config.worker_start_timeout_s)
        except BaseException:
            await executor.shutdown()
            raise
        return executor

    async def _wait_ready(self, timeout_s: float) -> None:
        ready: dict[int, WorkerReady] = {}

        def pending() -> list[Child]:
            self._drain()  # the socket's descriptor signals edges only: read what is queued
            while self._inbox:
                reply = self._inbox.popleft()
                if isinstance(reply, WorkerStartFailed):
                    raise WorkerError(
                        f"tensor-parallel worker rank {reply.rank} failed to start:\n{reply.error}",
                        rank=reply.rank,
                    )
                if isinstance(reply, WorkerReady):
                    ready[reply.rank] = reply
            return [worker for rank, worker in enumerate(self.workers) if rank not in ready]

        try:
            await wait_started(self.workers, pending, timeout_s, self._replied)
        except ChildExitedError as exc:
            rank = self.workers.index(exc.child)  # type: ignore[arg-type]
            message = f"tensor-parallel worker failed to start: {exc}"
            raise self._die(WorkerError(message, rank=rank, exit_code=exc.child.exit_code)) from None
        except StartTimeoutError as exc:
            ranks = [self.workers.index(child) for child in exc.children]  # type: ignore[arg-type]
            details = "\n".join(f"{child.name}{child.output_tail()}" for child in exc.children)
            raise WorkerError(
                f"tensor-parallel worker(s) {ranks} not ready after "
                f"worker_start_timeout_s={timeout_s:g}\n{details}",
                rank=ranks[0],
            ) from None
        blocks = {reply.num_kv_blocks for reply in ready.values()}
        if len(blocks) != 1:
            raise WorkerError(f"ranks disagree on the KV-cache size: {sorted(blocks)} blocks")
        self.num_kv_blocks = blocks.pop()
        self._ready = True
        logger.info("%d worker(s) ready: %d KV blocks", self.size, self.num_kv_blocks)

    def _worker_exited(self, worker: Child) -> None:
        """A worker exited (it is reaped already): while serving, that kills the executor at once,
        stopping the other ranks, and wakes the step that waits."""
        if self._ready and not self._closed:
            with contextlib.suppress(WorkerError):
                self._check_processes()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- steps ----------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        if not self._closed:
            self._note_exits()
        return not self._closed and self._error is None

    @property
    def error(self) -> WorkerError | None:
        """Why the executor died (None while it is alive or after a clean shutdown)."""
        if not self._closed:
            self._note_exits()
        return self._error

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
        self._answers[plan.step_id] = {}
        step = loop.create_task(
            self._gather(plan.step_id, self._last_step), name=f"fastgen-step-{plan.step_id}"
        )
        self._last_step = step
        return step

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

    async def _gather(self, step_id: int, previous: asyncio.Task[StepResult] | None) -> StepResult:
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])  # one waiting step at a time: the oldest
            return await self._await_answers(step_id)
        finally:
            self._answers.pop(step_id, None)

    async def _await_answers(self, step_id: int) -> StepResult:
        answers = self._answers[step_id]
        first_failure_s: float | None = None
        timeout_s = self.spec.config.step_timeout_s
        # the workers run plans in order: this step's clock starts once the previous one answered
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(answers) < self.size:
            if self._error is not None:
                raise self._error
            if not await self._wait_for_replies(_POLL_S):
                self._check_processes()
            if deadline is not None and len(answers) < self.size and time.monotonic() > deadline:
                raise self._die(self._timed_out(step_id, timeout_s, answers))
            if first_failure_s is None and any(isinstance(a, StepFailed) for a in answers.values()):
                first_failure_s = time.monotonic()
            if first_failure_s is not None and time.monotonic() - first_failure_s > _OUT_OF_STEP_GRACE_S:
                failed = sorted(r for r, a in answers.items() if isinstance(a, StepFailed))
                silent = sorted(set(range(self.size)) - set(answers))
                first = answers[failed[0]]
                assert isinstance(first, StepFailed)
                raise self._die(
                    WorkerError(
                        f"step {step_id} failed on rank(s) {failed} and rank(s) {silent} did not answer "
                        f"within {_OUT_OF_STEP_GRACE_S:g} s: the ranks are out of step; "
                        f"first error: {_first_line(first.error)}"
                    )
                )
        done = sorted(rank for rank, answer in answers.items() if isinstance(answer, StepDone))
        failed = [answer for answer in answers.values() if isinstance(answer, StepFailed)]
        if not failed:
            result = answers[0].result  # type: ignore[union-attr]
            if result is None:
                raise self._die(WorkerError(f"rank 0 answered step {step_id} without a result", rank=0))
            return result
        self._check_processes()
        first = min(failed, key=lambda answer: answer.rank)
        if done:
            raise self._die(
                WorkerError(
                    f"step {step_id} failed on rank(s) {sorted(a.rank for a in failed)} but not on {done}: "
                    f"the ranks are out of step; error: {_first_line(first.error)}",
                    rank=first.rank,
                )
            )
        logger.error("step %d failed on every rank; rank %d says:\n%s", step_id, first.rank, first.error)
        raise WorkerStepError(_first_line(first.error), first.error)

    def _timed_out(
        self, step_id: int, timeout_s: float, answers: dict[int, StepDone | StepFailed]
    ) -> WorkerError:
        silent = [rank for rank in range(self.size) if rank not in answers]
        details = "\n".join(
            f"rank {rank} (pid {self.workers[rank].pid}){self.workers[rank].output_tail()}" for rank in silent
        )
        return WorkerError(
            f"step {step_id} timed out: rank(s) {silent} did not answer within "
            f"step_timeout_s={timeout_s:g} (hung: stuck in a collective, deadlocked or on a stuck "
            f"device); the workers are stopped\n{details}",
            rank=silent[0],
        )

    def _drain(self) -> None:
        """Sort every queued reply to its step (or the start-up inbox) and wake the waiting task
        (the reader callback of the replies socket: its descriptor only signals edges, so read
        until nothing is left)."""
        received = self._received
        try:
            while self._replies.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                reply = self._reply_codec.decode(self._replies.recv(zmq.NOBLOCK))
                self._received += 1
                if isinstance(reply, StepDone | StepFailed):
                    answers = self._answers.get(reply.step_id)
                    if answers is None:  # a step whose caller went away (cancelled)
                        logger.debug("dropping an answer to step %d", reply.step_id)
                    else:
                        answers[reply.rank] = reply
                else:
                    self._inbox.append(reply)
        except zmq.ZMQError:  # closed under us
            return
        if self._received > received:
            self._replied.set()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    async def _wait_for_replies(self, timeout_s: float) -> bool:
        """Wait until a reply arrives (True) or ``timeout_s`` passes (False)."""
        received = self._received
        self._drain()
        if self._received == received:
            waiter = self._waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout_s, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._received > received

    def _check_processes(self) -> None:
        """Raise `WorkerError` (and stop the other workers) if a worker exited."""
        self._note_exits()
        if self._error is not None:
            raise self._error

    def _note_exits(self) -> None:
        """Mark the executor dead, naming the worker, once any worker has exited; a reader of
        `is_alive` or `error` must never see a dead worker without its reason."""
        if self._error is not None:
            return
        for rank, worker in enumerate(self.workers):
            code = worker.exit_code
            if code is not None:
                message = f"tensor-parallel worker died: {worker.describe_exit()}"
                summary = f"tensor-parallel worker rank {rank} {worker.exit_summary()}"
                self._die(WorkerError(message, rank=rank, exit_code=code, summary=summary))
                return

    def _die(self, error: WorkerError) -> WorkerError:
        """Mark the executor dead and stop the remaining workers (they may be stuck in a collective;
        `shutdown` kills those that ignore the terminate signal)."""
        if self._error is None:
            self._error = error
            logger.error("%s", error)
            for worker in self.workers:
                worker.terminate()
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
        for rank, worker in enumerate(self.workers):
            if worker.exit_code is None:
                if graceful:
                    logger.warning("worker rank %d did not exit; terminating it", rank)
                worker.terminate()
        await self._wait_exit(2.0)
        for worker in self.workers:
            worker.kill()
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
        waits = [asyncio.ensure_future(w.wait_exit()) for w in self.workers if w.exit_code is None]
        if waits:
            await asyncio.wait(waits, timeout=timeout_s)
            for wait in waits:
                wait.cancel()


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


def _release(workers: list[Child], socket_dir: str) -> None:
    """Last resort (garbage collection, interpreter exit): kill what runs, remove the sockets."""
    kill_all(workers)
    shutil.rmtree(socket_dir, ignore_errors=True)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "(no message)"
