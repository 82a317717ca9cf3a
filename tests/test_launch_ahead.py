"""`ModelRunner.launch` / `collect`: a step launched before the one ahead of it is collected reads
that step's sampled tokens on the device, and every output stays what it is when each step is
collected before the next launch: greedy equals HF; seeded sampling, penalties (whose trackers
need the token on the host: that launch waits for the collection) and logprobs equal the engine's
ordinary run."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.executor.collector import StepCollector
from fastgen.plan import StepPlan, StepResult
from tests.helpers import hf_greedy, merged_output

PROMPTS = [list(range(3, 3 + n)) for n in (1, 9, 40, 5)]
NEW_TOKENS = 12


class LaunchAhead:
    """Stands in for the executor's ``submit``: launches each plan at once on the engine's runner
    and collects on a thread of its own, as the executors do, but holds each collection back
    until the next step is launched (or 5 ms pass without one)."""

    def __init__(self, runner: Any):
        self.runner = runner
        self.collector = StepCollector("launch-ahead-collector")
        self.last: Any = None  # the step launched last
        self.gate = threading.Event()  # set once a step is launched after it
        self.launched_ahead = 0  # launches made while the step before was not collected

    def submit(self, plan: StepPlan) -> asyncio.Future[StepResult]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.launched_ahead += self.last is not None and not self.last.collected.is_set()
        launched = self.last = self.runner.launch(plan)
        self.gate.set()
        self.gate = gate = threading.Event()

        def finish() -> StepResult:
            gate.wait(0.005)
            return self.runner.collect(launched)

        def deliver(result: StepResult | None, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(settle, future, result, error)

        self.collector.put(finish, deliver)
        return future


def settle(future: asyncio.Future, result: StepResult | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def run(path: str, params: list[SamplingParams], launch_ahead: bool) -> tuple[list, int]:
    async def main():
        config = EngineConfig(dtype="float32", token_budget=32)
        async with await AsyncEngine.start(path, config) as engine:
            ahead = LaunchAhead(engine.executor.runner)
            if launch_ahead:
                engine.executor.submit = ahead.submit
            outputs = await asyncio.gather(
                *(merged_output(engine, prompt, p) for prompt, p in zip(PROMPTS, params))
            )
        ahead.collector.close()
        return outputs, ahead.launched_ahead

    return asyncio.run(main())


def test_greedy_tokens_equal_hf_when_each_step_launches_before_the_last_is_collected(llama_path):
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    outputs, launched_ahead = run(llama_path, [greedy] * len(PROMPTS), launch_ahead=True)
    assert launched_ahead >= NEW_TOKENS  # the decode steps did launch ahead
    assert [out.token_ids for out in outputs] == hf_greedy(llama_path, PROMPTS, NEW_TOKENS)


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.8, "top_k": 20},
        {"temperature": 0.8, "repetition_penalty": 1.3, "presence_penalty": 0.5},
        {"temperature": 0.0, "logprobs": 2, "frequency_penalty": 0.7},
    ],
    ids=["sampled", "penalties", "logprobs"],
)
def test_sampled_outputs_are_those_of_the_ordinary_run(llama_path, options):
    params = [
        SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, seed=seed, **options)
        for seed in range(len(PROMPTS))
    ]
    ahead, launched_ahead = run(llama_path, params, launch_ahead=True)
    ordinary, _ = run(llama_path, params, launch_ahead=False)
    assert launched_ahead > 0
    for mine, theirs in zip(ahead, ordinary):
        assert mine.token_ids == theirs.token_ids
        assert mine.logprobs == theirs.logprobs
