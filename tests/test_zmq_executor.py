"""ZmqExecutor: worker processes, supervision (start-up, death, ranks out of step), clean shutdown.

Most tests run model-free runners (`fastgen.worker.EchoRunner`, `tests/worker_runners.py`), whose
workers start in a fraction of a second; the last ones run the toy model through the engine.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import msgspec
import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams, StepError
from fastgen.errors import EngineDeadError
from fastgen.executor import zmq as zmq_executor
from fastgen.executor.zmq import WorkerError, WorkerStepError, ZmqExecutor
from fastgen.models.config import ModelConfig
from fastgen.plan import SamplingOptions, SequenceChunk, SequenceStart, StepPlan
from tests import worker_runners
from tests.helpers import collect, engine_greedy

ROOT = Path(__file__).resolve().parent.parent
GREEDY = SamplingOptions(0.0, 0, 1.0, None, 0, [])
ECHO = "fastgen.worker:EchoRunner"
MISBEHAVING = "tests.worker_runners:MisbehavingRunner"


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    """Workers import runner factories from ``tests``, whatever the current directory."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def run(coro, timeout_s: float = 90):
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


def tiny_model_config() -> ModelConfig:
    return ModelConfig.from_dict(
        dict(
            model_type="llama",
            vocab_size=32,
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )


async def start_executor(tp: int = 2, factory: str = ECHO, **config) -> ZmqExecutor:
    engine_config = EngineConfig(tensor_parallel=tp, executor="zmq", **config)
    return await ZmqExecutor.create("unused", engine_config, tiny_model_config(), 64, runner_factory=factory)


def first_step(step_id: int, seq_id: int, tokens: list[int]) -> StepPlan:
    chunk = SequenceChunk(seq_id, tokens, 0, [0], True)
    return StepPlan(step_id, [], [SequenceStart(seq_id, GREEDY, 0)], [chunk])


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def worker_children() -> list[int]:
    """Pids of this process's live ``fastgen.worker`` children."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == os.getpid() and fields[0] != "Z" and b"fastgen.worker" in cmdline:
            found.append(int(entry.name))
    return found


# Bounds on waits: generous multiples of the executor's own periods and timeouts, so that a busy CI
# machine cannot fail them; what each test checks is which mechanism ended the wait (the error
# message names it), and a wait that never ends still fails.
SLACK_S = 30.0


def still_running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if is_running(pid)]


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if is_running(pid)]
        if not alive:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if is_running(pid)]


# -- transport and step errors (model-free workers) ------------------------------------------


def test_round_trip_step_error_and_clean_shutdown():
    async def main():
        executor = await start_executor(tp=2)
        pids = [worker.process.pid for worker in executor.workers]
        assert executor.is_alive and executor.num_kv_blocks == 4096
        first = await executor.execute(first_step(0, 7, [5, 6, 11]))
        # a step that raises in the workers fails alone; the workers keep serving
        with pytest.raises(WorkerStepError, match="never started") as failure:
            await executor.execute(StepPlan(1, [], [], [SequenceChunk(8, [3], 0, [1], True)]))
        assert isinstance(failure.value, StepError) and "Traceback" in failure.value.remote_traceback
        assert executor.is_alive
        second = await executor.execute(StepPlan(2, [], [], [SequenceChunk(7, [12], 3, [], True)]))
        # several plans in flight: each future gets its own step's answer
        futures = [
            executor.submit(StepPlan(i, [], [], [SequenceChunk(7, [i], 4, [], True)])) for i in (3, 4, 5)
        ]
        assert [r.sampled_token_ids for r in await asyncio.gather(*futures)] == [[3], [4], [5]]
        await executor.shutdown()
        await executor.shutdown()  # idempotent
        assert not executor.is_alive
        with pytest.raises(WorkerError, match="shut down"):
            await executor.execute(StepPlan(6, [], [], []))
        return first, second, pids

    first, second, pids = run(main())
    assert (first.step_id, first.sampled_token_ids) == (0, [11])
    assert (second.step_id, second.sampled_token_ids) == (2, [12])
    assert still_running(pids) == []  # shutdown returned once they were gone
    assert worker_children() == []


def test_executor_modules_do_not_import_torch():
    code = "import sys, fastgen.executor.zmq, fastgen.executor.wire; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


# -- start-up --------------------------------------------------------------------------------


def test_start_timeout_names_the_ranks_and_leaves_no_process():
    started = time.monotonic()
    with pytest.raises(WorkerError, match=r"\[0, 1\] not ready after worker_start_timeout_s=1.5"):
        run(start_executor(tp=2, factory="tests.worker_runners:hang_at_start", worker_start_timeout_s=1.5))
    assert time.monotonic() - started < 1.5 + SLACK_S
    assert worker_children() == []


def test_start_failure_reports_the_rank_and_its_traceback():
    with pytest.raises(WorkerError, match="rank 1 failed to start") as failure:
        run(start_executor(tp=2, factory="tests.worker_runners:rank1_fails_at_start"))
    assert "RuntimeError: no weights for rank 1" in str(failure.value)
    assert failure.value.rank == 1
    assert worker_children() == []


def test_worker_exit_at_start_reports_exit_code_and_output():
    with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) exited with code 7") as failure:
        run(start_executor(tp=2, factory="tests.worker_runners:rank1_exits_at_start"))
    assert "rank 1 gives up" in str(failure.value)
    assert failure.value.exit_code == 7
    assert worker_children() == []


# -- death and divergence --------------------------------------------------------------------


def test_killed_worker_fails_the_step_within_seconds():
    step_timeout_s = 120.0

    async def main():
        executor = await start_executor(tp=2, factory=MISBEHAVING, step_timeout_s=step_timeout_s)
        pids = [worker.process.pid for worker in executor.workers]
        future = executor.submit(first_step(0, 1, [worker_runners.SLOW_TOKEN]))
        await asyncio.sleep(0.3)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1 \(pid \d+\) exited with code -9 \(SIGKILL\)"):
            await future
        waited = time.monotonic() - killed
        assert not executor.is_alive
        with pytest.raises(WorkerError):
            await executor.execute(StepPlan(1, [], [], []))
        await executor.shutdown()
        return waited, pids

    waited, pids = run(main(), timeout_s=step_timeout_s)
    # the exit was noticed (polled every _POLL_S), long before the step timeout could fire
    assert waited < min(step_timeout_s / 2, 100 * zmq_executor._POLL_S + SLACK_S)
    assert still_running(pids) == []  # shutdown returned once they were gone
    assert worker_children() == []


def test_hung_worker_times_out_the_step_and_is_killed():
    async def main():  # rank 1 hangs, alive, at step 1
        executor = await start_executor(
            tp=2, factory="tests.worker_runners:echo_rank1_hangs_at_step1", step_timeout_s=0.5
        )
        pids = [worker.process.pid for worker in executor.workers]
        try:
            await executor.execute(first_step(0, 7, [5, 6]))
            started = time.monotonic()
            message = r"step 1 timed out: rank\(s\) \[1\] did not answer within step_timeout_s=0\.5"
            with pytest.raises(WorkerError, match=message) as failure:
                await executor.execute(StepPlan(1, [], [], [SequenceChunk(7, [8], 2, [], True)]))
            waited = time.monotonic() - started
            assert failure.value.rank == 1 and not executor.is_alive
        finally:
            await executor.shutdown()
        return waited, pids

    waited, pids = run(main())
    assert 0.5 <= waited < 0.5 + SLACK_S
    assert still_running(pids) == []  # shutdown returned once they were gone
    assert worker_children() == []


def test_ranks_out_of_step_kill_the_executor(monkeypatch):
    monkeypatch.setattr(zmq_executor, "_OUT_OF_STEP_GRACE_S", 0.5)

    async def main():
        executor = await start_executor(tp=2, factory=MISBEHAVING)
        try:
            # rank 1 fails while rank 0 succeeds: their sequence states differ from now on
            with pytest.raises(WorkerError, match=r"failed on rank\(s\) \[1\] but not on \[0\]"):
                await executor.execute(first_step(0, 1, [worker_runners.RANK1_FAILS_TOKEN]))
            assert not executor.is_alive
        finally:
            await executor.shutdown()
        executor = await start_executor(tp=2, factory=MISBEHAVING)
        try:
            # rank 1 fails while rank 0 never answers (as if waiting in a collective for rank 1)
            started = time.monotonic()
            with pytest.raises(WorkerError, match=r"did not answer within 0\.5 s"):
                await executor.execute(first_step(0, 1, [worker_runners.RANK0_HANGS_TOKEN]))
            assert time.monotonic() - started < 0.5 + SLACK_S and not executor.is_alive
        finally:
            await executor.shutdown()

    run(main())
    assert worker_children() == []


def test_workers_exit_when_the_engine_process_dies():
    script = textwrap.dedent(
        """
        import asyncio, json
        from tests.test_zmq_executor import start_executor

        async def main():
            executor = await start_executor(tp=2)
            print(json.dumps([w.process.pid for w in executor.workers]), flush=True)
            await asyncio.sleep(600)

        asyncio.run(main())
        """
    )
    engine = subprocess.Popen(
        [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = engine.stdout.readline()
        pids = json.loads(line)
        assert all(is_running(pid) for pid in pids)
    finally:
        engine.kill()
        engine.wait(timeout=10)
    assert wait_gone(pids, SLACK_S) == []  # each polls its parent every 0.5 s


# -- through the engine, with the toy model ----------------------------------------------------


def mixed_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(n)] for n in (1, 9, 40, 70, 3)]


def test_tp1_worker_process_matches_inprocess(llama_path):
    prompts = mixed_prompts()
    expected = engine_greedy(llama_path, prompts, 6, token_budget=16, executor="inprocess")
    got = engine_greedy(llama_path, prompts, 6, token_budget=16, executor="zmq")
    assert got == expected


def test_failed_step_in_workers_fails_its_requests_and_engine_keeps_serving(llama_path):
    poisoned = 333

    async def main():
        config = EngineConfig(dtype="float32", tensor_parallel=2, token_budget=64)
        async with await AsyncEngine.start(llama_path, config) as engine:
            assert isinstance(engine.executor, ZmqExecutor)
            submit = engine.executor.submit

            def poisoning_submit(plan: StepPlan):
                # a chunk of a sequence the workers never saw: every rank raises KeyError
                chunks = [
                    msgspec.structs.replace(c, seq_id=10**9) if poisoned in c.token_ids else c
                    for c in plan.chunks
                ]
                return submit(msgspec.structs.replace(plan, chunks=chunks))

            engine.executor.submit = poisoning_submit
            with pytest.raises(StepError, match="KeyError"):
                await collect(engine, [poisoned, 4, 5], SamplingParams(max_new_tokens=5))
            after = await collect(engine, [4, 5, 6], SamplingParams(max_new_tokens=5, ignore_eos=True))
            return after, engine.is_healthy

    (ids, _, reason), healthy = run(main(), 120)
    assert len(ids) == 5 and reason == "length" and healthy
    assert worker_children() == []


def test_killed_worker_fails_requests_within_seconds_and_engine_stops_cleanly(llama_path):
    step_timeout_s = 120.0

    async def main():
        config = EngineConfig(
            dtype="float32", tensor_parallel=2, token_budget=32, step_timeout_s=step_timeout_s
        )
        engine = await AsyncEngine.start(llama_path, config)
        pids = [worker.process.pid for worker in engine.executor.workers]
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        streams = [engine.generate([5 + i, 6, 7], params) for i in range(3)]
        for stream in streams:
            await stream.__anext__()  # every request is generating
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        errors = []
        for stream in streams:
            try:
                async for _ in stream:
                    pass
            except (StepError, EngineDeadError) as exc:
                errors.append(exc)
        waited = time.monotonic() - killed
        healthy = engine.is_healthy
        await engine.stop()
        return errors, waited, healthy, pids

    errors, waited, healthy, pids = run(main(), 2 * step_timeout_s)
    assert len(errors) == 3 and any("rank 1" in str(e) and "exited with code -9" in str(e) for e in errors)
    assert waited < step_timeout_s / 2 and not healthy  # the exit was noticed, not a timeout
    assert still_running(pids) == []  # shutdown returned once they were gone
    assert worker_children() == []


def test_hung_worker_fails_requests_after_step_timeout_and_engine_stops_cleanly(llama_path, monkeypatch):
    # rank 1 hangs at step 3; rank 0 runs step 3 and waits in its all-reduce for rank 1
    monkeypatch.setattr(
        zmq_executor, "DEFAULT_RUNNER_FACTORY", "tests.worker_runners:model_rank1_hangs_at_step3"
    )

    async def main():
        config = EngineConfig(dtype="float32", tensor_parallel=2, token_budget=32, step_timeout_s=1.0)
        engine = await AsyncEngine.start(llama_path, config)
        pids = [worker.process.pid for worker in engine.executor.workers]
        params = SamplingParams(max_new_tokens=400, ignore_eos=True)
        started = time.monotonic()
        results = await asyncio.gather(
            *(collect(engine, [5 + i, 6, 7], params) for i in range(3)), return_exceptions=True
        )
        waited = time.monotonic() - started
        healthy = engine.is_healthy
        await engine.stop()
        return results, waited, healthy, pids

    results, waited, healthy, pids = run(main(), 120)
    assert len(results) == 3 and all(isinstance(r, StepError | EngineDeadError) for r in results), results
    for error in results:
        assert "step 3 timed out: rank(s) [0, 1] did not answer within step_timeout_s=1" in str(error)
    assert waited < 1.0 + SLACK_S and not healthy
    assert still_running(pids) == []  # shutdown returned once they were gone
    assert worker_children() == []


@pytest.mark.parametrize("freeze_gc", [True, False])
def test_workers_freeze_their_heap_once_ready_unless_turned_off(freeze_gc):
    async def body():
        factory = "tests.worker_runners:FreezeReportingRunner"
        executor = await start_executor(tp=1, factory=factory, freeze_gc=freeze_gc)
        try:
            return await executor.execute(first_step(0, 7, [5]))
        finally:
            await executor.shutdown()

    (frozen,) = run(body()).sampled_token_ids
    # a started worker holds at least its modules' objects; without the freeze it holds none frozen
    assert (frozen > 1000) if freeze_gc else (frozen == 0)
