"""A deployment's engine process: an `AsyncEngine` behind a ZeroMQ DEALER socket connected to the
deployment server's ROUTER.

``python -m fastgen.serving.replica`` reads its `ReplicaSpec` (which holds the deployment's key)
from stdin: its supervisor starts it (`fastgen.supervisor`). The replica announces itself with a
`Ready` message, then serves `Generate`, `Cancel` and `Control` messages until told to shut down
or until its parent (the server) dies. Everything it sends is sealed with the deployment's key.

When its engine can no longer serve (a tensor-parallel worker died, the step loop stopped) it
says so with an `EngineDown` message, stops the engine (reaping its workers) and exits with code
1: the router has stopped routing to it and fails its requests, and its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

import msgspec
import zmq
import zmq.asyncio

from fastgen.config import EngineConfig
from fastgen.engine import AsyncEngine
from fastgen.ipc import Seal, make_socket
from fastgen.loops import new_event_loop
from fastgen.supervisor import parent_gone, read_payload

from .backend import EngineBackend
from .protocol import (
    Cancel,
    Control,
    EngineDown,
    Error,
    Generate,
    Output,
    Ready,
    ReplicaSpec,
    Reply,
    decode,
    encode,
    error_message,
)

logger = logging.getLogger("fastgen.serving.replica")

HEALTH_POLL_S = 0.05  # how often the replica checks that its engine can serve (a few attribute reads)
EXIT_ENGINE_DOWN = 1


def assign_devices(config: EngineConfig, device_slot: int, replicas_on_host: int) -> EngineConfig:
    """A replica in device slot ``i`` of a GPU host gets GPUs ``i*tp .. i*tp+tp-1`` unless its
    config names them (a device_map); on CPU nothing changes, except that the replicas share the
    cores instead of each taking all of them."""
    import torch

    on_cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
    if not on_cuda:
        if config.device_ids is not None:
            logger.warning("device ids %s ignored: this replica runs on the CPU", config.device_ids)
        if config.device in ("auto", "cpu") and replicas_on_host > 1:
            from fastgen.runner import cpu_threads

            threads = cpu_threads(config, config.tensor_parallel, engines=replicas_on_host)
            return config.replace(cpu_threads=threads)
        return config
    if config.device_ids is not None:
        visible = torch.cuda.device_count()
        if max(config.device_ids) >= visible:
            raise RuntimeError(
                f"replica slot {device_slot} was given GPUs {config.device_ids} but only {visible} are "
                f"visible (ids 0..{visible - 1})"
            )
        return config
    first = device_slot * config.tensor_parallel
    needed = first + config.tensor_parallel
    if torch.cuda.device_count() < needed:
        raise RuntimeError(
            f"replica slot {device_slot} needs GPUs {first}..{needed - 1} "
            f"(tensor_parallel={config.tensor_parallel}) "
            f"but only {torch.cuda.device_count()} are visible"
        )
    return config.replace(device_ids=list(range(first, needed)))


def engine_failure(engine: AsyncEngine) -> str:
    """Why ``engine`` cannot serve, in one line without pids or paths."""
    error = getattr(engine.executor, "error", None)  # the ZmqExecutor knows which worker died
    if error is not None:
        return getattr(error, "summary", None) or str(error).splitlines()[0]
    return "its step loop stopped"


async def engine_down(engine: AsyncEngine) -> str:
    """Returns (why) once ``engine`` can no longer serve."""
    while engine.is_healthy:
        await asyncio.sleep(HEALTH_POLL_S)
    return engine_failure(engine)


class Replica:
    """Serves one engine over one DEALER socket; one task per request."""

    def __init__(self, engine: AsyncEngine, socket: zmq.asyncio.Socket, seal: Seal):
        self.engine = engine
        self.backend = EngineBackend(engine)
        self.socket = socket
        self.seal = seal
        self._tasks: dict[str, asyncio.Task] = {}

    async def send(self, message) -> None:
        await self.socket.send(self.seal.seal(encode(message)))

    async def run(self) -> None:
        """Serve until a ``shutdown`` control message arrives."""
        while True:
            data = await self.socket.recv()
            try:
                message = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.error("dropping an undecodable message: %s", exc)
                continue
            if isinstance(message, Generate):
                if message.request_id in self._tasks:
                    await self.send(
                        Error(message.request_id, "InvalidRequestError", "already in use", "request_id")
                    )
                    continue
                task = asyncio.create_task(self._generate(message))
                self._tasks[message.request_id] = task
            elif isinstance(message, Cancel):
                task = self._tasks.get(message.request_id)
                if task is not None:
                    task.cancel()
            elif isinstance(message, Control):
                if message.command == "shutdown":
                    await self.send(Reply(message.request_id, "ok"))
                    return
                await self._control(message)

    async def _control(self, message: Control) -> None:
        if message.command == "stats":
            await self.send(Reply(message.request_id, self.engine.stats()))
        elif message.command == "ping":
            await self.send(Reply(message.request_id, "pong" if self.engine.is_healthy else "unhealthy"))
        else:
            await self.send(Error(message.request_id, "InvalidRequestError", "unknown command", "command"))

    async def _generate(self, message: Generate) -> None:
        outputs = self.backend.stream_outputs(message.prompt, message.params, request_id=message.request_id)
        try:
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    await self.send(Output(output))
        except asyncio.CancelledError:
            pass  # cancelled by the server: closing the stream aborted the request
        except Exception as exc:
            await self.send(error_message(message.request_id, exc))
        finally:
            self._tasks.pop(message.request_id, None)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve_replica(spec: ReplicaSpec) -> int:
    """Start the engine, serve, stop; returns the process exit code."""
    parent_pid = os.getppid()
    config = assign_devices(spec.config, spec.device_slot, spec.replicas_on_host)
    engine = await AsyncEngine.start(spec.model, config)
    socket = make_socket(zmq.DEALER, identity=bytes.fromhex(spec.identity))
    socket.connect(spec.address)
    replica = Replica(engine, socket, Seal.from_hex(spec.key))
    code = 0
    try:
        stats = engine.stats()
        await replica.send(Ready(spec.replica_id, os.getpid(), engine.max_model_len, stats.num_kv_blocks))
        logger.info("replica %d ready (pid %d)", spec.replica_id, os.getpid())
        serving = asyncio.create_task(replica.run())
        orphaned = asyncio.create_task(parent_gone(parent_pid))
        failing = asyncio.create_task(engine_down(engine))
        done, pending = await asyncio.wait((serving, orphaned, failing), return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if orphaned in done:
            logger.error("the deployment server (pid %d) is gone: exiting", parent_pid)
        if failing in done:
            reason = failing.result()
            logger.error("replica %d: the engine cannot serve (%s): exiting", spec.replica_id, reason)
            with contextlib.suppress(zmq.ZMQError):
                await replica.send(EngineDown(spec.replica_id, reason))
            code = EXIT_ENGINE_DOWN
        for task in done:
            if task is not failing:
                task.result()
    finally:
        await replica.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(engine.stop(), 10)
        socket.close(linger=1000 if code else 0)  # let the EngineDown message leave
    return code


def main() -> int:
    spec = msgspec.json.decode(read_payload(), type=ReplicaSpec)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s replica-{spec.replica_id} %(levelname)s %(message)s"
    )
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        code = runner.run(serve_replica(spec))
    logger.info("replica %d stopped", spec.replica_id)
    return code


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(
            "usage: python -m fastgen.serving.replica < SPEC_JSON (started by a deployment)", file=sys.stderr
        )
        sys.exit(2)
    code = main()
    logging.shutdown()
    os._exit(code)  # everything is released; skip the interpreter's slow teardown of torch
