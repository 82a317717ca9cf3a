"""A failed step fails only the request that caused it (issue 14): the engine core on the CPU.

The toy Llama in float32, greedy. Runners fail on cue by wrapping the real one
(`tests.worker_runners.PoisonedRunner`: it fails a step after running it, as a failure in sampling
leaves the runner), or for real: a ``top_k`` beyond int32 with validation skipped, issue 14's first
finding. The culprit must fail with a `StepError` that says it failed alone; every other request
must get the tokens it gets alone, and the engine must serve on with its whole cache free.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from fastgen import AsyncEngine, EngineConfig, EngineStats, SamplingParams, StepError
from fastgen.plan import StepPlan, StepResult
from tests.helpers import collect
from tests.worker_runners import POISONED_SEED, PoisonedRunner

NEW_TOKENS = 12
CULPRIT_ERROR = "also with this request alone in it"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=180))


def prompts(count: int = 8, seed: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 384) for _ in range(rng.randint(4, 40))] for _ in range(count)]


GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
POISONED = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, seed=POISONED_SEED)


class Unchecked(SamplingParams):
    """Sampling parameters that skip validation, as those before the int32 bounds did."""

    def validate(self, *, vocab_size: int | None = None) -> None:
        pass


# a top_k the runner's int32 tensor cannot hold, which validation refuses today
OVERFLOWING = Unchecked(max_new_tokens=NEW_TOKENS, do_sample=True, temperature=0.9, top_k=2**31)


@pytest.fixture(scope="module")
def alone(llama_path) -> list[list[int]]:
    """Each of `prompts` greedy, run alone."""

    async def main():
        async with await AsyncEngine.start(llama_path, EngineConfig(dtype="float32")) as engine:
            return [(await collect(engine, prompt, GREEDY))[0] for prompt in prompts()]

    return run(main())


async def _request(engine: AsyncEngine, prompt: list[int], params: SamplingParams, started: asyncio.Event):
    """The request's token ids, or the `StepError` it ended with; ``started`` is set at its first
    output (or its end)."""
    ids: list[int] = []
    try:
        async for out in engine.generate(prompt, params):
            ids += out.token_ids
            started.set()
    except StepError as error:
        return error
    finally:
        started.set()
    return ids


async def innocents_then_culprits(
    engine: AsyncEngine, culprits: dict[int, tuple[list[int], SamplingParams]]
) -> list[Any]:
    """`prompts` greedy, and once each has its first token (they decode together), the ``culprits``
    (index -> prompt and parameters) all at once. Returns each request's tokens or error, by index,
    after checking that the engine serves on."""
    innocents = {i: (prompt, GREEDY) for i, prompt in enumerate(prompts()) if i not in culprits}
    tasks: dict[int, asyncio.Task] = {}
    for group in (innocents, culprits):
        started = []
        for i, (prompt, params) in group.items():
            started.append(asyncio.Event())
            tasks[i] = asyncio.ensure_future(_request(engine, prompt, params, started[-1]))
        await asyncio.gather(*(event.wait() for event in started))
    results = [await tasks[i] for i in sorted(tasks)]
    assert await collect(engine, prompts(1, seed=9)[0], GREEDY), "the engine serves on"
    return results


def check(results: list[Any], alone: list[list[int]], culprits: set[int], stats: EngineStats) -> None:
    for i, result in enumerate(results):
        if i in culprits:
            assert isinstance(result, StepError) and CULPRIT_ERROR in str(result), (i, result)
        else:
            assert result == alone[i], (i, result)
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def run_poisoned(
    path: str,
    culprits: dict[int, tuple[list[int], SamplingParams]],
    wrap: Callable[[Any], Any] | None = PoisonedRunner,
    **config,
) -> tuple[list[Any], EngineStats, bool]:
    """`innocents_then_culprits` in an in-process engine whose runner ``wrap`` wraps; returns the
    results, the engine's stats and health once done."""

    async def main():
        engine_config = EngineConfig(dtype="float32", **{"token_budget": 32, **config})
        async with await AsyncEngine.start(path, engine_config) as engine:
            if wrap is not None:
                engine.executor.runner = wrap(engine.executor.runner)
            results = await innocents_then_culprits(engine, culprits)
            return results, engine.stats(), engine.is_healthy

    return run(main())


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_a_culprit_among_decodes_fails_alone_and_the_others_get_their_own_tokens(
    llama_path, alone, async_scheduling
):
    culprit = {3: (prompts()[3], POISONED)}
    results, stats, healthy = run_poisoned(llama_path, culprit, async_scheduling=async_scheduling)
    check(results, alone, {3}, stats)
    assert healthy and stats.num_failed_steps >= 2  # in company, then alone


def test_a_culprit_in_a_prompt_chunk_fails_alone(llama_path, alone):
    """Its 100-token prompt spans steps of 32 tokens; a chunk that does not sample fails."""
    culprit = {5: (list(range(3, 103)), POISONED)}
    results, stats, healthy = run_poisoned(llama_path, culprit, lambda r: PoisonedRunner(r, in_prompt=True))
    check(results, alone, {5}, stats)
    assert healthy


def test_two_culprits_in_one_step_each_fail_alone(llama_path, alone):
    culprits = {1: ([7, 8, 9], POISONED), 6: ([10, 11, 12, 13], POISONED)}
    results, stats, healthy = run_poisoned(llama_path, culprits)
    check(results, alone, {1, 6}, stats)
    assert healthy


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_isolation_under_preemption_pressure(llama_path, alone, async_scheduling):
    """8 blocks of 16 tokens hold about three of the requests at once."""
    culprits = {2: (prompts()[2], POISONED), 7: (prompts()[7], POISONED)}
    results, stats, healthy = run_poisoned(
        llama_path, culprits, async_scheduling=async_scheduling, num_kv_blocks=8, block_size=16
    )
    assert stats.num_preemptions > 0, "the test should exercise preemption"
    check(results, alone, {2, 7}, stats)
    assert healthy


class FailsOnce:
    """Wraps a runner: the first step of at least ``min_chunks`` chunks fails once it has run."""

    def __init__(self, runner: Any, min_chunks: int):
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks
        self.min_chunks = min_chunks

    def execute(self, plan: StepPlan, **options) -> StepResult:
        result = self.runner.execute(plan, **options)
        if len(plan.chunks) >= self.min_chunks > 0:
            self.min_chunks = 0
            raise RuntimeError("a fault that does not recur")
        return result


def test_a_failure_that_does_not_recur_fails_nobody(llama_path, alone):
    """A step of many requests, then one of a lone request, each fail once: all go on."""

    async def main():
        async with await AsyncEngine.start(
            llama_path, EngineConfig(dtype="float32", token_budget=32)
        ) as engine:
            runner = engine.executor.runner
            engine.executor.runner = FailsOnce(runner, min_chunks=4)
            results = await innocents_then_culprits(engine, {})
            engine.executor.runner = FailsOnce(runner, min_chunks=1)
            lone = await _request(engine, prompts()[0], GREEDY, asyncio.Event())
            return results, lone, engine.stats(), engine.is_healthy

    results, lone, stats, healthy = run(main())
    check(results, alone, set(), stats)
    assert lone == alone[0] and stats.num_failed_steps == 2 and healthy


def test_top_k_beyond_int32_fails_alone_even_if_validation_missed_it(llama_path, alone):
    """Issue 14's first finding, behind validation: the runner's int32 conversion raises for this
    request alone, which fails alone (it failed the whole step before)."""
    results, stats, healthy = run_poisoned(llama_path, {4: (prompts()[4], OVERFLOWING)}, wrap=None)
    check(results, alone, {4}, stats)
    assert "int32" in str(results[4]) and healthy


def test_workers_whose_step_raises_stay_alive_and_fail_only_the_culprit(llama_path, alone):
    """Tensor-parallel workers (ZeroMQ executor): every rank raises in its step and serves on."""

    async def main():
        config = EngineConfig(dtype="float32", tensor_parallel=2, token_budget=32)
        async with await AsyncEngine.start(llama_path, config) as engine:
            pids = [worker.process.pid for worker in engine.executor.workers]
            results = await innocents_then_culprits(engine, {4: (prompts()[4], OVERFLOWING)})
            alive = [worker.process.pid for worker in engine.executor.workers if worker.exit_code is None]
            return results, engine.stats(), engine.is_healthy, pids, alive

    results, stats, healthy, pids, alive = run(main())
    check(results, alone, {4}, stats)
    assert "int32" in str(results[4]) and "WorkerStepError" in str(results[4])
    assert healthy and alive == pids  # the same workers serve on
