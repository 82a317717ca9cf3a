"""Scheduler unit tests: pure Python, no torch, no model.

A fake runner stands in for the model: it writes every token into its KV slot (found through the
block table the plans build up) and "samples" a hash of the whole context read back from those
slots. Any mistake in chunking, block tables, preemption or recompute changes the outputs or
trips its integrity checks.
"""

from __future__ import annotations

import random
import subprocess
import sys

from fastgen.block_manager import BlockManager
from fastgen.plan import StepPlan, StepResult
from fastgen.sampling_params import SamplingParams
from fastgen.scheduler import Scheduler, WaitReason
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
