"""InProcessExecutor: `submit` returns once the runner has launched the step (asynchronous devices),
so the engine's host work never holds the GIL while the runner thread launches."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.executor.inprocess import InProcessExecutor
from fastgen.plan import StepPlan, StepResult
from tests.helpers import collect

PLAN = StepPlan(0, [], [], [])


class ScriptedRunner:
    """Calls ``on_launched`` after ``launch_s`` (never when None), then blocks ``device_s``."""

    num_kv_blocks = 8

    def __init__(self, launch_s: float | None, device_s: float, fail: bool = False):
        self.launch_s, self.device_s, self.fail = launch_s, device_s, fail
        self.launched_at: float | None = None

    def execute(self, plan: StepPlan, on_launched=None) -> StepResult:
        if self.fail:
            raise RuntimeError("step failed before its launch")
        if self.launch_s is not None:
            time.sleep(self.launch_s)
            self.launched_at = time.perf_counter()
            if on_launched is not None:
                on_launched()
        time.sleep(self.device_s)
        return StepResult(plan.step_id, [1])


def submit_once(runner: ScriptedRunner, wait: bool) -> tuple[float, bool, StepResult | BaseException]:
    """(seconds `submit` took, whether the step was still running then, its outcome)."""

    async def main():
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        executor = InProcessExecutor(runner, pool, wait_for_launch=wait)
        started = time.perf_counter()
        future = executor.submit(PLAN)
        took = time.perf_counter() - started
        running = not future.done()
        try:
            outcome = await future
        except RuntimeError as exc:
            outcome = exc
        await executor.shutdown()
        return took, running, outcome

    return asyncio.run(main())


def test_submit_returns_after_the_launch_and_before_the_result(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 2.0)
    runner = ScriptedRunner(launch_s=0.2, device_s=0.6)
    took, running, outcome = submit_once(runner, wait=True)
    assert runner.launched_at is not None
    assert 0.19 < took < 0.5 and running
    assert isinstance(outcome, StepResult) and outcome.sampled_token_ids == [1]


def test_without_waiting_submit_returns_at_once():
    took, running, _ = submit_once(ScriptedRunner(launch_s=0.2, device_s=0.1), wait=False)
    assert took < 0.15 and running


def test_the_wait_is_bounded(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 0.1)
    took, running, outcome = submit_once(ScriptedRunner(launch_s=None, device_s=1.0), wait=True)
    assert 0.09 < took < 0.6 and running and isinstance(outcome, StepResult)


def test_a_step_that_fails_before_its_launch_releases_submit(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 2.0)
    took, _, outcome = submit_once(ScriptedRunner(launch_s=0.0, device_s=0.0, fail=True), wait=True)
    assert took < 1.0  # released by the failure, not by the time limit
    assert isinstance(outcome, RuntimeError) and "before its launch" in str(outcome)


@pytest.mark.parametrize("wait", [False, True])
def test_engine_outputs_do_not_depend_on_waiting_for_the_launch(llama_path, wait):
    async def main():
        config = EngineConfig(dtype="float32", token_budget=32)
        async with await AsyncEngine.start(llama_path, config) as engine:
            engine.executor.wait_for_launch = wait
            params = SamplingParams(max_new_tokens=12, ignore_eos=True)
            return await asyncio.gather(*(collect(engine, list(range(3, 3 + n)), params) for n in (1, 9, 40)))

    results = asyncio.run(main())
    reference = asyncio.run(_reference(llama_path))
    assert [ids for ids, _, _ in results] == reference


async def _reference(path: str) -> list[list[int]]:
    async with await AsyncEngine.start(path, EngineConfig(dtype="float32", token_budget=32)) as engine:
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        return [(await collect(engine, list(range(3, 3 + n)), params))[0] for n in (1, 9, 40)]
