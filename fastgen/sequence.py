"""`Sequence`: one request's tokens and its place in the KV cache, owned by the scheduler."""

from __future__ import annotations

import enum

from .block_manager import BlockKey
from .plan import SamplingOptions
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens, max_length or the context length
    ABORT = "abort"  # cancelled by the caller, or failed
    ERROR = "error"


class Sequence:
    """A request's token ids (prompt, then generated) and its KV-cache bookkeeping.

    ``num_computed`` counts the tokens whose keys and values are in the cache or being put there by
    a scheduled step; the tokens after it still need a forward pass. A decoding sequence has
    exactly one such token: the last sampled. ``num_pending`` counts tokens that a scheduled step
    samples and the host has not seen yet (1, or 2 while two steps in flight sample for it): with
    asynchronous scheduling, the next step decodes such a token before it is known (the worker
    fills it in).
    """

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        max_total_tokens: int,
        eos_token_ids: tuple[int, ...] = (),
    ):
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.prompt_len = len(prompt_token_ids)
        self.params = params
        self.max_total_tokens = max_total_tokens  # prompt + output, all limits applied
        self.eos_token_ids = eos_token_ids
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.num_computed = 0
        self.num_pending = 0
        self.block_table: list[int] = []
        self.num_blocks_announced = 0  # blocks of block_table the worker knows about
        self.block_keys: list[BlockKey] = []  # prefix-cache keys of the full blocks, computed lazily
        self.num_registered_blocks = 0  # blocks of block_table known to the prefix cache
        self.num_cached_tokens = 0  # prompt tokens taken from the prefix cache at the first admission
        self.on_worker = False  # the worker tracks this sequence
        self.num_preemptions = 0
        self.sampling_options = _sampling_options(params, eos_token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed}, blocks={len(self.block_table)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_scheduled_tokens(self) -> int:
        """Tokens known or pending: what the next step continues from."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) + self.num_pending - self.num_computed

    @property
    def can_decode_pending(self) -> bool:
        """False when the pending token is the last the sequence may have (nothing to decode)."""
        return self.num_pending == 0 or self.num_scheduled_tokens < self.max_total_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def token_stop_reason(self) -> FinishReason | None:
        """Why generation must stop after the last token, judged on token ids alone."""
        if self.num_generated == 0:
            return None
        last = self.token_ids[-1]
        params = self.params
        if self.num_generated >= params.min_new_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                return FinishReason.STOP
            if last in params.stop_token_ids:
                return FinishReason.STOP
        if self.num_tokens >= self.max_total_tokens:
            return FinishReason.LENGTH
        return None

    def stop_token_reason(self) -> int | None:
        """The stop token id that ended generation (``None`` when it was EOS, or another reason)."""
        if self.num_generated == 0 or self.token_stop_reason() is not FinishReason.STOP:
            return None
        last = self.token_ids[-1]
        if not self.params.ignore_eos and last in self.eos_token_ids:
            return None
        return last


def _sampling_options(params: SamplingParams, eos_token_ids: tuple[int, ...]) -> SamplingOptions:
    suppressed = [] if params.ignore_eos else list(eos_token_ids)
    suppressed += [t for t in params.stop_token_ids if t not in suppressed]
    return SamplingOptions(
        temperature=0.0 if params.greedy else float(params.temperature),
        top_k=params.top_k,
        top_p=float(params.top_p),
        seed=params.seed,
        min_new_tokens=params.min_new_tokens,
        suppressed_token_ids=suppressed if params.min_new_tokens > 0 else [],
        logprobs=params.logprobs,
        prompt_logprobs=params.prompt_logprobs,
        min_p=float(params.min_p),
        presence_penalty=float(params.presence_penalty),
        frequency_penalty=float(params.frequency_penalty),
        repetition_penalty=float(params.repetition_penalty),
        logit_bias={token: float(bias) for token, bias in params.logit_bias.items()},
    )
