"""Asynchronous scheduling: step N+1 is planned before step N's tokens are known.

The scheduler's bookkeeping (pending tokens, the length limit, preemption while a step is in
flight), and the engine's outputs with it on and off: the same tokens, texts, log-probabilities and
finish reasons, through stop tokens, stop strings, seeds, penalties, chunked prompts and preemption.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.block_manager import BlockManager
from fastgen.plan import PENDING_TOKEN, StepResult
from fastgen.scheduler import Scheduler
from fastgen.sequence import FinishReason, Sequence, SequenceStatus
from tests.helpers import generate_together, merged_output


def make_seq(seq_id: int, prompt_len: int, max_new_tokens: int = 100) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return Sequence(
        seq_id, list(range(3, 3 + prompt_len)), params, max_total_tokens=prompt_len + max_new_tokens
    )


def result(step, tokens: list[int]) -> StepResult:
    return StepResult(step.plan.step_id, tokens)


def test_the_next_step_decodes_the_pending_token_before_it_is_known():
    scheduler = Scheduler(BlockManager(16, 4), token_budget=16, max_seqs=4)
    seq = make_seq(0, 4)
    scheduler.add(seq)
    first = scheduler.schedule()
    assert [c.token_ids for c in first.plan.chunks] == [list(range(3, 7))] and seq.num_pending == 1
    second = scheduler.schedule()  # before the first commits
    (chunk,) = second.plan.chunks
    assert chunk.token_ids == [PENDING_TOKEN] and chunk.start_position == 4 and chunk.sample
    assert chunk.new_blocks == seq.block_table[1:]  # the pending token's slot, in a new block
    assert list(scheduler.commit(first, result(first, [40]))) == [(seq, 40)]
    third = scheduler.schedule()
    assert third.plan.chunks[0].token_ids == [PENDING_TOKEN] and third.plan.chunks[0].start_position == 5
    assert list(scheduler.commit(second, result(second, [41]))) == [(seq, 41)]
    assert list(scheduler.commit(third, result(third, [42]))) == [(seq, 42)]
    assert seq.generated_token_ids == [40, 41, 42] and seq.num_pending == 0 and seq.num_uncomputed == 1


def test_a_pending_token_that_reaches_the_length_limit_is_not_decoded():
    scheduler = Scheduler(BlockManager(16, 4), token_budget=16, max_seqs=4)
    seq = make_seq(0, 5, max_new_tokens=1)
    done = make_seq(1, 3)
    scheduler.add(seq)
    scheduler.add(done)
    first = scheduler.schedule()
    scheduler.finish(done, FinishReason.ABORT)
    # `seq`'s pending token is its last: nothing to run, and the released id waits for a real plan
    empty = scheduler.schedule()
    assert empty.plan.chunks == [] and empty.plan.released == []
    assert list(scheduler.commit(first, result(first, [40, 41]))) == [(seq, 40)]
    assert seq.token_stop_reason() is FinishReason.LENGTH
    scheduler.finish(seq, FinishReason.LENGTH)
    scheduler.add(make_seq(2, 2))
    nxt = scheduler.schedule()
    assert nxt.plan.step_id == empty.plan.step_id == first.plan.step_id + 1
    assert sorted(nxt.plan.released) == [0, 1]


def test_a_sequence_preempted_while_its_step_runs_drops_that_token_and_recomputes():
    # 2 blocks of 4 tokens: A (4 tokens) and B (3 tokens) fit; A's first decode needs a block
    scheduler = Scheduler(BlockManager(2, 4), token_budget=16, max_seqs=4)
    a, b = make_seq(0, 4), make_seq(1, 3)
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule()
    assert [c.seq_id for c in first.plan.chunks] == [0, 1]
    second = scheduler.schedule()  # A's pending token needs a second block: B is preempted
    assert second.preempted == [b] and [c.seq_id for c in second.plan.chunks] == [0]
    assert second.plan.released == [1]  # the worker forgets B before running the second step
    assert b.status is SequenceStatus.WAITING and b.num_pending == 0 and b.num_computed == 0
    assert list(scheduler.commit(first, result(first, [40, 50]))) == [(a, 40)]  # B's token dropped
    assert b.token_ids == list(range(3, 6))
    assert list(scheduler.commit(second, result(second, [41]))) == [(a, 41)]
    scheduler.finish(a, FinishReason.ABORT)
    again = scheduler.schedule()
    assert again.plan.released == [0] and [c.token_ids for c in again.plan.chunks] == [[3, 4, 5]]


def test_a_sequence_that_finishes_while_the_next_step_runs_drops_that_steps_token():
    scheduler = Scheduler(BlockManager(16, 4), token_budget=16, max_seqs=4)
    seq = make_seq(0, 5)
    scheduler.add(seq)
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert list(scheduler.commit(first, result(first, [40]))) == [(seq, 40)]
    scheduler.finish(seq, FinishReason.STOP)  # e.g. EOS or a stop string
    assert list(scheduler.commit(second, result(second, [41]))) == []
    assert seq.generated_token_ids == [40] and scheduler.block_manager.num_free == 16


PROMPTS = [list(range(3 + i, 40 + 7 * i)) for i in range(6)]


def mixed_requests(stop_token: int, stop_text: str) -> list[tuple[list[int], SamplingParams]]:
    return [
        (PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True)),
        (PROMPTS[1], SamplingParams(max_new_tokens=30, stop_token_ids=[stop_token])),
        (PROMPTS[2], SamplingParams(max_new_tokens=30, stop=[stop_text], ignore_eos=True)),
        (
            PROMPTS[3],
            SamplingParams(max_new_tokens=25, do_sample=True, temperature=0.9, top_k=20, seed=7, logprobs=2),
        ),
        (PROMPTS[4], SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.1, top_p=0.8, seed=3)),
        (PROMPTS[5], SamplingParams(max_new_tokens=18, frequency_penalty=0.7, repetition_penalty=1.2)),
        (PROMPTS[0][5:], SamplingParams(max_new_tokens=1)),
        (PROMPTS[2][3:], SamplingParams(max_new_tokens=22, min_new_tokens=6, stop_token_ids=[stop_token])),
    ]


def summary(outputs):
    return [(out.token_ids, out.text, out.finish_reason, out.stop_reason) for out in outputs]


def assert_same_logprobs(outputs, reference):
    """Equal ids and texts; values equal up to float noise (a sequence preempted at another step
    is recomputed by a prompt chunk instead of decodes, which rounds differently)."""
    for out, ref in zip(outputs, reference):
        assert (out.logprobs is None) == (ref.logprobs is None)
        for mine, theirs in zip(out.logprobs or [], ref.logprobs or []):
            assert (mine.token_id, mine.text, mine.top_text, mine.text_offset) == (
                theirs.token_id,
                theirs.text,
                theirs.top_text,
                theirs.text_offset,
            )
            assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
            assert list(mine.top) == list(theirs.top)
            assert list(mine.top.values()) == pytest.approx(list(theirs.top.values()), abs=1e-4)


@pytest.fixture(scope="module")
def stops(llama_path):
    """A token the greedy outputs emit early, and a text that appears in one of them."""
    (out,) = generate_together(llama_path, [(PROMPTS[1], SamplingParams(max_new_tokens=12, ignore_eos=True))])
    (text,) = generate_together(
        llama_path, [(PROMPTS[2], SamplingParams(max_new_tokens=30, ignore_eos=True))]
    )
    return out.token_ids[4], text.text[20:23]


def run_together(path: str, requests, **config):
    """Merged outputs of ``requests`` submitted at once, and how many preemptions the engine made."""

    async def main():
        engine_config = EngineConfig(dtype="float32", token_budget=40, **config)
        async with await AsyncEngine.start(path, engine_config) as engine:
            outputs = await asyncio.gather(*(merged_output(engine, *request) for request in requests))
            return outputs, engine.stats().num_preemptions

    return asyncio.run(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize("config", [{}, {"num_kv_blocks": 14, "block_size": 16}], ids=["roomy", "preempting"])
def test_async_scheduling_changes_no_output(llama_path, stops, config):
    requests = mixed_requests(*stops)
    synchronous, preempted = run_together(llama_path, requests, async_scheduling=False, **config)
    asynchronous, preempted_async = run_together(llama_path, requests, async_scheduling=True, **config)
    if config:
        assert preempted > 0 and preempted_async > 0
    assert summary(asynchronous) == summary(synchronous)
    assert_same_logprobs(asynchronous, synchronous)
    assert asynchronous[3].logprobs and len(asynchronous[3].logprobs) == len(asynchronous[3].token_ids)
    assert [out.finish_reason for out in synchronous[1:3]] == ["stop", "stop"]  # the stops were hit
    # the seeded requests sampled: their tokens are not all the argmax (their raw top 1)
    assert any(entry.token_id != next(iter(entry.top)) for entry in asynchronous[3].logprobs)
    assert synchronous[6].generated_tokens == 1


def test_two_steps_are_in_flight_while_decoding(llama_path):
    async def main(async_scheduling: bool):
        config = EngineConfig(dtype="float32", async_scheduling=async_scheduling)
        async with await AsyncEngine.start(llama_path, config) as engine:
            executor, submit = engine.executor, engine.executor.submit
            outstanding, most = 0, 0

            def counting_submit(plan):
                nonlocal outstanding, most
                outstanding += 1
                most = max(most, outstanding)
                future = submit(plan)

                def done(_):
                    nonlocal outstanding
                    outstanding -= 1

                future.add_done_callback(done)
                return future

            executor.submit = counting_submit
            step_seconds: list[float] = []
            engine.step_listeners.append(lambda step, result, seconds: step_seconds.append(seconds))
            params = SamplingParams(max_new_tokens=20, ignore_eos=True)
            began = time.perf_counter()
            outs = [out async for out in engine.generate(PROMPTS[0], params)]
            wall = time.perf_counter() - began
            # steps in flight together are not counted twice: busy time never exceeds the wall time
            assert len(step_seconds) == 20 and 0 < sum(step_seconds) <= wall
            stats = engine.stats()
            return (
                most,
                sum(len(o.token_ids) for o in outs),
                stats.num_steps,
                stats.num_kv_blocks - stats.num_free_kv_blocks,
            )

    most, tokens, steps, blocks_in_use = asyncio.run(main(True))
    assert most == 2 and tokens == 20 and blocks_in_use == 0
    assert steps == 20  # the last token is known to be the last: no step computes past it
    assert asyncio.run(main(False))[0] == 1


def test_a_sequence_finishing_in_flight_is_waited_for_not_preempted():
    scheduler = Scheduler(BlockManager(2, 4), token_budget=16, max_seqs=4)
    a, b = make_seq(0, 4), make_seq(1, 3, max_new_tokens=1)  # B's first token is its last
    scheduler.add(a)
    scheduler.add(b)
    first = scheduler.schedule()
    second = scheduler.schedule()  # A's pending token needs a block, and only B holds one
    assert second.plan.chunks == [] and second.preempted == [] and scheduler.num_preemptions == 0
    for seq, _ in scheduler.commit(first, result(first, [40, 50])):
        if (reason := seq.token_stop_reason()) is not None:
            scheduler.finish(seq, reason)
    assert b.finish_reason is FinishReason.LENGTH and b.generated_token_ids == [50]
    third = scheduler.schedule()  # B's block is free now
    assert [(c.seq_id, c.start_position) for c in third.plan.chunks] == [(0, 4)]
