"""The deployment `Router` against scripted replicas: DEALER sockets in this process that speak the
replica protocol (no engines, no processes), so each routing decision can be provoked on purpose."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import zmq

from fastgen import EngineConfig, EngineDeadError, EngineOverloadedError, SamplingParams
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.serving import router as router_module
from fastgen.serving.protocol import Control, Generate, Output, Ready, Reply, decode, encode, error_message
from fastgen.serving.router import Router
from fastgen.serving.zmq_util import make_socket

PROMPT = [5, 6, 7, 8]


class FakeProcess:
    """What the router reads of a replica's process: its pid and whether it exited."""

    def __init__(self, pid: int):
        self.pid = pid
        self.exit_code: int | None = None

    def poll(self) -> int | None:
        return self.exit_code


@dataclass
class ScriptedReplica:
    """Refuses every request when ``full``; answers ``stats`` unless ``stats`` is None (hung)."""

    replica_id: int
    full: bool = False
    stats: EngineStats | None = None
    generates: list[str] = field(default_factory=list)  # request ids, in arrival order

    async def serve(self, address: str) -> None:
        socket = make_socket(zmq.DEALER, identity=f"replica-{self.replica_id}".encode())
        socket.connect(address)
        try:
            blocks = self.stats.num_kv_blocks if self.stats else 0
            await socket.send(encode(Ready(self.replica_id, 1000 + self.replica_id, 64, blocks)))
            while True:
                message = decode(await socket.recv())
                if isinstance(message, Generate):
                    self.generates.append(message.request_id)
                    if self.full:
                        refusal = EngineOverloadedError("4 requests are waiting (max_queued_requests=4)")
                        await socket.send(encode(error_message(message.request_id, refusal)))
                        continue
                    output = RequestOutput(
                        request_id=message.request_id,
                        text=f"from {self.replica_id}",
                        token_ids=[9],
                        prompt_tokens=len(message.prompt),
                        generated_tokens=1,
                        finish_reason="length",
                    )
                    await socket.send(encode(Output(output)))
                elif isinstance(message, Control) and message.command == "stats" and self.stats:
                    await socket.send(encode(Reply(message.request_id, self.stats)))
        finally:
            socket.close()


def stats_of(blocks: int, running: int) -> EngineStats:
    return EngineStats(
        num_running=running,
        num_waiting=1,
        num_kv_blocks=blocks,
        num_free_kv_blocks=blocks - running,
        num_preemptions=0,
        num_steps=7,
        generated_tokens=3 * running,
        prompt_tokens=10,
    )


@contextlib.asynccontextmanager
async def routing(replicas: list[ScriptedReplica], tmp_path) -> AsyncIterator[Router]:
    """A router (its reader and process monitor running) over ``replicas``, once all are ready."""
    config = EngineConfig(enable_prefix_caching=False, max_model_len=64)
    router = Router("scripted", "model", None, config, len(replicas), tmp_path)
    for replica in router.replicas:
        replica.process = FakeProcess(1000 + replica.replica_id)
    serving = [asyncio.create_task(replica.serve(router.address)) for replica in replicas]
    router._tasks += [asyncio.create_task(router._read()), asyncio.create_task(router._monitor())]
    try:
        while not all(replica.ready for replica in router.replicas):
            await asyncio.sleep(0.01)
        yield router
    finally:
        for task in [*serving, *router._tasks]:
            task.cancel()
        await asyncio.gather(*serving, *router._tasks, return_exceptions=True)
        router.socket.close()


async def generate(router: Router) -> list[RequestOutput]:
    params = SamplingParams(max_new_tokens=4)
    return [out async for out in router.stream_outputs(PROMPT, params)]


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_a_full_replica_passes_the_request_on(tmp_path):
    full, free = ScriptedReplica(0, full=True), ScriptedReplica(1)

    async def main():
        async with routing([full, free], tmp_path) as router:
            outputs = await generate(router)
            return outputs, router.replica_infos()

    outputs, infos = run(main())
    assert [(out.text, out.finish_reason) for out in outputs] == [("from 1", "length")]
    # replica 0 was tried first (equal loads: the lower id), refused, and the same request moved on
    assert len(full.generates) == len(free.generates) == 1 and full.generates == free.generates
    assert [(info.requests_routed, info.in_flight, info.outstanding_tokens) for info in infos] == [
        (1, 0, 0),
        (1, 0, 0),
    ]


def test_every_replica_full_is_an_overload_error(tmp_path):
    replicas = [ScriptedReplica(0, full=True), ScriptedReplica(1, full=True)]

    async def main():
        async with routing(replicas, tmp_path) as router:
            with pytest.raises(EngineOverloadedError, match="max_queued_requests"):
                await generate(router)
            return router.replica_infos()

    infos = run(main())
    assert [len(replica.generates) for replica in replicas] == [1, 1]  # each tried once
    assert [(info.in_flight, info.outstanding_tokens) for info in infos] == [(0, 0), (0, 0)]


def test_stats_sum_the_replicas_that_answer_and_skip_dead_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(router_module, "_CONTROL_TIMEOUT_S", 0.5)
    monkeypatch.setattr(router_module, "_MONITOR_PERIOD_S", 0.01)
    replicas = [
        ScriptedReplica(0, stats=stats_of(100, 2)),
        ScriptedReplica(1, stats=stats_of(60, 1)),
        ScriptedReplica(2, stats=None),  # alive but silent: left out after the control timeout
    ]

    async def main():
        async with routing(replicas, tmp_path) as router:
            three = await router.stats()
            router.replicas[1].process.exit_code = -9  # replica 1 dies
            while router.replicas[1].alive:
                await asyncio.sleep(0.01)
            one = await router.stats()
            healthy_with_one = await router.health()
            outputs = await generate(router)  # the dead replica gets nothing
            for replica in (router.replicas[0], router.replicas[2]):
                replica.process.exit_code = 1
            while any(replica.alive for replica in router.replicas):
                await asyncio.sleep(0.01)
            with pytest.raises(EngineDeadError, match="no live replica"):
                await generate(router)
            return three, one, healthy_with_one, outputs, await router.health(), await router.stats()

    three, one, healthy_with_one, outputs, healthy_with_none, none = run(main())
    assert three == EngineStats(3, 2, 160, 157, 0, 14, 9, 20)
    assert one == stats_of(100, 2) and healthy_with_one
    assert outputs[-1].text in ("from 0", "from 2") and replicas[1].generates == []
    assert not healthy_with_none and none == EngineStats(0, 0, 0, 0, 0, 0, 0, 0)
