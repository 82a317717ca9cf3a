"""Scheduler unit tests: pure Python, no torch, no model.

A fake runner stands in for the model: it writes every token into its KV slot (found through the
block table the plans build up) and "samples" a hash of the whole context read back from those
slots. Any mistake in chunking, block tables, preemption or recompute changes the outputs or
trips its integrity checks.
"""

from __future__ import annotations

import collections
import math
import random
import subprocess
import sys
from collections.abc import Callable

import msgspec
import pytest

from fastgen.block_manager import BlockManager
from fastgen.plan import PENDING_TOKEN, SequenceChunk, StepPlan, StepResult
from fastgen.sampling_params import SamplingParams
from fastgen.scheduler import ScheduledStep, Scheduler, WaitReason
from fastgen.sequence import FinishReason, Sequence, SequenceStatus

VOCAB = 1000
EOS = 0


class FakeRunner:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.slots: list[tuple[int, int, int] | None] = [None] * (num_blocks * block_size)
        self.tables: dict[int, list[int]] = {}

    def _slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.released:
            del self.tables[seq_id]
        for start in plan.started:
            assert start.seq_id not in self.tables, "started twice without a release"
            self.tables[start.seq_id] = []
        sampled = []
        seen = set()
        for chunk in plan.chunks:
            assert chunk.seq_id not in seen, "a sequence appears twice in one step"
            seen.add(chunk.seq_id)
            table = self.tables[chunk.seq_id]
            table.extend(chunk.new_blocks)
            for i, token in enumerate(chunk.token_ids):
                position = chunk.start_position + i
                self.slots[self._slot(table, position)] = (chunk.seq_id, position, token)
            if chunk.sample:
                end = chunk.start_position + len(chunk.token_ids)
                context = []
                for position in range(end):
                    entry = self.slots[self._slot(table, position)]
                    assert entry is not None and entry[:2] == (chunk.seq_id, position), "KV cache corrupted"
                    context.append(entry[2])
                sampled.append(fake_next_token(context))
        owners: dict[int, int] = {}
        for seq_id, table in self.tables.items():
            for block in table:
                assert owners.setdefault(block, seq_id) == seq_id, "a block is shared by two sequences"
        return StepResult(plan.step_id, sampled)


def fake_next_token(context: list[int]) -> int:
    value = 7
    for token in context:
        value = (value * 31 + token + 1) % 1_000_003
    return value % VOCAB


def make_seq(seq_id: int, prompt: list[int], max_new_tokens: int) -> Sequence:
    params = SamplingParams(max_new_tokens=max_new_tokens)
    return Sequence(
        seq_id, prompt, params, max_total_tokens=len(prompt) + max_new_tokens, eos_token_ids=(EOS,)
    )


def run_to_completion(scheduler: Scheduler, runner: FakeRunner, *, max_steps: int = 100_000, on_step=None):
    steps = 0
    while scheduler.has_work:
        step = scheduler.schedule()
        assert step.plan.chunks, (
            f"nothing scheduled while work remains: {scheduler.running} {scheduler.waiting}"
        )
        assert step.plan.num_tokens <= scheduler.token_budget
        if on_step:
            on_step(step)
        result = runner.execute(step.plan)
        for seq, _token in scheduler.commit(step, result):
            reason = seq.token_stop_reason()
            if reason is not None:
                scheduler.finish(seq, reason)
        steps += 1
        assert steps < max_steps, "no progress"
    return steps


def random_requests(count: int, rng: random.Random, prompt_range=(1, 40), new_range=(1, 30)):
    return [
        ([rng.randrange(1, VOCAB) for _ in range(rng.randint(*prompt_range))], rng.randint(*new_range))
        for _ in range(count)
    ]


def run_alone(prompt: list[int], max_new_tokens: int) -> list[int]:
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(manager, token_budget=64, max_seqs=8)
    seq = make_seq(0, prompt, max_new_tokens)
    scheduler.add(seq)
    run_to_completion(scheduler, FakeRunner(64, 4))
    return seq.generated_token_ids


def test_scheduler_module_imports_no_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastgen.scheduler, fastgen.block_manager, fastgen.sequence, fastgen.engine\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_prompt_is_split_and_only_last_chunk_samples():
    manager = BlockManager(num_blocks=32, block_size=4)
    scheduler = Scheduler(manager, token_budget=16, max_seqs=4)
    seq = make_seq(0, list(range(1, 51)), max_new_tokens=3)
    scheduler.add(seq)
    chunks = []
    run_to_completion(scheduler, FakeRunner(32, 4), on_step=lambda s: chunks.extend(s.plan.chunks))
    sizes = [len(c.token_ids) for c in chunks]
    assert sizes[:4] == [16, 16, 16, 2]
    assert [c.sample for c in chunks[:4]] == [False, False, False, True]
    assert [c.start_position for c in chunks[:4]] == [0, 16, 32, 48]
    assert sizes[4:] == [1, 1]  # two decodes after the first sampled token
    assert seq.generated_token_ids == run_alone(list(range(1, 51)), 3)


def test_budget_is_filled_exactly_and_short_prompts_are_packed():
    manager = BlockManager(num_blocks=256, block_size=4)
    scheduler = Scheduler(manager, token_budget=32, max_seqs=32)
    rng = random.Random(1)
    for i, (prompt, new) in enumerate(random_requests(12, rng, prompt_range=(5, 20), new_range=(5, 5))):
        scheduler.add(make_seq(i, prompt, new))
    first = scheduler.schedule()
    assert first.plan.num_tokens == 32
    assert len(first.plan.chunks) >= 2  # several short prompts share the step
    runner = FakeRunner(256, 4)
    pending = sum(s.num_uncomputed for s in scheduler.waiting) + sum(
        s.num_uncomputed for s in scheduler.running
    )
    step = first
    while pending > 32:
        assert step.plan.num_tokens == 32, "budget not filled while prompts wait"
        result = runner.execute(step.plan)
        for seq, _ in scheduler.commit(step, result):
            if seq.token_stop_reason():
                scheduler.finish(seq, FinishReason.LENGTH)
        pending = sum(s.num_uncomputed for s in scheduler.waiting) + sum(
            s.num_uncomputed for s in scheduler.running
        )
        step = scheduler.schedule()


def test_decodes_come_first_and_are_never_starved():
    manager = BlockManager(num_blocks=512, block_size=4)
    scheduler = Scheduler(manager, token_budget=16, max_seqs=8)
    decoders = [make_seq(i, [i + 1, i + 2], max_new_tokens=40) for i in range(4)]
    for seq in decoders:
        scheduler.add(seq)
    runner = FakeRunner(512, 4)
    # one step prefills all four, then long prompts arrive
    step = scheduler.schedule()
    list(scheduler.commit(step, runner.execute(step.plan)))
    for i in range(4, 10):
        scheduler.add(make_seq(i, list(range(1, 200)), max_new_tokens=2))

    def check(step):
        live = [s for s in decoders if s.status is SequenceStatus.RUNNING]
        decode_ids = [c.seq_id for c in step.plan.chunks[: step.num_decodes]]
        for seq in live:
            assert seq.seq_id in decode_ids, "a running decode was skipped for a prompt"
        assert all(len(c.token_ids) == 1 for c in step.plan.chunks[: step.num_decodes])

    run_to_completion(scheduler, runner, on_step=check)
    for seq in decoders:
        assert seq.num_generated == 40 or seq.token_ids[-1] == EOS


def test_sequence_cap_and_wait_reasons():
    manager = BlockManager(num_blocks=4, block_size=4)
    scheduler = Scheduler(manager, token_budget=64, max_seqs=2)
    for i in range(3):
        scheduler.add(make_seq(i, [1, 2, 3], max_new_tokens=2))
    step = scheduler.schedule()
    assert len(step.plan.chunks) == 2
    assert step.wait_reason is WaitReason.SEQUENCE_CAP
    manager2 = BlockManager(num_blocks=2, block_size=4)
    scheduler2 = Scheduler(manager2, token_budget=64, max_seqs=8)
    scheduler2.add(make_seq(0, list(range(1, 9)), max_new_tokens=1))
    scheduler2.add(make_seq(1, [1, 2], max_new_tokens=1))
    step2 = scheduler2.schedule()
    assert len(step2.plan.chunks) == 1 and step2.wait_reason is WaitReason.KV_CACHE


def test_a_prompt_that_fills_the_budget_leaves_the_next_waiting_for_tokens():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), token_budget=8, max_seqs=8)
    first, second = make_seq(0, list(range(1, 9)), 2), make_seq(1, [1, 2], 2)
    scheduler.add(first)
    scheduler.add(second)
    step = scheduler.schedule()
    assert [(c.seq_id, len(c.token_ids)) for c in step.plan.chunks] == [(0, 8)]
    assert step.wait_reason is WaitReason.TOKEN_BUDGET and list(scheduler.waiting) == [second]


def test_admission_holds_back_a_reserve_for_running_sequences():
    """While sequences run, a newcomer must leave ``min(running, num_blocks // 100)`` blocks free
    (room for the running ones to grow), so it may wait although it would fit; with nothing
    running it may take every block."""

    def scheduler_with(running: int) -> Scheduler:
        scheduler = Scheduler(BlockManager(num_blocks=200, block_size=4), token_budget=64, max_seqs=8)
        seqs = [make_seq(i, [1, 2], 5) for i in range(running)]  # one block each, room to decode
        for seq in seqs:
            scheduler.add(seq)
        step = scheduler.schedule()
        list(scheduler.commit(step, StepResult(step.plan.step_id, [7] * running)))
        return scheduler

    def admits(scheduler: Scheduler, blocks: int) -> bool:
        seq = make_seq(99, list(range(1, 4 * blocks + 1)), 1)  # exactly ``blocks`` blocks of prompt
        scheduler.add(seq)
        step = scheduler.schedule()
        assert (seq.status is SequenceStatus.RUNNING) == (step.wait_reason is None)
        if step.wait_reason is not None:
            assert step.wait_reason is WaitReason.KV_CACHE
        return seq.status is SequenceStatus.RUNNING

    for running, reserve in ((0, 0), (1, 1), (3, 2)):  # 200 blocks: the reserve stops at 2
        free = 200 - running
        assert admits(scheduler_with(running), free - reserve), running
        if reserve:
            assert not admits(scheduler_with(running), free - reserve + 1), running


def test_preemption_recomputes_and_outputs_match_running_alone():
    rng = random.Random(7)
    requests = random_requests(10, rng, prompt_range=(4, 12), new_range=(20, 40))
    manager = BlockManager(num_blocks=24, block_size=4)  # 96 tokens: about two sequences at a time
    scheduler = Scheduler(manager, token_budget=16, max_seqs=8)
    seqs = [make_seq(i, p, n) for i, (p, n) in enumerate(requests)]
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler, FakeRunner(24, 4))
    assert scheduler.num_preemptions > 0, "the test should exercise preemption"
    assert any(s.num_preemptions for s in seqs)
    for seq, (prompt, new) in zip(seqs, requests):
        assert seq.generated_token_ids == run_alone(prompt, new)
    assert manager.num_free == manager.num_blocks


def test_flood_of_200_requests_on_a_cache_for_4_all_finish():
    rng = random.Random(2024)
    requests = random_requests(200, rng, prompt_range=(1, 40), new_range=(1, 24))
    # the longest request needs 16 blocks of 4; the cache holds 64 blocks: four such at a time
    manager = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(manager, token_budget=32, max_seqs=64)
    seqs = [make_seq(i, p, n) for i, (p, n) in enumerate(requests)]
    for seq in seqs:
        scheduler.add(seq)
    run_to_completion(scheduler, FakeRunner(64, 4))
    for seq, (prompt, new) in zip(seqs, requests):
        assert seq.is_finished
        assert seq.generated_token_ids == run_alone(prompt, new)
    assert manager.num_free == manager.num_blocks


def test_finish_frees_blocks_and_releases_on_the_worker():
    manager = BlockManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(manager, token_budget=16, max_seqs=4)
    runner = FakeRunner(16, 4)
    keep, drop = make_seq(0, [1, 2, 3], 10), make_seq(1, [4, 5, 6, 7, 8], 10)
    scheduler.add(keep)
    scheduler.add(drop)
    step = scheduler.schedule()
    list(scheduler.commit(step, runner.execute(step.plan)))
    used = manager.num_used
    scheduler.finish(drop, FinishReason.ABORT)
    assert manager.num_used == used - 2
    assert drop.finish_reason is FinishReason.ABORT
    step = scheduler.schedule()
    assert step.plan.released == [1]
    assert [c.seq_id for c in step.plan.chunks] == [0]
    runner.execute(step.plan)
    assert 1 not in runner.tables
    scheduler.finish(drop, FinishReason.ABORT)  # idempotent


def test_waiting_sequence_can_be_finished():
    manager = BlockManager(num_blocks=1, block_size=4)
    scheduler = Scheduler(manager, token_budget=16, max_seqs=4)
    seq = make_seq(0, [1], 1)
    scheduler.add(seq)
    scheduler.finish(seq, FinishReason.ABORT)
    assert not scheduler.has_work


# -- failed steps: only the culprit fails ---------------------------------------------------------


class FailingRunner(FakeRunner):
    """A `FakeRunner` whose step raises when ``fails(chunk, plan)`` holds for one of its chunks, after
    it wrote the step's KV and extended its block tables, as a runner whose sampling raises leaves
    them. A `PENDING_TOKEN` reads the token its sequence sampled last (0 before any)."""

    def __init__(self, num_blocks: int, block_size: int, fails: Callable[[SequenceChunk, StepPlan], bool]):
        super().__init__(num_blocks, block_size)
        self.fails = fails
        self.last_sampled: dict[int, int] = {}

    def execute(self, plan: StepPlan) -> StepResult:
        known = [
            msgspec.structs.replace(c, token_ids=[self.last_sampled.get(c.seq_id, 0)])
            if c.token_ids == [PENDING_TOKEN]
            else c
            for c in plan.chunks
        ]
        result = super().execute(msgspec.structs.replace(plan, chunks=known))
        if any(self.fails(chunk, plan) for chunk in plan.chunks):
            raise RuntimeError("a value the runner cannot handle")
        sampling = [chunk.seq_id for chunk in plan.chunks if chunk.sample]
        self.last_sampled.update(zip(sampling, result.sampled_token_ids))
        return result


def run_failing(scheduler: Scheduler, runner: FailingRunner, ahead: int) -> tuple[list[Sequence], list]:
    """Run to completion as `EngineCore` does: up to ``ahead`` steps in flight (one while isolating),
    which the runner executes in order, each failed one handed to `Scheduler.fail_step` and its
    culprit failed. Checks that isolated steps hold only sequences of failed steps. Returns the
    culprits and the failed steps."""
    in_flight: collections.deque[tuple[ScheduledStep, StepResult | None]] = collections.deque()
    culprits: list[Sequence] = []
    failed: list[ScheduledStep] = []
    suspected: set[int] = set()
    for _ in range(100_000):
        while len(in_flight) < (1 if scheduler.isolating else ahead) and scheduler.has_work:
            step = scheduler.schedule()
            if not step.plan.chunks:
                break
            assert step.isolated == scheduler.isolating
            assert not step.isolated or {seq.seq_id for seq in step.sequences} <= suspected
            try:
                in_flight.append((step, runner.execute(step.plan)))
            except RuntimeError:
                in_flight.append((step, None))
        if not in_flight:
            assert not scheduler.has_work, f"nothing scheduled: {scheduler.running} {scheduler.waiting}"
            return culprits, failed
        step, result = in_flight.popleft()
        if result is None:
            failed.append(step)
            suspected |= {seq.seq_id for seq in step.sequences}
            culprit = scheduler.fail_step(step)
            if culprit is not None:
                scheduler.finish(culprit, FinishReason.ERROR)
                culprits.append(culprit)
            continue
        for seq, _ in scheduler.commit(step, result):
            if (reason := seq.token_stop_reason()) is not None:
                scheduler.finish(seq, reason)
    raise AssertionError("no progress")


def failing_run(
    requests: list,
    fails: Callable[[SequenceChunk, StepPlan], bool],
    *,
    ahead: int,
    num_blocks: int = 256,
    **limits,
) -> tuple[list[Sequence], list[Sequence], list[ScheduledStep], Scheduler]:
    """``requests`` (seq ids are their indices) run to completion on a runner that ``fails`` so;
    checks that every block comes back."""
    scheduler = Scheduler(BlockManager(num_blocks, 4), **{"token_budget": 32, "max_seqs": 16, **limits})
    seqs = [make_seq(i, prompt, new) for i, (prompt, new) in enumerate(requests)]
    for seq in seqs:
        scheduler.add(seq)
    culprits, failed = run_failing(scheduler, FailingRunner(num_blocks, 4, fails), ahead)
    assert scheduler.block_manager.num_free == num_blocks and not scheduler.isolating
    assert scheduler.num_failed_steps == len(failed)
    return seqs, culprits, failed, scheduler


def assert_only_culprits_failed(seqs: list[Sequence], requests: list, culprits: set[int]) -> None:
    """The culprits failed; every other sequence has the tokens it has alone."""
    for seq, (prompt, new) in zip(seqs, requests):
        if seq.seq_id in culprits:
            assert seq.finish_reason is FinishReason.ERROR, seq
        else:
            assert seq.finish_reason is not FinishReason.ERROR, seq
            assert seq.generated_token_ids == run_alone(prompt, new), seq


def samples_for(*seq_ids: int) -> Callable[[SequenceChunk, StepPlan], bool]:
    """A runner that fails whenever it samples for one of ``seq_ids`` (as for a top_k it cannot hold)."""
    return lambda chunk, plan: chunk.sample and chunk.seq_id in seq_ids


@pytest.mark.parametrize("ahead", [1, 2], ids=["sync", "async"])
def test_a_culprit_among_decodes_fails_alone_and_the_others_match_running_alone(ahead):
    requests = random_requests(16, random.Random(5), prompt_range=(2, 12), new_range=(10, 25))
    requests.append(([5, 6, 7], 10))  # the culprit: admitted after the others, which decode by then
    culprit = len(requests) - 1
    seqs, culprits, failed, scheduler = failing_run(requests, samples_for(culprit), ahead=ahead)
    assert culprits == [seqs[culprit]]
    assert_only_culprits_failed(seqs, requests, {culprit})
    assert failed[0].num_decodes > 8
    # the first failure (and the step in flight behind it), a halving per failed probe, then alone
    assert len(failed) <= 2 + math.ceil(math.log2(len(failed[0].sequences)))
    assert scheduler.num_preemptions == 0  # a roomy cache: the innocents kept their KV while they waited


@pytest.mark.parametrize("ahead", [1, 2], ids=["sync", "async"])
def test_a_culprit_in_a_prompt_chunk_fails_alone(ahead):
    """Its prompt spans several steps; a chunk that does not sample fails."""
    requests = random_requests(8, random.Random(6), prompt_range=(2, 12), new_range=(10, 25))
    requests.insert(3, (list(range(1, 61)), 5))

    def fails(chunk: SequenceChunk, plan: StepPlan) -> bool:
        return chunk.seq_id == 3 and not chunk.sample and chunk.start_position > 0

    seqs, culprits, failed, _ = failing_run(requests, fails, ahead=ahead, token_budget=16)
    assert culprits == [seqs[3]] and all(len(step.sequences) > 1 for step in failed[:1])
    assert_only_culprits_failed(seqs, requests, {3})


def test_two_culprits_in_one_step_each_fail_alone():
    requests = random_requests(12, random.Random(7), prompt_range=(2, 12), new_range=(5, 25))
    seqs, culprits, failed, _ = failing_run(requests, samples_for(1, 4), ahead=2)
    assert {1, 4} <= {seq.seq_id for seq in failed[0].sequences}
    assert sorted(seq.seq_id for seq in culprits) == [1, 4]
    assert_only_culprits_failed(seqs, requests, {1, 4})


@pytest.mark.parametrize("count", [1, 12])
def test_a_failure_that_does_not_recur_fails_nobody(count):
    """The step fails once (a transient fault): its sequences are re-run and all finish, a lone
    request too, with the tokens they have alone."""
    requests = random_requests(count, random.Random(8), prompt_range=(2, 12), new_range=(5, 25))
    faults = [True]

    def fails(chunk: SequenceChunk, plan: StepPlan) -> bool:
        return plan.step_id == 2 and bool(faults) and bool(faults.pop())

    seqs, culprits, failed, _ = failing_run(requests, fails, ahead=2)
    assert culprits == [] and len(failed) == 1
    assert_only_culprits_failed(seqs, requests, set())


@pytest.mark.parametrize("ahead", [1, 2], ids=["sync", "async"])
def test_isolation_under_preemption_pressure_and_the_sequence_cap(ahead):
    """24 blocks hold about two sequences and at most 4 run: probe members take blocks and places
    from the waiting innocents, which are recomputed later, with the same tokens."""
    requests = random_requests(10, random.Random(9), prompt_range=(4, 12), new_range=(20, 40))
    seqs, culprits, _, scheduler = failing_run(
        requests, samples_for(4, 8), ahead=ahead, num_blocks=24, token_budget=16, max_seqs=4
    )
    assert scheduler.num_preemptions > 0, "the test should exercise preemption"
    assert sorted(seq.seq_id for seq in culprits) == [4, 8]
    assert_only_culprits_failed(seqs, requests, {4, 8})


def test_a_sequence_that_fails_only_in_company_finishes_and_so_do_the_others():
    """It fails every step it shares and passes alone: each round of isolation gives every suspect
    a token, so all finish, with the tokens they have alone."""
    requests = random_requests(12, random.Random(10), prompt_range=(2, 20), new_range=(5, 15))

    def fails(chunk: SequenceChunk, plan: StepPlan) -> bool:
        return chunk.seq_id == 3 and chunk.sample and len(plan.chunks) > 1

    seqs, culprits, failed, _ = failing_run(requests, fails, ahead=2)
    assert culprits == [] and len(failed) > 2
    assert_only_culprits_failed(seqs, requests, set())


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_failures_no_request_causes_end_and_harm_only_whom_they_fall_on(seed):
    """One step in five fails, whoever it holds: the run ends, and every sequence not failed has
    the tokens it has alone."""
    rng = random.Random(seed)
    requests = random_requests(12, rng, prompt_range=(2, 20), new_range=(5, 15))
    fault = random.Random(seed)
    seqs, culprits, failed, _ = failing_run(requests, lambda chunk, plan: fault.random() < 0.05, ahead=2)
    assert failed
    assert_only_culprits_failed(seqs, requests, {seq.seq_id for seq in culprits})


def test_probes_halve_the_suspects_until_one_fails_alone():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), token_budget=64, max_seqs=8)
    seqs = [make_seq(i, [1 + i, 2, 3], 5) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    first = scheduler.schedule()
    assert scheduler.fail_step(first) is None and scheduler.isolating
    assert scheduler.num_waiting == 4 and scheduler.num_preemptions == 0  # requeued, not preempted
    probe = scheduler.schedule()
    assert probe.isolated and probe.sequences == seqs[:2] and sorted(probe.plan.released) == [0, 1, 2, 3]
    assert scheduler.fail_step(probe) is None
    alone = scheduler.schedule()
    assert alone.sequences == seqs[:1] and scheduler.num_waiting == 3
    assert scheduler.fail_step(alone) is seqs[0]  # failed in company, then alone
    scheduler.finish(seqs[0], FinishReason.ERROR)
    assert scheduler.schedule().sequences == seqs[1:3]  # the first half of the suspects left
    assert scheduler.isolating


def test_suspects_that_finish_leave_isolation_and_a_step_of_finished_sequences_suspects_nobody():
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), token_budget=64, max_seqs=8)
    seqs = [make_seq(i, [1 + i, 2, 3], 5) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    step = scheduler.schedule()
    scheduler.fail_step(step)
    assert scheduler.schedule().sequences == seqs[:2]
    for seq in seqs:  # e.g. their clients left
        scheduler.finish(seq, FinishReason.ABORT)
    assert not scheduler.isolating and not scheduler.has_work
    late = make_seq(4, [9, 9, 9], 5)
    scheduler.add(late)
    step = scheduler.schedule()
    scheduler.finish(late, FinishReason.ABORT)
    assert scheduler.fail_step(step) is None and not scheduler.isolating
