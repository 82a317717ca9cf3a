"""Runner factories that the tests load inside worker processes
(``runner_factory="tests.worker_runners:NAME"``, or ``fastgen.executor.zmq.DEFAULT_RUNNER_FACTORY``
patched for an engine's executor): runners that misbehave on cue."""

from __future__ import annotations

import os
import time

from fastgen.executor.wire import WorkerSpec
from fastgen.plan import StepPlan, StepResult
from fastgen.worker import EchoRunner, Runner, build_model_runner

SLOW_TOKEN = 999  # a step holding this token takes 30 s (time to kill a worker mid-step)
RANK1_FAILS_TOKEN = 666  # rank 1 raises, rank 0 answers: the ranks fall out of step
RANK0_HANGS_TOKEN = 777  # rank 1 raises, rank 0 never answers (as if stuck in a collective)


def hang_at_start(spec: WorkerSpec, rank: int) -> EchoRunner:
    time.sleep(600)
    raise AssertionError("unreachable")


def rank1_fails_at_start(spec: WorkerSpec, rank: int) -> EchoRunner:
    if rank == 1:
        raise RuntimeError("no weights for rank 1")
    return EchoRunner(spec, rank)


def rank1_exits_at_start(spec: WorkerSpec, rank: int) -> EchoRunner:
    if rank == 1:
        print("rank 1 gives up", flush=True)
        os._exit(7)
    return EchoRunner(spec, rank)


class MisbehavingRunner(EchoRunner):
    def __init__(self, spec: WorkerSpec, rank: int):
        super().__init__(spec, rank)
        self.rank = rank

    def execute(self, plan: StepPlan) -> StepResult:
        tokens = {token for chunk in plan.chunks for token in chunk.token_ids}
        if SLOW_TOKEN in tokens:
            time.sleep(30)
        if self.rank == 1 and tokens & {RANK1_FAILS_TOKEN, RANK0_HANGS_TOKEN}:
            raise RuntimeError("rank 1 alone failed")
        if self.rank == 0 and RANK0_HANGS_TOKEN in tokens:
            time.sleep(60)
        return super().execute(plan)


class _HangsAtStep:
    """Wraps a runner: rank ``rank`` hangs, alive, when it receives step ``step_id`` (as if stuck in
    a collective); only the engine's step timeout ends that."""

    def __init__(self, runner: Runner, rank: int, hang_rank: int, step_id: int):
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks
        self.hangs = rank == hang_rank
        self.step_id = step_id

    def execute(self, plan: StepPlan) -> StepResult:
        if self.hangs and plan.step_id == self.step_id:
            while True:
                time.sleep(3600)
        return self.runner.execute(plan)


def echo_rank1_hangs_at_step1(spec: WorkerSpec, rank: int) -> _HangsAtStep:
    return _HangsAtStep(EchoRunner(spec, rank), rank, hang_rank=1, step_id=1)


def model_rank1_hangs_at_step3(spec: WorkerSpec, rank: int) -> _HangsAtStep:
    return _HangsAtStep(build_model_runner(spec, rank), rank, hang_rank=1, step_id=3)


POISONED_SEED = 666  # a request seeded so is the culprit of `PoisonedRunner` (greedy: nothing else changes)


class PoisonedRunner:
    """Wraps a runner: a step fails once it has run (KV written, the runner's state advanced, as a
    failure in sampling leaves it) if it samples for a sequence seeded `POISONED_SEED`, or with
    ``in_prompt``, if it holds a chunk of one that does not sample (a prompt spanning steps)."""

    def __init__(self, runner: Runner, in_prompt: bool = False):
        self.runner = runner
        self.num_kv_blocks = runner.num_kv_blocks
        self.in_prompt = in_prompt
        self.poisoned: set[int] = set()  # live sequences seeded POISONED_SEED

    def execute(self, plan: StepPlan, **options) -> StepResult:
        self.poisoned.difference_update(plan.released)
        self.poisoned.update(start.seq_id for start in plan.started if start.sampling.seed == POISONED_SEED)
        result = self.runner.execute(plan, **options)
        for chunk in plan.chunks:
            if chunk.seq_id in self.poisoned and (not chunk.sample if self.in_prompt else chunk.sample):
                raise RuntimeError(f"sequence {chunk.seq_id} asks for what the runner cannot do")
        return result


class FreezeReportingRunner(EchoRunner):
    """Samples how many objects this worker process has frozen out of the garbage collector."""

    def execute(self, plan: StepPlan) -> StepResult:
        import gc

        result = super().execute(plan)
        result.sampled_token_ids = [gc.get_freeze_count()] * len(result.sampled_token_ids)
        return result
