"""InProcessExecutor: `submit` returns once the runner has launched the step (asynchronous devices),
so the engine's host work never holds the GIL while the runner thread launches."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.executor.inprocess import InProcessExecutor
from fastgen.plan import StepPlan, StepResult
from tests.helpers import collect, hf_greedy

PLAN = StepPlan(0, [], [], [])


class ScriptedRunner:
    """Sleeps ``launch_s`` (with ``gated``: first waits for `returned`, which the test sets once
    `submit` has returned), then calls ``on_launched`` (never when ``launch_s`` is None); then
    waits for `returned` (the step is still "on the device" until `submit` is back). ``safety_s``
    bounds the waits, so that a broken executor fails rather than hangs."""

    num_kv_blocks = 8

    def __init__(
        self, launch_s: float | None, *, gated: bool = False, fail: bool = False, safety_s: float = 5.0
    ):
        self.launch_s, self.gated, self.fail, self.safety_s = launch_s, gated, fail, safety_s
        self.launched = threading.Event()
        self.returned = threading.Event()
        self.calls_with_launch_callback = 0

    def execute(self, plan: StepPlan, on_launched=None) -> StepResult:
        self.calls_with_launch_callback += on_launched is not None
        if self.fail:
            raise RuntimeError("step failed before its launch")
        if self.launch_s is not None:
            if self.gated:
                self.returned.wait(self.safety_s)
            time.sleep(self.launch_s)
            self.launched.set()
            if on_launched is not None:
                on_launched()
        self.returned.wait(self.safety_s)
        return StepResult(plan.step_id, [1])


@dataclass
class Submitted:
    took_s: float  # how long `submit` blocked the event loop
    launched: bool  # whether the runner had launched the step when `submit` returned
    done: bool  # whether the step had finished then
    outcome: StepResult | BaseException


def submit_once(runner: ScriptedRunner, wait: bool) -> Submitted:
    async def main():
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        executor = InProcessExecutor(runner, pool, wait_for_launch=wait)
        started = time.perf_counter()
        future = executor.submit(PLAN)
        took = time.perf_counter() - started
        launched, done = runner.launched.is_set(), future.done()
        runner.returned.set()
        try:
            outcome = await future
        except RuntimeError as exc:
            outcome = exc
        await executor.shutdown()
        return Submitted(took, launched, done, outcome)

    return asyncio.run(main())


def test_submit_returns_after_the_launch_and_before_the_result(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 30.0)
    runner = ScriptedRunner(launch_s=0.2)
    submitted = submit_once(runner, wait=True)
    assert submitted.launched and not submitted.done  # the order of events, not their timing
    assert submitted.took_s < InProcessExecutor.LAUNCH_WAIT_S  # released by the launch
    assert isinstance(submitted.outcome, StepResult) and submitted.outcome.sampled_token_ids == [1]


def test_without_waiting_submit_returns_at_once(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 2.0)
    runner = ScriptedRunner(launch_s=0.0, gated=True)  # launches only once submit is back
    submitted = submit_once(runner, wait=False)
    assert not submitted.launched and not submitted.done and runner.calls_with_launch_callback == 0
    assert submitted.took_s < InProcessExecutor.LAUNCH_WAIT_S  # a wait would have lasted this long


def test_the_wait_is_bounded(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 0.1)
    runner = ScriptedRunner(launch_s=None)  # never signals its launch; ends safety_s after it starts
    submitted = submit_once(runner, wait=True)
    # released by the time limit: not before it, and well before the step could end
    assert 0.09 <= submitted.took_s < runner.safety_s and not submitted.done
    assert isinstance(submitted.outcome, StepResult)


def test_a_step_that_fails_before_its_launch_releases_submit(monkeypatch):
    monkeypatch.setattr(InProcessExecutor, "LAUNCH_WAIT_S", 30.0)
    submitted = submit_once(ScriptedRunner(launch_s=0.0, fail=True), wait=True)
    assert submitted.took_s < InProcessExecutor.LAUNCH_WAIT_S  # released by the failure, not the limit
    assert isinstance(submitted.outcome, RuntimeError) and "before its launch" in str(submitted.outcome)


@pytest.mark.parametrize("wait", [False, True])
def test_engine_outputs_do_not_depend_on_waiting_for_the_launch(llama_path, wait):
    """Greedy outputs with and without waiting for each launch equal HF's (an independent
    reference); the runner is really called with the launch callback when waiting."""
    prompts = [list(range(3, 3 + n)) for n in (1, 9, 40)]

    async def main():
        config = EngineConfig(dtype="float32", token_budget=32)
        async with await AsyncEngine.start(llama_path, config) as engine:
            engine.executor.wait_for_launch = wait
            runner, launch = engine.executor.runner, engine.executor.runner.launch
            callbacks = []

            def counting(plan, on_launched=None):
                callbacks.append(on_launched is not None)
                return launch(plan, on_launched)

            runner.launch = counting
            params = SamplingParams(max_new_tokens=12, ignore_eos=True)
            results = await asyncio.gather(*(collect(engine, prompt, params) for prompt in prompts))
            return [ids for ids, _, _ in results], callbacks

    outputs, callbacks = asyncio.run(main())
    assert outputs == hf_greedy(llama_path, prompts, 12)
    assert callbacks and any(callbacks) == wait
