"""The messages between the scheduler and the model runner(s).

A `StepPlan` is the only thing that crosses from the engine to the workers, and a `StepResult`
the only thing that comes back; both are msgspec structs, so they cross process boundaries
cheaply. The worker keeps per-sequence state (block table, sampling options, how many tokens it
has sampled), so a plan carries only what changed: new sequences, new blocks, released ids.
"""

from __future__ import annotations

import msgspec

PENDING_TOKEN = -1
"""A chunk's token id that the worker fills in: the token this sequence sampled in the step before
(asynchronous scheduling plans a step before the host has seen the previous step's tokens)."""


class SamplingOptions(msgspec.Struct, array_like=True, frozen=True):
    """What a worker needs to sample for one sequence (sent once, when the sequence starts)."""

    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1.0 = off
    seed: int | None  # None: draw from the engine's stream
    min_new_tokens: int  # suppress `suppressed_token_ids` until this many tokens exist
    suppressed_token_ids: list[int]
    logprobs: int | None = None  # None: none; N >= 0: the sampled token's and the top N (raw)
    # penalties and biases (see `SamplingParams`; the neutral values are off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}
    prompt_logprobs: int | None = None  # as ``logprobs``, for each prompt token (see SequenceChunk)
    min_p: float = 0.0  # 0 = off

    @property
    def adjusts_logits(self) -> bool:
        penalties = self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        return bool(penalties or self.logit_bias)


class SequenceStart(msgspec.Struct, array_like=True):
    """A sequence the worker must start tracking before this step's chunks run."""

    seq_id: int
    sampling: SamplingOptions
    num_generated: int  # tokens generated before (non-zero when recomputing after preemption)


class SequenceChunk(msgspec.Struct, array_like=True):
    """One sequence's share of a step: ``token_ids`` at positions from ``start_position``. A decode
    may carry `PENDING_TOKEN`: the token its sequence sampled in the previous step."""

    seq_id: int
    token_ids: list[int]
    start_position: int  # tokens of this sequence already in the KV cache
    new_blocks: list[int]  # appended to the sequence's block table before the step runs
    sample: bool  # the chunk ends at the sequence's last token: sample the next one
    # prompt log-probabilities: the prompt token after each of the chunk's first len() positions
    prompt_targets: list[int] = []


class StepPlan(msgspec.Struct, array_like=True):
    """One forward pass: the ragged batch of chunks, decodes first."""

    step_id: int
    released: list[int]  # sequences to forget (finished, aborted, preempted) before this step
    started: list[SequenceStart]
    chunks: list[SequenceChunk]

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)


class SampleLogprobs(msgspec.Struct, array_like=True):
    """Raw log-probabilities at one sampled position (log-softmax of the logits over the whole
    vocabulary, before temperature, top-k and top-p): the sampled token's, then the N most likely
    tokens, most likely first."""

    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class StepResult(msgspec.Struct, array_like=True):
    """The sampled tokens of a step, one per chunk with ``sample=True``, in chunk order, and where
    the runner's time went (host preparation; then forward, sampling and the wait for the sampled ids).

    ``logprobs`` is ``None`` when no sequence of the step asked for log-probabilities; otherwise it
    is aligned with ``sampled_token_ids``, ``None`` for the rows that did not ask."""

    step_id: int
    sampled_token_ids: list[int]
    prepare_s: float = 0.0
    forward_s: float = 0.0
    logprobs: list[SampleLogprobs | None] | None = None
    # per chunk with prompt targets (in chunk order): one entry per target
    prompt_logprobs: list[list[SampleLogprobs]] | None = None
    kernel_compiles: int = 0  # Triton kernel variants compiled during this step (each one stalls it)
    # the step's own span on the device in microseconds (timing events around its device work; 0: not
    # measured, as on the CPU): against the step's wall time, says whether a slow step was slow there
    device_us: int = 0
