"""`EngineCore`: the engine's step, synchronous, with no event loop of its own.

The core owns the scheduler (and through it the block manager and the sequences) and the executor.
`add` and `abort` change what runs. `launch` schedules steps and submits them to the executor until
``ahead`` are in flight; the executor starts a step before `submit` returns and hands back a future
of its result, so nothing here blocks on the device. Once the oldest step's future is done, `step`
updates from it (commit its tokens, apply the token-level stop checks: EOS, stop tokens, lengths)
and launches what can run next, then returns the step's `CoreOutputs`, which the caller delivers
(detokenization, stop strings: the `OutputProcessor`) while those next steps run.

Asynchronous scheduling (``ahead == 2``): step N+1 is planned and submitted while step N runs (the
workers fill in N's tokens, see `fastgen.scheduler`), so the next step is queued on the worker
before the current one ends and the device never waits for the host between steps. A sequence that
a stop string ends meanwhile computes one wasted token in step N+1, which `Scheduler.commit` drops.

A step that fails while the executor lives fails only the request that caused it (`StepError`):
the scheduler re-runs the step's sequences in halves until it finds it (`Scheduler.fail_step`),
with one step in flight meanwhile; the others go on with the tokens they would have had. When the
executor died with the step, the engine cannot go on (`CoreOutputs.fatal`): the step's requests
fail with `StepError`, the others with `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .errors import EngineDeadError, EngineOverloadedError, InvalidRequestError, StepError
from .executor import Executor
from .outputs import EngineStats
from .plan import SampleLogprobs, StepResult
from .sampling_params import SamplingParams
from .scheduler import ScheduledStep, Scheduler
from .sequence import FinishReason, Sequence

logger = logging.getLogger("fastgen.engine")

_InFlight = tuple[ScheduledStep, asyncio.Future, float]  # a step, its result, when it was submitted

SampledToken = tuple[Sequence, int, FinishReason | None, SampleLogprobs | None]  # with its stop reason
PromptScores = tuple[Sequence, int, list[int], list[SampleLogprobs]]  # start position, targets, samples


@dataclass
class CoreOutputs:
    """What one turn of the core did to the sequences, for the `OutputProcessor`."""

    sampled: list[SampledToken] = field(default_factory=list)
    prompt_scores: list[PromptScores] = field(default_factory=list)
    failed: list[tuple[Sequence, BaseException]] = field(default_factory=list)
    fatal: BaseException | None = None  # the engine cannot go on (raise it once delivered)
    step: ScheduledStep | None = None  # the step whose result this is
    result: StepResult | None = None
    received_s: float = 0.0  # when the result was taken
    launched_s: float = 0.0  # when the next steps were submitted


@dataclass
class StepProfile:
    """Where step time goes, summed over steps: the runner's host preparation and its forward
    (launch, device work, wait for the sampled ids), and the engine's host work between a
    step's result and the next launch (on the critical path) or overlapped with the next step."""

    steps: int = 0
    tokens: int = 0
    prepare_s: float = 0.0
    forward_s: float = 0.0
    between_steps_s: float = 0.0
    overlapped_s: float = 0.0

    def add(self, outputs: CoreOutputs, delivered_s: float) -> None:
        """Count a step whose outputs were delivered at ``delivered_s``."""
        if outputs.step is None or outputs.result is None:
            return
        self.steps += 1
        self.tokens += outputs.step.plan.num_tokens
        self.prepare_s += outputs.result.prepare_s
        self.forward_s += outputs.result.forward_s
        self.between_steps_s += outputs.launched_s - outputs.received_s
        self.overlapped_s += delivered_s - outputs.launched_s

    def as_dict(self) -> dict[str, float]:
        per_step = 1e3 / max(self.steps, 1)
        return {
            "steps": self.steps,
            "tokens_per_step": self.tokens / max(self.steps, 1),
            "runner_prepare_ms": self.prepare_s * per_step,
            "runner_forward_ms": self.forward_s * per_step,
            "engine_between_steps_ms": self.between_steps_s * per_step,
            "engine_overlapped_ms": self.overlapped_s * per_step,
        }


class EngineCore:
    """The scheduler and the executor, stepped by one caller."""

    def __init__(self, config: EngineConfig, executor: Executor, eos_token_ids: tuple[int, ...]):
        self.config = config
        self.executor = executor
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(
            executor.num_kv_blocks, config.block_size, prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, token_budget=config.token_budget, max_seqs=config.max_seqs
        )
        self.ahead = 2 if config.async_scheduling else 1  # steps in flight at most
        self._in_flight: collections.deque[_InFlight] = collections.deque()
        self._arrivals: list[Sequence] = []  # added since the last launch
        self._seq_ids = itertools.count()
        self._last_received_s = 0.0  # a step queued behind another only starts once that one is back
        self.num_steps = 0
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.kernel_compiles = 0
        # callables(step, result, seconds) for metrics; seconds run from when the step could start (its
        # submission, or the return of the step it was queued behind) to its result's arrival here
        self.step_listeners: list[Callable[[ScheduledStep, StepResult, float], None]] = []

    # -- requests ---------------------------------------------------------------------------

    def check_capacity(self) -> None:
        """Raise `EngineOverloadedError` when ``max_queued_requests`` wait already. Arrivals that
        the next step can start running do not count as queued."""
        scheduler = self.scheduler
        free_slots = max(0, scheduler.max_running - scheduler.num_running - scheduler.num_waiting)
        queued = scheduler.num_waiting + max(0, len(self._arrivals) - free_slots)
        if queued >= self.config.max_queued_requests:
            raise EngineOverloadedError(
                f"{queued} requests are waiting (max_queued_requests={self.config.max_queued_requests})"
            )

    def add(self, prompt_ids: list[int], params: SamplingParams, max_total_tokens: int) -> Sequence:
        """A new sequence; the next `launch` queues it."""
        seq = Sequence(
            next(self._seq_ids),
            prompt_ids,
            params,
            max_total_tokens=max_total_tokens,
            eos_token_ids=self.eos_token_ids,
        )
        self._arrivals.append(seq)
        return seq

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish ``seq`` now (aborted, or ended by a stop string) and free its blocks; a step in
        flight that holds it drops its token."""
        self.scheduler.finish(seq, reason)

    @property
    def has_work(self) -> bool:
        return bool(self._arrivals) or self.scheduler.has_work

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_kv_blocks=self.block_manager.num_blocks,
            num_free_kv_blocks=self.block_manager.num_free,
            num_preemptions=self.scheduler.num_preemptions,
            num_failed_steps=self.scheduler.num_failed_steps,
            num_steps=self.num_steps,
            generated_tokens=self.generated_tokens,
            prompt_tokens=self.prompt_tokens,
            prefix_cache_hit_tokens=self.scheduler.num_cached_tokens,
            kernel_compiles=self.kernel_compiles,
        )

    # -- steps ------------------------------------------------------------------------------

    @property
    def next_result(self) -> asyncio.Future | None:
        """The result `step` reads next (the oldest step in flight); None when none is in flight."""
        return self._in_flight[0][1] if self._in_flight else None

    def launch(self) -> None:
        """Queue the arrivals, then schedule and submit steps until ``ahead`` are in flight or
        nothing more can run now."""
        for seq in self._arrivals:
            if not seq.is_finished:  # not aborted on arrival
                self.scheduler.add(seq)
                self.prompt_tokens += seq.prompt_len
        self._arrivals.clear()
        ahead = 1 if self.scheduler.isolating else self.ahead  # a failed probe step holds its members only
        while len(self._in_flight) < ahead and self.scheduler.has_work:
            step = self.scheduler.schedule()
            if not step.plan.chunks:
                return
            self._in_flight.append((step, self.executor.submit(step.plan), time.perf_counter()))

    def step(self) -> CoreOutputs:
        """Update from the oldest step in flight, whose result must be in; then launch the next."""
        step, future, submitted_s = self._in_flight.popleft()
        outputs = CoreOutputs(step=step)
        error = future.exception()
        if error is not None:
            self._fail_step(step, error, outputs)
            return outputs
        result = outputs.result = future.result()
        outputs.received_s = time.perf_counter()
        self.num_steps += 1
        if result.prompt_logprobs is not None:
            outputs.prompt_scores = _prompt_scores(step, result.prompt_logprobs)
        logprobs = _logprobs_by_seq(step, result)
        for seq, token in self.scheduler.commit(step, result):
            reason = seq.token_stop_reason()
            if reason is not None:
                self.scheduler.finish(seq, reason)
            outputs.sampled.append((seq, token, reason, logprobs.get(seq.seq_id)))
        self.generated_tokens += len(outputs.sampled)
        self.kernel_compiles += result.kernel_compiles
        for listener in self.step_listeners:
            listener(step, result, outputs.received_s - max(submitted_s, self._last_received_s))
        self._last_received_s = outputs.received_s
        self.launch()
        outputs.launched_s = time.perf_counter()
        return outputs

    def fail_unschedulable(self) -> CoreOutputs:
        """With nothing in flight and nothing schedulable, the head of the queue cannot fit an
        empty cache (the admission checks rule that out): fail it rather than spin."""
        outputs = CoreOutputs()
        if self.scheduler.running or not self.scheduler.waiting:
            return outputs
        seq = self.scheduler.waiting[0]
        self.scheduler.finish(seq, FinishReason.ERROR)
        outputs.failed.append((seq, InvalidRequestError("prompt", "the prompt does not fit the KV cache")))
        return outputs

    def abandon(self) -> None:
        """Cancel the steps in flight, whose results nobody will read, and mark their errors as
        seen (an unread error is logged when its future is collected, at an arbitrary point of the
        host's program)."""
        for _, future, _ in self._in_flight:
            future.cancel()
            future.add_done_callback(_consume_error)
        self._in_flight.clear()

    def _fail_step(self, step: ScheduledStep, error: BaseException, outputs: CoreOutputs) -> None:
        step_id = step.plan.step_id
        if self.executor.is_alive:
            culprit = self.scheduler.fail_step(step)
            if culprit is None:
                logger.warning(
                    "step %d failed (%r): re-running its %d sequences in halves",
                    step_id,
                    error,
                    len(step.sequences),
                )
                return
            logger.error("step %d failed with one request alone, which fails", step_id, exc_info=error)
            failure = StepError(f"a forward step failed, also with this request alone in it: {error!r}")
            self.scheduler.finish(culprit, FinishReason.ERROR)
            outputs.failed.append((culprit, failure))
            return
        logger.error("step %d failed and the executor with it", step_id, exc_info=error)
        failure = StepError(f"a forward step failed: {error!r}")
        for seq in step.sequences:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ERROR)
                outputs.failed.append((seq, failure))
        outputs.fatal = EngineDeadError(f"the executor died: {error}")
        outputs.fatal.__cause__ = error


def _consume_error(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _logprobs_by_seq(step: ScheduledStep, result: StepResult) -> dict[int, SampleLogprobs]:
    """seq_id -> the raw log-probabilities the runner computed for it this step."""
    if result.logprobs is None:
        return {}
    sampling = [seq for chunk, seq in zip(step.plan.chunks, step.sequences) if chunk.sample]
    return {seq.seq_id: row for seq, row in zip(sampling, result.logprobs) if row is not None}


def _prompt_scores(step: ScheduledStep, scored: list[list[SampleLogprobs]]) -> list[PromptScores]:
    """The prompt log-probabilities of a step, per chunk that asked, for the sequences still in the
    incarnation that computed them (a preempted sequence scores its prompt again)."""
    rows = iter(scored)
    scores = []
    for chunk, seq, incarnation in zip(step.plan.chunks, step.sequences, step.incarnations):
        if not chunk.prompt_targets:
            continue
        samples = next(rows)
        if seq.num_preemptions == incarnation:
            scores.append((seq, chunk.start_position, chunk.prompt_targets, samples))
    return scores
