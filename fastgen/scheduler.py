"""Dynamic SplitFuse scheduling over the paged KV cache. Pure Python: no torch.

Every step gets a fixed token budget. Running decodes take one token each first; the rest of the
budget is filled exactly with prompt chunks, oldest first: a long prompt is split across steps
(only its last chunk samples), short prompts are packed together. A sequence is admitted only
when its whole remaining prompt fits in free blocks; with prefix caching, the full blocks of its
prompt that another sequence computed before are taken from the cache (`BlockManager.lookup`)
and only the rest is computed (always at least one token, which samples). When a running
sequence needs a block and none is free, the newest running sequence is preempted: its blocks
are freed and it waits to be recomputed from its prompt and the tokens it already generated.

Liveness: the oldest running sequence is never preempted while a newer one runs, so it finishes
if it fits the cache alone; admission is FIFO, so every request eventually becomes the oldest.

Asynchronous scheduling: `schedule` may be called again before the previous step's `commit`. A
scheduled step advances each sequence's ``num_computed`` at once, and a chunk that samples leaves
one pending token, which the next step decodes as `PENDING_TOKEN` (the worker knows it by then).
Sequences that turn out to be finished when the earlier step commits waste that one decode; a
pending token that reaches the length limit is never decoded. A sequence preempted while a step
that contains it is in flight starts a new incarnation: that step's token for it is dropped.

Failed steps: a step that raises while the workers live (a value the runner cannot handle, a bug
that one request's options trigger) fails only its culprit. `fail_step` makes the step's live
sequences *suspects*, requeued for recompute like preempted ones (a new incarnation: a step in
flight behind the failed one drops their tokens). While suspects remain the scheduler isolates:
steps hold only the *probe*, the first half of the suspects; other sequences wait, the running
ones keeping their KV unless a probe member needs its blocks or place. A suspect is cleared when
it samples in a step that completes (or when it finishes). A probe step that fails narrows the
probe to the first half of its sequences; one that ran a single sequence names it the culprit (it
failed in company and alone), for the caller to fail. The caller keeps one step in flight while
isolating, so a failed probe step holds probe members only. Recompute yields the tokens a
sequence would have had (greedy and seeded sampling depend on the position alone; unseeded
sampling draws anew), so the cleared go on as if nothing had failed, and a failure that does not
recur fails nobody.

Liveness while isolating: a probe can always run (it may preempt every sequence outside it, and a
sequence fits the cache alone), and each probe step advances every member it holds (clearing those
that sample), fails one sequence or halves the probe, so isolation ends. A request that fails only
sometimes may fail a later step again: each such round gives every suspect a token or fails one,
and lengths are finite.
"""

from __future__ import annotations

import collections
import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from .block_manager import BlockManager, block_keys
from .plan import PENDING_TOKEN, SequenceChunk, SequenceStart, StepPlan, StepResult
from .sequence import FinishReason, Sequence, SequenceStatus


class WaitReason(enum.Enum):
    """Why the head of the waiting queue was not admitted this step (for logs and metrics)."""

    TOKEN_BUDGET = "token_budget"
    SEQUENCE_CAP = "sequence_cap"
    KV_CACHE = "kv_cache"


@dataclass
class ScheduledStep:
    """A plan and the host-side sequences of its chunks, in the same order."""

    plan: StepPlan
    sequences: list[Sequence]
    incarnations: list[int]  # each sequence's preemption count when scheduled
    num_decodes: int = 0
    preempted: list[Sequence] = field(default_factory=list)
    wait_reason: WaitReason | None = None
    isolated: bool = False  # scheduled while isolating: holds probe members only


class Scheduler:
    """Owns the waiting queue, the running set and the block manager; one task calls it."""

    def __init__(self, block_manager: BlockManager, *, token_budget: int, max_seqs: int):
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.token_budget = token_budget
        # every running sequence must be able to decode in every step
        self.max_running = min(max_seqs, token_budget)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order, oldest first
        self._released: list[int] = []
        self._next_step_id = 0
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens admitted from the prefix cache
        self.num_failed_steps = 0
        # sequences of failed steps not cleared yet, by seq_id in the order found; the probe among them
        self._suspects: dict[int, Sequence] = {}
        self._probe: dict[int, Sequence] = {}

    # -- requests in and out -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; its prompt must fit the cache alone (checked by the engine)."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Finish ``seq`` (done, aborted or failed) and free its blocks. Idempotent."""
        if seq.status is SequenceStatus.FINISHED:
            return
        self._clear(seq)
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release_blocks(seq)
        else:
            with contextlib.suppress(ValueError):
                self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def isolating(self) -> bool:
        """Suspects remain: steps run the probe alone, and the caller keeps one in flight."""
        return bool(self._suspects)

    def _release_blocks(self, seq: Sequence) -> None:
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.num_blocks_announced = 0
        seq.num_computed = 0
        seq.num_pending = 0
        seq.num_registered_blocks = 0
        if seq.on_worker:
            self._released.append(seq.seq_id)
            seq.on_worker = False

    # -- one step --------------------------------------------------------------------------

    def schedule(self) -> ScheduledStep:
        """Plan the next forward pass. May return a plan with no chunks (nothing to run); such a
        plan is not numbered and keeps the released ids for the next one."""
        budget = self.token_budget
        chunks: list[SequenceChunk] = []
        scheduled: list[Sequence] = []
        started: list[SequenceStart] = []
        preempted: list[Sequence] = []
        probe = self._next_probe() if self._suspects else None  # None: steps hold anyone

        # 1. decodes, oldest first; a decode that needs a block may preempt the newest sequence
        decodes = [s for s in self.running if s.num_uncomputed == 1 and s.can_decode_pending]
        if probe is not None:
            decodes = [s for s in decodes if s.seq_id in probe]
        for seq in decodes:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if not self._ensure_blocks(seq, seq.num_scheduled_tokens, preempted):
                continue
            chunks.append(self._chunk(seq, seq.num_computed, 1, started))
            scheduled.append(seq)
            budget -= 1
        num_decodes = len(chunks)

        # 2. prompts already admitted and partly computed, oldest first
        for seq in self.running:
            if budget == 0:
                break
            if seq.num_uncomputed > 1 and (probe is None or seq.seq_id in probe):
                take = min(seq.num_uncomputed, budget)
                chunks.append(self._chunk(seq, seq.num_computed, take, started))
                scheduled.append(seq)
                budget -= take

        # 3. admit waiting sequences while the budget, the sequence cap and the cache allow; while
        # isolating, only the probe's members, for whom sequences outside the probe make room
        wait_reason = None
        reserve = min(len(self.running), self.block_manager.num_blocks // 100)
        queue = self.waiting
        if probe is not None:  # its members, in queue order, with nothing held back for others
            queue, reserve = collections.deque(s for s in self.waiting if s.seq_id in probe), 0
        while queue:
            seq = queue[0]
            if budget == 0:
                wait_reason = WaitReason.TOKEN_BUDGET
                break
            if probe is not None:
                self._make_room(seq, probe, preempted)
            if len(self.running) >= self.max_running:
                wait_reason = WaitReason.SEQUENCE_CAP
                break
            cached = self._cached_prefix(seq)
            needed = self.block_manager.blocks_for(seq.num_tokens) - len(cached)
            if not self.block_manager.can_allocate(needed + (reserve if self.running else 0)):
                self.block_manager.free(cached)
                wait_reason = WaitReason.KV_CACHE
                break
            queue.popleft()
            if queue is not self.waiting:
                self.waiting.remove(seq)
            seq.block_table = cached + self.block_manager.allocate(needed)
            seq.num_registered_blocks = len(cached)
            seq.num_computed = len(cached) * self.block_size
            self.num_cached_tokens += seq.num_computed
            if seq.num_preemptions == 0:  # what the request reports: its first admission
                seq.num_cached_tokens = seq.num_computed
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            take = min(seq.num_uncomputed, budget)
            chunks.append(self._chunk(seq, seq.num_computed, take, started))
            scheduled.append(seq)
            budget -= take

        released = []
        if chunks:
            released, self._released = self._released, []
        plan = StepPlan(step_id=self._next_step_id, released=released, started=started, chunks=chunks)
        self._next_step_id += bool(chunks)
        incarnations = [seq.num_preemptions for seq in scheduled]
        isolated = probe is not None
        return ScheduledStep(plan, scheduled, incarnations, num_decodes, preempted, wait_reason, isolated)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the prefix cache that hold the start of ``seq`` (with references taken)."""
        options = seq.sampling_options
        scores_prompt = options.prompt_logprobs is not None
        if not self.block_manager.prefix_caching or options.adjusts_logits or scores_prompt:
            return []  # penalties count every token id, prompt log-probabilities need every position
        full = (seq.num_tokens - 1) // self.block_size  # the last token is computed: it samples
        return self.block_manager.lookup(block_keys(seq.token_ids, self.block_size, full, seq.block_keys))

    def _register_computed(self, seq: Sequence, computed: int) -> None:
        """Offer the blocks that the first ``computed`` tokens fill to the prefix cache."""
        full = computed // self.block_size
        if full <= seq.num_registered_blocks:
            return
        keys = block_keys(seq.token_ids, self.block_size, full, seq.block_keys)
        for index in range(seq.num_registered_blocks, full):
            self.block_manager.register(seq.block_table[index], keys[index])
        seq.num_registered_blocks = full

    def _chunk(self, seq: Sequence, start: int, count: int, started: list[SequenceStart]) -> SequenceChunk:
        if not seq.on_worker:
            started.append(SequenceStart(seq.seq_id, seq.sampling_options, seq.num_generated))
            seq.on_worker = True
        new_blocks = seq.block_table[seq.num_blocks_announced :]
        seq.num_blocks_announced = len(seq.block_table)
        end = start + count
        # a pending token is always decoded alone: its sequence was fully scheduled before
        token_ids = [PENDING_TOKEN] if start == seq.num_tokens else seq.token_ids[start:end]
        sample = end == seq.num_scheduled_tokens
        seq.num_computed = end
        seq.num_pending += sample
        targets = []
        if seq.sampling_options.prompt_logprobs is not None and start < seq.prompt_len - 1:
            targets = seq.token_ids[start + 1 : min(end, seq.prompt_len - 1) + 1]
        return SequenceChunk(
            seq_id=seq.seq_id,
            token_ids=token_ids,
            start_position=start,
            new_blocks=new_blocks,
            sample=sample,
            prompt_targets=targets,
        )

    def _ensure_blocks(self, seq: Sequence, num_tokens: int, preempted: list[Sequence]) -> bool:
        """Give ``seq`` room for ``num_tokens``, preempting the newest sequences if needed.

        Returns False when ``seq`` itself had to be preempted.
        """
        needed = self.block_manager.blocks_for(num_tokens) - len(seq.block_table)
        while needed > 0:
            if self.block_manager.can_allocate(needed):
                seq.block_table.extend(self.block_manager.allocate(needed))
                return True
            victim = self._victim(seq)
            if victim is None:
                return False  # ``seq`` waits a step: sequences about to finish will free blocks
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, seq: Sequence) -> Sequence | None:
        """Whom to preempt so that ``seq`` gets a block: the newest running sequence (``seq`` itself
        when it is the newest), passing over those whose last token is being computed (their blocks
        come free when that step commits; preempting them would recompute them for one token).
        ``None`` when only such sequences are newer than ``seq``."""
        finishing = False
        for candidate in reversed(self.running):
            if candidate is seq:
                return None if finishing else seq
            if candidate.num_pending and not candidate.can_decode_pending:
                finishing = True
                continue
            return candidate
        return seq

    def _preempt(self, seq: Sequence) -> None:
        self._requeue(seq)
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and queue it first, to be recomputed (a new incarnation)."""
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- failed steps -----------------------------------------------------------------------

    def fail_step(self, step: ScheduledStep) -> Sequence | None:
        """``step`` raised and the workers live on: its culprit, for the caller to fail, when it was a
        probe step of one sequence; otherwise None, and its live sequences are suspects (see the
        module docstring). Their release tells the workers to drop what the step left behind."""
        self.num_failed_steps += 1
        live = [
            seq
            for seq, incarnation in zip(step.sequences, step.incarnations)
            if seq.status is SequenceStatus.RUNNING and seq.num_preemptions == incarnation
        ]
        if step.isolated and len(step.sequences) == 1:
            return live[0] if live else None
        for seq in reversed(live):  # each goes first: together they keep their order
            self._requeue(seq)
        self._suspects.update((seq.seq_id, seq) for seq in live)
        if step.isolated and live:
            self._probe = {seq.seq_id: seq for seq in live[: (len(live) + 1) // 2]}
        return None

    def _next_probe(self) -> dict[int, Sequence]:
        if not self._probe:
            suspects = list(self._suspects.values())
            self._probe = {seq.seq_id: seq for seq in suspects[: (len(suspects) + 1) // 2]}
        return self._probe

    def _clear(self, seq: Sequence) -> None:
        """``seq`` is no suspect (any more): it sampled in a step that completed, or it finished."""
        if self._suspects.pop(seq.seq_id, None) is not None:
            self._probe.pop(seq.seq_id, None)

    def _make_room(self, seq: Sequence, probe: dict[int, Sequence], preempted: list[Sequence]) -> None:
        """Preempt the newest running sequences outside ``probe`` until ``seq`` (a member) fits the
        sequence cap and the cache, prefix-cache hits aside."""
        needed = self.block_manager.blocks_for(seq.num_tokens)
        while len(self.running) >= self.max_running or not self.block_manager.can_allocate(needed):
            victim = next((s for s in reversed(self.running) if s.seq_id not in probe), None)
            if victim is None:
                return  # other members hold the room: they run first
            self._preempt(victim)
            preempted.append(victim)

    # -- after the step ---------------------------------------------------------------------

    def commit(self, step: ScheduledStep, result: StepResult) -> Iterator[tuple[Sequence, int]]:
        """Record a finished step; yields each live sequence that sampled, with its new token."""
        sampled = iter(result.sampled_token_ids)
        for chunk, seq, incarnation in zip(step.plan.chunks, step.sequences, step.incarnations):
            token = next(sampled) if chunk.sample else None
            if seq.status is not SequenceStatus.RUNNING or seq.num_preemptions != incarnation:
                continue  # finished, aborted or preempted since the step was scheduled
            if self.block_manager.prefix_caching:
                self._register_computed(seq, chunk.start_position + len(chunk.token_ids))
            if token is not None:
                seq.num_pending -= 1
                seq.append_token(token)
                if self._suspects:
                    self._clear(seq)
                yield seq, token
