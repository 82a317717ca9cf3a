"""A deployment's engine process: an `AsyncEngine` behind a ZeroMQ DEALER socket connected to the
deployment server's ROUTER.

``python -m fastgen.serving.replica --address ADDR --replica-id I --replicas N --model PATH
--config JSON``. The replica announces itself with a `Ready` message, then serves `Generate`,
`Cancel` and `Control` messages until told to shut down or until its parent (the server) dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os

import msgspec
import zmq
import zmq.asyncio

from fastgen.config import EngineConfig
from fastgen.engine import AsyncEngine
from fastgen.loops import new_event_loop

from .backend import EngineBackend
from .protocol import Cancel, Control, Error, Generate, Output, Ready, Reply, decode, encode, error_message
from .zmq_util import make_socket

logger = logging.getLogger("fastgen.serving.replica")

_PARENT_POLL_S = 0.5


def assign_devices(config: EngineConfig, replica_id: int, num_replicas: int) -> EngineConfig:
    """Replica ``i`` of a GPU deployment gets GPUs ``i*tp .. i*tp+tp-1``; on CPU nothing changes,
    except that the replicas share the cores instead of each taking all of them."""
    import torch

    on_cuda = config.device in ("auto", "cuda") and torch.cuda.is_available()
    if not on_cuda:
        if config.device in ("auto", "cpu") and num_replicas > 1:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_replicas))
        return config
    if config.device_ids is not None:
        return config
    first = replica_id * config.tensor_parallel
    needed = first + config.tensor_parallel
    if torch.cuda.device_count() < needed:
        raise RuntimeError(
            f"replica {replica_id} needs GPUs {first}..{needed - 1} "
            f"(tensor_parallel={config.tensor_parallel}) "
            f"but only {torch.cuda.device_count()} are visible"
        )
    return config.replace(device_ids=list(range(first, needed)))


class Replica:
    """Serves one engine over one DEALER socket; one task per request."""

    def __init__(self, engine: AsyncEngine, socket: zmq.asyncio.Socket):
        self.engine = engine
        self.backend = EngineBackend(engine)
        self.socket = socket
        self._tasks: dict[str, asyncio.Task] = {}

    async def send(self, message) -> None:
        await self.socket.send(encode(message))

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


async def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await asyncio.sleep(_PARENT_POLL_S)
    logger.error("the deployment server (pid %d) is gone: exiting", parent_pid)


async def serve_replica(
    address: str, replica_id: int, num_replicas: int, model: str, config: EngineConfig
) -> None:
    parent_pid = os.getppid()
    config = assign_devices(config, replica_id, num_replicas)
    engine = await AsyncEngine.start(model, config)
    socket = make_socket(zmq.DEALER, identity=f"replica-{replica_id}".encode())
    socket.connect(address)
    replica = Replica(engine, socket)
    try:
        stats = engine.stats()
        await replica.send(Ready(replica_id, os.getpid(), engine.max_model_len, stats.num_kv_blocks))
        logger.info("replica %d ready (pid %d)", replica_id, os.getpid())
        serving = asyncio.create_task(replica.run())
        watching = asyncio.create_task(_watch_parent(parent_pid))
        done, pending = await asyncio.wait((serving, watching), return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()
    finally:
        await replica.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(engine.stop(), 10)
        socket.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgen.serving.replica")
    parser.add_argument("--address", required=True)
    parser.add_argument("--replica-id", type=int, required=True)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s replica-{args.replica_id} %(levelname)s %(message)s"
    )
    config = msgspec.json.decode(args.config, type=EngineConfig)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(serve_replica(args.address, args.replica_id, args.replicas, args.model, config))
    logger.info("replica %d stopped", args.replica_id)
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    os._exit(code)  # everything is released; skip the interpreter's slow teardown of torch
