"""Prefix caching: the block manager's reference counts, registry and eviction; the scheduler
taking cached blocks at admission; and the engine's outputs with and without it."""

from __future__ import annotations

import asyncio

import pytest

from fastgen import AsyncEngine, EngineConfig, SamplingParams
from fastgen.block_manager import BlockManager, block_keys
from fastgen.plan import StepResult
from fastgen.scheduler import Scheduler
from fastgen.sequence import FinishReason, Sequence
from tests.helpers import merged_output

BLOCK = 4


def keys_of(tokens: list[int], count: int) -> list:
    return block_keys(tokens, BLOCK, count, [])


def test_keys_name_the_whole_prefix():
    a, b = keys_of([1, 2, 3, 4, 5, 6, 7, 8], 2), keys_of([9, 2, 3, 4, 5, 6, 7, 8], 2)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert a == keys_of([1, 2, 3, 4, 5, 6, 7, 8, 9], 2)
    known = a[:1]
    assert block_keys([1, 2, 3, 4, 5, 6, 7, 8], BLOCK, 2, known) == a and known == a


def test_cached_blocks_are_shared_counted_and_evicted_least_recently_freed_first():
    manager = BlockManager(4, BLOCK, prefix_caching=True)
    keys = keys_of(list(range(12)), 3)
    first = manager.allocate(3)
    for block, key in zip(first, keys):
        manager.register(block, key)
    assert manager.lookup(keys[:2]) == first[:2]  # shared while the first owner runs
    manager.free(first)
    assert manager.num_free == 2  # the third block is cached and unused; two are still shared
    manager.free(first[:2])
    assert manager.num_free == 4 and manager.num_cached == 3
    missing = keys_of([0, 1, 2, 3, 9, 9, 9, 9], 2)[1]
    assert manager.lookup([keys[0], missing, keys[2]]) == [first[0]]  # it stops at the first miss
    manager.free([first[0]])
    # the never-used block goes first, then cached ones in the order they were freed
    assert manager.allocate(1) == [3]
    assert manager.allocate(1) == [first[2]] and manager.num_cached == 2
    assert manager.allocate(2) == [first[1], first[0]] and manager.num_cached == 0
    assert manager.lookup(keys) == [] and manager.num_free == 0
    with pytest.raises(MemoryError):
        manager.allocate(1)


def test_without_prefix_caching_nothing_is_found():
    manager = BlockManager(4, BLOCK)
    block = manager.allocate(1)
    manager.register(block[0], keys_of([1, 2, 3, 4], 1)[0])
    assert manager.lookup(keys_of([1, 2, 3, 4], 1)) == [] and manager.num_cached == 0


def sequence(seq_id: int, prompt: list[int], **params) -> Sequence:
    sampling = SamplingParams(max_new_tokens=50, ignore_eos=True, **params)
    return Sequence(seq_id, prompt, sampling, max_total_tokens=len(prompt) + 50)


def run_to_completion(scheduler: Scheduler, step) -> None:
    tokens = [99] * sum(chunk.sample for chunk in step.plan.chunks)
    list(scheduler.commit(step, StepResult(step.plan.step_id, tokens)))


def test_admission_takes_the_cached_prefix_and_computes_the_rest():
    scheduler = Scheduler(BlockManager(32, BLOCK, prefix_caching=True), token_budget=64, max_seqs=8)
    prompt = list(range(3, 13))  # 10 tokens: two full blocks
    first = sequence(0, prompt)
    scheduler.add(first)
    run_to_completion(scheduler, scheduler.schedule())  # registers the two full blocks
    second = sequence(1, [*prompt, 20, 21])
    exact = sequence(2, prompt[:8])  # exactly two blocks: the second is computed (it samples)
    penalized = sequence(3, prompt, repetition_penalty=1.3)  # the worker must see every token
    for seq in (second, exact, penalized):
        scheduler.add(seq)
    step = scheduler.schedule()
    chunks = {chunk.seq_id: chunk for chunk in step.plan.chunks}
    assert chunks[1].start_position == 8 and chunks[1].token_ids == [*prompt[8:], 20, 21]
    assert second.block_table[:2] == first.block_table[:2] and second.num_cached_tokens == 8
    assert chunks[1].new_blocks == second.block_table  # the worker learns the shared blocks too
    assert chunks[2].start_position == 4 and exact.block_table[0] == first.block_table[0]
    assert chunks[3].start_position == 0 and penalized.block_table[0] != first.block_table[0]
    assert scheduler.num_cached_tokens == 3 * BLOCK


def test_finished_and_preempted_sequences_leave_their_blocks_cached():
    manager = BlockManager(8, BLOCK, prefix_caching=True)
    scheduler = Scheduler(manager, token_budget=64, max_seqs=8)
    prompt = list(range(3, 12))  # 9 tokens
    seq = sequence(0, prompt)
    scheduler.add(seq)
    run_to_completion(scheduler, scheduler.schedule())
    for _ in range(2):  # decodes positions 9 and 10: the third block is not full yet
        run_to_completion(scheduler, scheduler.schedule())
    assert manager.num_cached == 2
    run_to_completion(scheduler, scheduler.schedule())
    assert manager.num_cached == 3
    tokens = list(seq.token_ids)
    scheduler.finish(seq, FinishReason.STOP)
    assert manager.num_free == 8  # cached but unused: free for allocation
    again = sequence(1, tokens)  # a follow-up turn: everything but the last token comes cached
    scheduler.add(again)
    (chunk,) = scheduler.schedule().plan.chunks
    assert chunk.start_position == 12 and chunk.token_ids == tokens[12:]


def test_a_duplicate_computed_at_the_same_time_is_not_registered():
    manager = BlockManager(8, BLOCK, prefix_caching=True)
    scheduler = Scheduler(manager, token_budget=64, max_seqs=8)
    a, b = sequence(0, list(range(3, 12))), sequence(1, list(range(3, 12)))
    scheduler.add(a)
    scheduler.add(b)
    run_to_completion(scheduler, scheduler.schedule())  # both computed in the same step
    assert manager.num_cached == 2 and a.block_table[:2] != b.block_table[:2]
    scheduler.finish(a, FinishReason.STOP)
    scheduler.finish(b, FinishReason.STOP)
    assert manager.num_free == 8 and manager.num_cached == 2


SYSTEM = list(range(3, 70))  # a shared "system prompt" of 67 tokens


def conversation_requests() -> list[tuple[list[int], SamplingParams]]:
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    return [([*SYSTEM, 100 + i, 200 + i, 7 * i + 5], greedy) for i in range(5)]


async def serve(path: str, rounds: int, **config):
    """Round 1: the requests at once. Round 2+: each conversation continued with its previous
    output and a new user turn (the whole history is the prompt). Returns every round's outputs
    and the engine's prefix-cache hit tokens."""
    engine_config = EngineConfig(dtype="float32", token_budget=48, **config)
    async with await AsyncEngine.start(path, engine_config) as engine:
        requests = conversation_requests()
        rounds_out = []
        for turn in range(rounds):
            outs = await asyncio.gather(*(merged_output(engine, *request) for request in requests))
            rounds_out.append([(out.token_ids, out.text, out.finish_reason) for out in outs])
            requests = [
                (prompt + out.token_ids + [300 + turn], params)
                for (prompt, params), out in zip(requests, outs)
            ]
        stats = engine.stats()
        assert stats.num_free_kv_blocks == stats.num_kv_blocks
        return rounds_out, stats.prefix_cache_hit_tokens, stats.num_preemptions


@pytest.mark.parametrize("config", [{}, {"num_kv_blocks": 12}], ids=["roomy", "tight"])
def test_prefix_caching_changes_no_output_and_skips_cached_prompt_tokens(llama_path, config):
    cached, hits, preempted = asyncio.run(serve(llama_path, 3, enable_prefix_caching=True, **config))
    plain, no_hits, _ = asyncio.run(serve(llama_path, 3, enable_prefix_caching=False, **config))
    assert cached == plain
    assert no_hits == 0
    # rounds 2 and 3 find at least the whole system prompt's full blocks of every conversation
    assert hits >= 2 * 5 * (len(SYSTEM) // 16) * 16
    if config:
        assert preempted > 0


def test_an_admission_that_does_not_fit_gives_the_cached_blocks_back():
    manager = BlockManager(4, BLOCK, prefix_caching=True)
    scheduler = Scheduler(manager, token_budget=64, max_seqs=8)
    prompt = list(range(3, 12))
    first = sequence(0, prompt)
    scheduler.add(first)
    run_to_completion(scheduler, scheduler.schedule())  # 3 blocks used, 2 registered
    scheduler.add(sequence(1, [*prompt, *range(40, 46)]))  # 2 cached + 2 new blocks: 1 is free
    for _ in range(2):
        step = scheduler.schedule()
        assert [chunk.seq_id for chunk in step.plan.chunks] == [0] and step.wait_reason is not None
        run_to_completion(scheduler, step)
    assert scheduler.num_cached_tokens == 0 and manager.num_free == 1
    scheduler.finish(first, FinishReason.STOP)
    step = scheduler.schedule()
    assert [(c.seq_id, c.start_position) for c in step.plan.chunks] == [(1, 8)]
    assert scheduler.num_cached_tokens == 8


def test_eviction_takes_the_end_of_a_freed_prefix_first():
    manager = BlockManager(5, BLOCK, prefix_caching=True)
    keys = keys_of(list(range(16)), 4)
    blocks = manager.allocate(4)
    for block, key in zip(blocks, keys):
        manager.register(block, key)
    manager.free(blocks)
    assert manager.allocate(2) == [4, blocks[3]]  # the never-used block, then the prefix's last block
    assert manager.lookup(keys) == blocks[:3]  # the rest of the prefix is still found


def test_keys_are_digests_not_python_hashes():
    (first,) = keys_of([1, 2, 3, 4], 1)
    second = keys_of([1, 2, 3, 4, 5, 6, 7, 8], 2)[1]
    assert first[0] == b"" and isinstance(second[0], bytes) and len(second[0]) == 16
    assert second[0] != keys_of([9, 2, 3, 4, 5, 6, 7, 8], 2)[1][0]
