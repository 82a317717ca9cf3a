"""`SamplingParams`: how one request generates. Validated once, when the request arrives."""

from __future__ import annotations

import math
from typing import Any

import msgspec

from .errors import InvalidRequestError

# What the runner can represent: each limit names the device type a field becomes (runner.py,
# penalties.py, kernels/fastgen_kernels/sampling.py) or the host cost it bounds.
MAX_SEED = 2**63 - 1  # seeds are mixed into 63-bit draws and cross processes as int64
MAX_INT32 = 2**31 - 1  # top_k is an int32 tensor; token counts are bounded the same way
MAX_FLOAT32 = 3.4028234663852886e38  # temperature, top_p, min_p and the penalties are float32
MIN_NORMAL_FLOAT32 = 1.1754943508222875e-38  # the repetition penalty divides logits
MAX_LOGPROBS = 20  # most alternatives a request may ask for at each position (OpenAI's limit)
MAX_PRESENCE_FREQUENCY_PENALTY = 2.0  # OpenAI's range: -2..2
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: -100..100
MAX_STOP_STRINGS = 16  # every generated token is checked against each one on the engine's loop
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024
# options for which None (JSON null) means the default
_NONE_IS_DEFAULT = (
    "top_k",
    "temperature",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
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

    def validate(self, *, vocab_size: int | None = None) -> None:
        """Raise `InvalidRequestError` naming the first invalid field. Every value must be one the
        runner can represent (int32 ``top_k``, float32 floats, 63-bit seeds); with ``vocab_size``
        (the engine knows it) token ids must also lie in the vocabulary."""
        _check_int(self.max_new_tokens, "max_new_tokens", minimum=1, optional=True, maximum=MAX_INT32)
        _check_int(self.max_length, "max_length", minimum=1, optional=True, maximum=MAX_INT32)
        _check_int(self.min_new_tokens, "min_new_tokens", minimum=0, maximum=MAX_INT32)
        _check_int(self.top_k, "top_k", minimum=0, maximum=MAX_INT32)
        _check_int(self.seed, "seed", minimum=0, optional=True, maximum=MAX_SEED)
        _check_int(self.logprobs, "logprobs", minimum=0, optional=True, maximum=MAX_LOGPROBS)
        _check_int(self.prompt_logprobs, "prompt_logprobs", minimum=0, optional=True, maximum=MAX_LOGPROBS)
        for flag in ("do_sample", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, flag), bool):
                raise InvalidRequestError(flag, "must be a boolean")
        _check_float(self.temperature, "temperature", 0.0, MAX_FLOAT32)
        _check_float(self.top_p, "top_p", 0.0, 1.0, open_below=True)
        _check_float(self.min_p, "min_p", 0.0, 1.0)
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise InvalidRequestError(
                "min_new_tokens",
                f"{self.min_new_tokens} exceeds max_new_tokens ({self.max_new_tokens})",
            )
        _check_stop_strings(self.stop)
        _check_list(self.stop_token_ids, "stop_token_ids", MAX_STOP_TOKEN_IDS)
        check_token_ids("stop_token_ids", self.stop_token_ids, vocab_size)
        limit = MAX_PRESENCE_FREQUENCY_PENALTY
        _check_float(self.presence_penalty, "presence_penalty", -limit, limit)
        _check_float(self.frequency_penalty, "frequency_penalty", -limit, limit)
        _check_float(self.repetition_penalty, "repetition_penalty", MIN_NORMAL_FLOAT32, MAX_FLOAT32)
        if not isinstance(self.logit_bias, dict):
            raise InvalidRequestError("logit_bias", "must map token ids to numbers")
        check_token_ids("logit_bias", list(self.logit_bias), vocab_size)
        for token_id, bias in self.logit_bias.items():
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequestError(
                    "logit_bias",
                    f"the bias of token {token_id} must be a number in "
                    f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias!r}",
                )


def check_token_ids(field: str, token_ids: list, vocab_size: int | None) -> None:
    """Raise `InvalidRequestError` naming ``field`` unless every item is an integer token id:
    >= 0, and below ``vocab_size`` when it is known (else within int32)."""
    upper = MAX_INT32 + 1 if vocab_size is None else vocab_size
    # fast path in C for long prompts; the slow one finds the culprit
    if all(type(token) is int for token in token_ids) and (
        not token_ids or (min(token_ids) >= 0 and max(token_ids) < upper)
    ):
        return
    for token in token_ids:
        if not isinstance(token, int) or isinstance(token, bool):
            raise InvalidRequestError(field, f"token ids must be integers, got {token!r}")
        if not 0 <= token < upper:
            where = "the vocabulary" if vocab_size is not None else "the int32 range"
            raise InvalidRequestError(field, f"token id {token} is outside {where} [0, {upper})")


def _check_stop_strings(stop: Any) -> None:
    _check_list(stop, "stop", MAX_STOP_STRINGS)
    for text in stop:
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        if len(text) > MAX_STOP_STRING_CHARS:
            raise InvalidRequestError(
                "stop", f"a stop string has {len(text)} characters; at most {MAX_STOP_STRING_CHARS}"
            )


def _check_list(value: Any, field: str, most: int) -> None:
    if not isinstance(value, list):
        raise InvalidRequestError(field, f"must be a list, got {type(value).__name__}")
    if len(value) > most:
        raise InvalidRequestError(field, f"at most {most} items, got {len(value)}")


def _check_float(value: Any, field: str, lowest: float, highest: float, *, open_below: bool = False) -> None:
    """A finite number in [lowest, highest] (``open_below``: (lowest, highest])."""
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidRequestError(field, f"must be a finite number, got {value!r}")
    if value < lowest or value > highest or (open_below and value == lowest):
        bracket = "(" if open_below else "["
        raise InvalidRequestError(field, f"must be in {bracket}{lowest:g}, {highest:g}], got {value!r}")


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
