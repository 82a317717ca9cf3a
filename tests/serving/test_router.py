"""The deployment `Router` against scripted replicas: DEALER sockets in this process that speak the
replica protocol (no engines, no processes), started by a fake `Placement` from the same spec a
real replica reads, so each routing and supervision decision can be provoked on purpose."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import pytest
import zmq

from fastgen import EngineConfig, EngineDeadError, EngineOverloadedError, SamplingParams
from fastgen.ipc import Seal, make_socket
from fastgen.outputs import EngineStats, RequestOutput
from fastgen.serving import router as router_module
from fastgen.serving.errors import DeploymentStartError
from fastgen.serving.protocol import (
    Control,
    EngineDown,
    Generate,
    Output,
    Ready,
    ReplicaSpec,
    Reply,
    decode,
    encode,
    error_message,
)
from fastgen.serving.router import Router
from fastgen.supervisor import Launch, RestartPolicy

PROMPT = [5, 6, 7, 8]
QUICK = RestartPolicy(first_delay_s=0.01, max_delay_s=0.01)


@dataclass
class ScriptedReplica:
    """Refuses every request when ``full``; answers ``stats`` unless ``stats`` is None (hung);
    the first ``hold`` requests stay open (no output) until the replica goes away."""

    replica_id: int
    full: bool = False
    stats: EngineStats | None = None
    hold: int = 0
    key: str | None = None  # seal with this key instead of the deployment's (an impostor)
    generates: list[str] = field(default_factory=list)  # request ids, in arrival order
    socket: zmq.asyncio.Socket | None = None

    async def serve(self, spec: ReplicaSpec) -> None:
        socket = self.socket = make_socket(zmq.DEALER, identity=bytes.fromhex(spec.identity))
        seal = Seal.from_hex(self.key or spec.key)
        socket.connect(spec.address)

        async def send(message) -> None:
            await socket.send(seal.seal(encode(message)))

        try:
            blocks = self.stats.num_kv_blocks if self.stats else 0
            await send(Ready(self.replica_id, 1000 + self.replica_id, 64, blocks))
            while True:
                message = decode(await socket.recv())
                if isinstance(message, Generate):
                    self.generates.append(message.request_id)
                    if self.full:
                        refusal = EngineOverloadedError("4 requests are waiting (max_queued_requests=4)")
                        await send(error_message(message.request_id, refusal))
                        continue
                    if self.hold:
                        self.hold -= 1
                        continue
                    output = RequestOutput(
                        request_id=message.request_id,
                        text=f"from {self.replica_id}",
                        token_ids=[9],
                        prompt_tokens=len(message.prompt),
                        generated_tokens=1,
                        finish_reason="length",
                    )
                    await send(Output(output))
                elif isinstance(message, Control) and message.command == "stats" and self.stats:
                    await send(Reply(message.request_id, self.stats))
                elif isinstance(message, Control) and message.command == "engine down":  # the test's cue
                    await send(EngineDown(self.replica_id, "its step loop stopped"))
        finally:
            socket.close()


class FakeUnit:
    """A scripted replica as the supervisor sees a process: it runs until `exit` or `stop`."""

    def __init__(self, name: str, pid: int, task: asyncio.Task):
        self.name = name
        self.pid = pid
        self.exit_code: int | None = None
        self.stopped_by_supervisor = False
        self._task = task
        self._gone = asyncio.Event()

    def exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
            self._task.cancel()
            self._gone.set()

    async def wait_exit(self) -> int:
        await self._gone.wait()
        assert self.exit_code is not None
        return self.exit_code

    def exit_summary(self) -> str:
        return f"exited with code {self.exit_code}"

    def describe_exit(self) -> str:
        return f"{self.name} (pid {self.pid}) {self.exit_summary()}"

    def output_tail(self) -> str:
        return ""

    async def stop(self, grace_s: float = 5.0) -> int | None:
        self.stopped_by_supervisor = True
        self.exit(0)
        return self.exit_code


class FakePlacement:
    """Starts scripted replicas as tasks of this loop; ``crash`` replicas exit as they start."""

    isolates_devices = False

    def __init__(self, replicas: list[ScriptedReplica], crash: set[int] = frozenset()):
        self.replicas = replicas
        self.crash = set(crash)
        self.units: dict[int, list[FakeUnit]] = {r.replica_id: [] for r in replicas}
        self.launches: list[Launch] = []

    def start(self, launch: Launch) -> FakeUnit:
        self.launches.append(launch)
        spec = msgspec.json.decode(launch.payload, type=ReplicaSpec)
        task = asyncio.create_task(self.replicas[spec.replica_id].serve(spec))
        unit = FakeUnit(launch.name, 1000 + spec.replica_id, task)
        self.units[spec.replica_id].append(unit)
        if spec.replica_id in self.crash:
            unit.exit(1)
        return unit

    def current(self, replica_id: int) -> FakeUnit:
        return self.units[replica_id][-1]

    def close(self) -> None:
        pass


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
async def routing(
    replicas: list[ScriptedReplica], tmp_path, placement: FakePlacement | None = None, **options
) -> AsyncIterator[Router]:
    """A started router over ``replicas`` (all ready), shut down afterwards."""
    config = EngineConfig(enable_prefix_caching=False, max_model_len=64)
    placement = placement or FakePlacement(replicas)
    options.setdefault("restart_policy", QUICK)
    start_timeout_s = options.pop("start_timeout_s", 30)
    router = Router(
        "scripted", "model", None, config, len(replicas), tmp_path, placement=placement, **options
    )
    try:
        await router.start(start_timeout_s)
        yield router
    finally:
        await router.shutdown()


async def generate(router: Router) -> list[RequestOutput]:
    params = SamplingParams(max_new_tokens=4)
    return [out async for out in router.stream_outputs(PROMPT, params)]


async def until(condition, what: str, timeout_s: float = 20.0) -> None:
    """Wait for ``condition()`` (the bound is slack: an event or a quick restart ends the wait)."""
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


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
    replicas = [
        ScriptedReplica(0, stats=stats_of(100, 2)),
        ScriptedReplica(1, stats=stats_of(60, 1)),
        ScriptedReplica(2, stats=None),  # alive but silent: left out after the control timeout
    ]
    placement = FakePlacement(replicas)
    never_again = RestartPolicy(max_failures=1)  # a replica that dies stays dead

    async def main():
        async with routing(replicas, tmp_path, placement, restart_policy=never_again) as router:
            three = await router.stats()
            placement.current(1).exit(-9)  # replica 1 dies: out of rotation at once (an exit event)
            await until(lambda: not router.replicas[1].serving, "replica 1 out")
            one = await router.stats()
            health_with_one = await router.health(), router.health_problems()
            outputs = await generate(router)  # the dead replica gets nothing
            for replica_id in (0, 2):
                placement.current(replica_id).exit(1)
            await until(lambda: not any(r.serving for r in router.replicas), "all out")
            with pytest.raises(EngineDeadError, match="no live replica"):
                await generate(router)
            return three, one, health_with_one, outputs, await router.health(), await router.stats()

    three, one, (healthy, problems), outputs, healthy_with_none, none = run(main())
    assert three == EngineStats(3, 2, 160, 157, 0, 14, 9, 20)
    assert one == stats_of(100, 2)
    # one replica down is enough for /health to say so, and why
    assert not healthy and problems == [
        "replica 1 failed: gave up after 1 failures within 600 s; the last: exited with code -9"
    ]
    assert outputs[-1].text in ("from 0", "from 2") and replicas[1].generates == []
    assert not healthy_with_none and none == EngineStats(0, 0, 0, 0, 0, 0, 0, 0)


def test_a_dead_replica_is_out_of_rotation_at_once_its_requests_fail_and_it_is_restarted(tmp_path):
    held, free = ScriptedReplica(0, hold=1), ScriptedReplica(1)
    placement = FakePlacement([held, free])

    async def main():
        async with routing([held, free], tmp_path, placement) as router:
            stream = router.stream_outputs(PROMPT, SamplingParams(max_new_tokens=4))
            waiting = asyncio.ensure_future(anext(stream))  # held by replica 0 (equal loads: the lower id)
            await until(lambda: held.generates, "the request reached replica 0")
            placement.current(0).exit(-9)
            # no sleep: the next request, sent at once, must not go to the dead replica
            after_death = await generate(router)
            with pytest.raises(EngineDeadError) as failure:
                await waiting
            routed_while_down = len(held.generates)
            await until(lambda: router.replicas[0].serving, "replica 0 restarted")
            healthy = await router.health()
            for _ in range(2):  # equal loads again: replica 0 (the lower id) takes requests again
                await generate(router)
            return after_death, failure.value, routed_while_down, healthy, router.replica_infos()

    after_death, error, routed_while_down, healthy, infos = run(main())
    assert [out.text for out in after_death] == ["from 1"] and routed_while_down == 1
    assert str(error) == "replica 0 exited with code -9 while serving this request"
    assert healthy and [(i.state, i.restarts, i.exit_code) for i in infos] == [
        ("serving", 1, -9),
        ("serving", 0, None),
    ]
    assert len(placement.units[0]) == 2 and len(held.generates) == 2  # the new process got one again
    # each start had a new identity and the deployment's key
    specs = [msgspec.json.decode(launch.payload, type=ReplicaSpec) for launch in placement.launches]
    assert len({spec.identity for spec in specs}) == len(specs) == 3
    assert len({spec.key for spec in specs}) == 1


def test_engine_down_takes_a_replica_out_before_its_process_exits(tmp_path):
    held, free = ScriptedReplica(0, hold=1), ScriptedReplica(1)
    placement = FakePlacement([held, free])

    async def main():
        async with routing([held, free], tmp_path, placement) as router:
            stream = router.stream_outputs(PROMPT, SamplingParams(max_new_tokens=4))
            waiting = asyncio.ensure_future(anext(stream))
            await until(lambda: held.generates, "the request reached replica 0")
            first = placement.current(0)
            router._send_nowait(router.replicas[0], Control("cue", "engine down"))
            with pytest.raises(EngineDeadError) as failure:
                await waiting
            problems = router.health_problems()
            await until(lambda: router.replicas[0].serving, "replica 0 restarted")
            return failure.value, problems, first.stopped_by_supervisor

    error, problems, stopped = run(main())
    assert str(error) == "replica 0 cannot serve: its step loop stopped while serving this request"
    assert problems[0].startswith("replica 0 ") and "cannot serve: its step loop stopped" in problems[0]
    assert stopped  # the supervisor made sure the old process went away


def test_a_replica_that_keeps_failing_is_given_up_on_and_says_so(tmp_path):
    replicas = [ScriptedReplica(0), ScriptedReplica(1)]
    placement = FakePlacement(replicas)
    policy = RestartPolicy(first_delay_s=0.01, max_delay_s=0.01, max_failures=3, window_s=60)

    async def main():
        async with routing(replicas, tmp_path, placement, restart_policy=policy) as router:
            placement.crash.add(1)  # from now on, every start of replica 1 exits at once
            placement.current(1).exit(-9)
            await until(lambda: router.replicas[1].slot.state == "failed", "given up")
            return router.health_problems(), await generate(router), len(placement.units[1])

    problems, outputs, starts = run(main())
    assert problems == [
        "replica 1 failed: gave up after 3 failures within 60 s; the last: exited with code 1 while starting"
    ]
    assert starts == 3 and [out.text for out in outputs] == ["from 0"]  # replica 0 serves on


def test_a_replica_whose_messages_lack_the_key_never_serves(tmp_path):
    impostor = ScriptedReplica(0, key=Seal.new().hex())  # seals its Ready with another key

    async def main():
        with pytest.raises(DeploymentStartError, match=r"replicas \[0\] were not ready within 1 s"):
            async with routing([impostor], tmp_path, start_timeout_s=1):
                pass

    run(main())
