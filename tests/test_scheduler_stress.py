"""The scheduler under everything at once: asynchronous scheduling (two steps in flight), prefix
caching with shared system prompts, a cache small enough to preempt, EOS, aborts and late
arrivals. Pure Python: a fake runner writes each token into its KV slot and "samples" a hash of the
context it reads back, so a wrong block table, a stale shared block, a lost pending token or a
token committed to the wrong incarnation changes the outputs. Every sequence must produce what it
produces alone, and every block must be free at the end."""

from __future__ import annotations

import collections
import random

import pytest

from fastgen.block_manager import BlockManager
from fastgen.plan import PENDING_TOKEN, StepPlan, StepResult
from fastgen.sampling_params import SamplingParams
from fastgen.scheduler import Scheduler
from fastgen.sequence import FinishReason, Sequence

BLOCK = 4
EOS = 0


class KVRunner:
    """Keeps (position, token) in every KV slot; samples a hash of the context read back."""

    def __init__(self, num_blocks: int):
        self.slots: list[tuple[int, int] | None] = [None] * (num_blocks * BLOCK)
        self.tables: dict[int, list[int]] = {}
        self.last: dict[int, int] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.released:
            del self.tables[seq_id]
            self.last.pop(seq_id, None)
        for start in plan.started:
            assert start.seq_id not in self.tables, "started twice without a release"
            self.tables[start.seq_id] = []
        sampled = []
        for chunk in plan.chunks:
            table = self.tables[chunk.seq_id]
            table.extend(chunk.new_blocks)
            tokens = [self.last[chunk.seq_id] if t == PENDING_TOKEN else t for t in chunk.token_ids]
            assert PENDING_TOKEN not in chunk.token_ids or len(chunk.token_ids) == 1
            for offset, token in enumerate(tokens):
                position = chunk.start_position + offset
                self.slots[self._slot(table, position)] = (position, token)
            if chunk.sample:
                end = chunk.start_position + len(tokens)
                context = []
                for position in range(end):
                    entry = self.slots[self._slot(table, position)]
                    assert entry is not None and entry[0] == position, "KV cache corrupted"
                    context.append(entry[1])
                token = fake_next_token(context)
                self.last[chunk.seq_id] = token
                sampled.append(token)
        return StepResult(plan.step_id, sampled)

    @staticmethod
    def _slot(table: list[int], position: int) -> int:
        return table[position // BLOCK] * BLOCK + position % BLOCK


def fake_next_token(context: list[int]) -> int:
    value = 7
    for token in context:
        value = (value * 31 + token + 1) % 1_000_003
    return value % 97  # EOS (0) now and then


def make_seq(seq_id: int, prompt: list[int], max_new_tokens: int) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    total = len(prompt) + max_new_tokens
    return Sequence(seq_id, prompt, params, max_total_tokens=total, eos_token_ids=(EOS,))


def alone(prompt: list[int], max_new_tokens: int) -> list[int]:
    scheduler = Scheduler(BlockManager(256, BLOCK), token_budget=64, max_seqs=4)
    seq = make_seq(0, prompt, max_new_tokens)
    scheduler.add(seq)
    runner = KVRunner(256)
    while scheduler.has_work:
        step = scheduler.schedule()
        for done, _ in scheduler.commit(step, runner.execute(step.plan)):
            if (reason := done.token_stop_reason()) is not None:
                scheduler.finish(done, reason)
    return seq.generated_token_ids


SEEDS = range(6)


@pytest.mark.parametrize("seed", SEEDS)
def test_async_prefix_cached_preempting_scheduler_matches_running_alone(seed):
    simulate(seed)


def test_the_simulations_preempt_abort_and_stop():
    counts = [simulate(seed) for seed in SEEDS]
    assert all(sum(column) > 0 for column in zip(*counts)), counts


def simulate(seed: int) -> tuple[int, int, int]:
    """Runs one random workload; returns (preemptions, aborts, EOS stops)."""
    rng = random.Random(seed)
    num_blocks = rng.choice([24, 40, 64])
    manager = BlockManager(num_blocks, BLOCK, prefix_caching=True)
    scheduler = Scheduler(manager, token_budget=rng.choice([8, 16, 32]), max_seqs=rng.choice([3, 6, 16]))
    runner = KVRunner(num_blocks)
    systems = [[rng.randrange(1, 97) for _ in range(rng.randint(4, 30))] for _ in range(3)]
    requests = []
    for seq_id in range(40):
        prompt = rng.choice(systems) + [rng.randrange(1, 97) for _ in range(rng.randint(1, 12))]
        requests.append(make_seq(seq_id, prompt, rng.randint(1, 20)))
    arrivals = collections.deque(requests)
    aborted: set[int] = set()
    in_flight: collections.deque = collections.deque()
    steps = 0
    while arrivals or scheduler.has_work or in_flight:
        for _ in range(rng.randint(0, 3)):  # requests arrive over time
            if arrivals:
                scheduler.add(arrivals.popleft())
        if rng.random() < 0.05 and scheduler.running:  # the caller goes away
            victim = rng.choice(scheduler.running)
            scheduler.finish(victim, FinishReason.ABORT)
            aborted.add(victim.seq_id)
        while len(in_flight) < 2 and scheduler.has_work:  # plan ahead, as the engine does
            step = scheduler.schedule()
            if not step.plan.chunks:
                break
            in_flight.append((step, runner.execute(step.plan)))  # the device runs steps in order
        if in_flight:
            step, result = in_flight.popleft()
            for seq, _ in scheduler.commit(step, result):
                if (reason := seq.token_stop_reason()) is not None:
                    scheduler.finish(seq, reason)
        steps += 1
        assert steps < 20_000, f"no progress: {scheduler.running} {scheduler.waiting}"
    assert manager.num_free == num_blocks  # every block free or cached-and-unused
    for seq in requests:
        if seq.seq_id not in aborted:
            assert seq.finish_reason is not None
            prompt = seq.token_ids[: seq.prompt_len]
            assert seq.generated_token_ids == alone(prompt, seq.params.max_new_tokens)
    assert scheduler.num_cached_tokens > 0  # the shared system prompts were found in the cache
    stops = sum(seq.finish_reason is FinishReason.STOP for seq in requests)
    return scheduler.num_preemptions, len(aborted), stops
