"""`SamplingParams`: how one request generates. Validated once, when the request arrives."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from .errors import InvalidRequestError

_MAX_SEED = 2**63 - 1
MAX_LOGPROBS = 20  # most alternatives a request may ask for at each position (OpenAI's limit)
MAX_PRESENCE_FREQUENCY_PENALTY = 2.0  # OpenAI's range: -2..2
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100..100
# options for which None (JSON null) means the default
_NONE_IS_DEFAULT = (
    "top_k", "temperature", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias"
)


class SamplingParams(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Generation options of one request (names follow MII / HF `generate`).

    - ``max_new_tokens``: most tokens to generate (default: until ``max_length`` or the context).
    - ``max_length``: most tokens of prompt + output.
    - ``min_new_tokens``: EOS and ``stop_token_ids`` are suppressed until this many tokens exist.
    - ``do_sample``: sample (``True``) or take the argmax (``False``); ``temperature == 0`` is
      greedy too.
    - ``temperature``, ``top_k`` (0 = off), ``top_p`` (1.0 = off), ``min_p`` (0 = off: tokens less
      likely than ``min_p`` times the likeliest one, after temperature, are dropped): the sampling
      distribution.
    - ``ignore_eos``: keep going past EOS.
    - ``stop``: strings that end generation; the output is cut before the stop string (after it
      with ``include_stop_str_in_output``, vLLM's name; the same for the text of a stop token).
    - ``skip_special_tokens``: leave special tokens (EOS, BOS, ...) out of the text (the default).
    - ``stop_token_ids``: extra token ids that end generation (kept in the output ids).
    - ``seed``: a per-request seed; the same seed gives the same tokens whatever else runs.
    - ``logprobs``: ``None`` (off), ``0`` (the log-probability of each generated token) or ``N``
      (also the ``N`` most likely tokens at each position, at most 20). These are *raw*
      log-probabilities: log-softmax over the whole vocabulary of the model's logits, before
      temperature, top-k, top-p and ``min_new_tokens`` touch them (vLLM's default), so a sampled
      request reports the model's distribution, not the one it sampled from.
    - ``prompt_logprobs``: the same for the prompt: the log-probability of each prompt token after
      the tokens before it (and the ``N`` most likely there), e.g. to score text. Such a request
      computes its whole prompt (it takes nothing from the prefix cache).
    - ``presence_penalty``, ``frequency_penalty`` (OpenAI, -2..2, 0 = off): each token's logit is
      lowered by ``presence_penalty`` if it occurs in the output so far, plus ``frequency_penalty``
      times the number of times it does (the prompt does not count).
    - ``repetition_penalty`` (HF / vLLM, > 0, 1.0 = off): for each token of the prompt or the output
      so far, a positive logit is divided by it, a negative one multiplied by it.
    - ``logit_bias``: token id -> a value in -100..100 added to that token's logit.

    The penalties apply to the model's logits first (repetition, then frequency and presence),
    then the biases, then ``min_new_tokens`` suppression, temperature, top-k and top-p; a greedy
    request takes the argmax of the adjusted logits.
    """

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    ignore_eos: bool = False
    stop: list[str] = []
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[int] = []
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}

    @classmethod
    def from_options(cls, **options: Any) -> SamplingParams:
        """Build from keyword options, naming any unknown or mistyped option in the error."""
        known = set(cls.__struct_fields__)
        for name in options:
            if name not in known:
                raise InvalidRequestError(name, f"unknown option (known: {', '.join(sorted(known))})")
        if isinstance(options.get("stop"), str):
            options["stop"] = [options["stop"]]
        for name in _NONE_IS_DEFAULT:
            if name in options and options[name] is None:
                del options[name]
        try:
            params = msgspec.convert(options, cls, strict=False)
        except msgspec.ValidationError as exc:
            field = _field_from_message(str(exc))
            raise InvalidRequestError(field, str(exc)) from None
        params.validate()
        return params

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first invalid field."""
        _check_int(self.max_new_tokens, "max_new_tokens", minimum=1, optional=True)
        _check_int(self.max_length, "max_length", minimum=1, optional=True)
        _check_int(self.min_new_tokens, "min_new_tokens", minimum=0)
        _check_int(self.top_k, "top_k", minimum=0)
        _check_int(self.seed, "seed", minimum=0, optional=True, maximum=_MAX_SEED)
        _check_int(self.logprobs, "logprobs", minimum=0, optional=True, maximum=MAX_LOGPROBS)
        _check_int(self.prompt_logprobs, "prompt_logprobs", minimum=0, optional=True, maximum=MAX_LOGPROBS)
        if not isinstance(self.do_sample, bool):
            raise InvalidRequestError("do_sample", "must be a boolean")
        if not isinstance(self.ignore_eos, bool):
            raise InvalidRequestError("ignore_eos", "must be a boolean")
        for flag in ("include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequestError(flag, "must be a boolean")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                "temperature", f"must be a finite number >= 0, got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                "min_new_tokens",
                f"{self.min_new_tokens} exceeds max_new_tokens ({self.max_new_tokens})",
            )
        for stop in self.stop:
            if not isinstance(stop, str) or not stop:
                raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        for token_id in self.stop_token_ids:
            _check_int(token_id, "stop_token_ids", minimum=0)
        limit = MAX_PRESENCE_FREQUENCY_PENALTY
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -limit <= value <= limit:
                raise InvalidRequestError(name, f"must be a number in [-{limit:g}, {limit:g}], got {value!r}")
        penalty = self.repetition_penalty
        if not _is_number(penalty) or not math.isfinite(penalty) or penalty <= 0:
            raise InvalidRequestError("repetition_penalty", f"must be a finite number > 0, got {penalty!r}")
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequestError("logit_bias", "must map token ids to numbers")
        for token_id, bias in self.logit_bias.items():
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise InvalidRequestError(
                    "logit_bias", f"keys must be token ids (integers >= 0), got {token_id!r}"
                )
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(
                    "logit_bias",
                    f"the bias of token {token_id} must be a number in "
                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}",
                )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(
    value: Any, field: str, *, minimum: int, optional: bool = False, maximum: int | None = None
) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequestError(field, f"must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidRequestError(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidRequestError(field, f"must be <= {maximum}, got {value}")


def _field_from_message(message: str) -> str:
    # msgspec reports e.g. "Expected `int`, got `str` - at `$.max_new_tokens`"
    marker = "at `$."
    if marker in message:
        return message.split(marker, 1)[1].split("`", 1)[0].split("[", 1)[0]
    return "options"
