"""What the engine reports: each request's output deltas, and a snapshot of the engine.

Plain data that crosses processes (msgspec structs and a dataclass that msgspec encodes). Importing
this module loads no engine code and no torch, so a client process can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec


class TokenLogprob(msgspec.Struct, array_like=True, frozen=True):
    """The raw log-probabilities at one generated position (see `SamplingParams.logprobs`).

    - ``token_id``, ``logprob``: the generated token and its log-probability.
    - ``top``: the ``logprobs`` most likely tokens at this position, most likely first
      (token id -> log-probability); the generated token is among them only if it ranks there.
    - ``text``: how the generated token reads after the tokens before it (special tokens spelled
      out, e.g. ``</s>``); ``top_text`` the same for each alternative.
    - ``text_offset``: where the token's text begins in the generated text. Tokens that hold
      parts of one character (an incomplete UTF-8 sequence reads as U+FFFD on its own) begin
      where the character does; a special token, absent from the text, where the text stands.

    `fastgen.logprobs` computes them, and holds the views that show them beside text.
    """

    token_id: int
    logprob: float
    top: dict[int, float]
    text: str
    top_text: dict[int, str]
    text_offset: int


class RequestOutput(msgspec.Struct, kw_only=True):
    """The new part of one request's output since the previous `RequestOutput`.

    ``text`` and ``token_ids`` are deltas; the counts are cumulative. ``finish_reason`` is
    ``None`` until the last output, then ``"stop"``, ``"length"`` or ``"abort"``; ``stop_reason``
    then names the stop string or stop token id that ended generation (``None`` for EOS and for
    the other reasons).

    ``logprobs`` is ``None`` unless the request asked for them; then it holds one `TokenLogprob`
    per token of ``token_ids``, in the same order. A stop string cuts the text, not the token ids:
    the tokens that produced the stop string keep their log-probabilities, and those that begin
    past the cut have a ``text_offset`` of at least the final text's length (the OpenAI layer
    leaves them out).

    ``cached_tokens`` counts the prompt tokens whose keys and values came from the prefix cache
    (known from the first output on).

    ``prompt_logprobs`` (when the request asked, in its first output only) has one entry per prompt
    token: ``None`` for the first, then each token's `TokenLogprob` after the tokens before it
    (``text_offset`` counts in ``prompt_text``, the prompt's token ids detokenized, which comes
    with them).
    """

    request_id: str
    text: str
    token_ids: list[int]
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_text: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class EngineStats:
    """A snapshot of the engine's state (for metrics and tests)."""

    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    num_preemptions: int
    num_steps: int
    generated_tokens: int
    prompt_tokens: int
    prefix_cache_hit_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    num_failed_steps: int = 0  # steps that raised (the scheduler then isolates their culprit)
    kernel_compiles: int = 0  # Triton kernel variants compiled by steps (after start-up, which compiles all)
