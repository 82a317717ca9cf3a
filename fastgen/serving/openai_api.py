"""OpenAI-compatible request bodies (decoded and validated by msgspec) and response objects.

Requests become a list of `Choice` jobs: one engine request per (prompt, choice) pair, ``n``
choices of one prompt getting derived seeds. Responses are plain dicts ready for JSON.

Log-probabilities are the engine's raw ones (before temperature, top-k, top-p): ``logprobs: N``
on ``/v1/completions`` (the legacy ``tokens`` / ``token_logprobs`` / ``top_logprobs`` /
``text_offset`` lists), ``logprobs: true`` with ``top_logprobs: N`` on ``/v1/chat/completions``
(``content: [{token, logprob, bytes, top_logprobs}]``); N is at most 20. A token's ``bytes`` are the
UTF-8 encoding of its text, so a token that holds part of a character shows U+FFFD there. The
log-probabilities follow the text: a token appears with the text it begins (streamed or not), and
when a stop string cuts the text, the tokens past the cut are left out (`fastgen.logprobs`
computes the texts and offsets and releases them with the text; this module only formats them).

Penalties: ``presence_penalty`` and ``frequency_penalty`` (OpenAI's, -2..2), ``repetition_penalty``
(vLLM's extension field, > 0) and ``logit_bias`` (token id, as a string key -> -100..100); see
`SamplingParams`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import msgspec

from fastgen.errors import InvalidRequestError
from fastgen.inputs import ChatMessage, ChatPrompt, Prompt
from fastgen.logprobs import shift_offsets
from fastgen.outputs import TokenLogprob
from fastgen.sampling_params import SamplingParams

MAX_CHOICES = 128
_SEED_MODULUS = 2**63
# engine option names -> the OpenAI names a client used
_FIELD_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "prompt_logprobs": "logprobs"}
_CHAT_FIELD_NAMES = {**_FIELD_NAMES, "logprobs": "top_logprobs"}
_MIN_LOGPROB = -9999.0  # what OpenAI reports for a token too unlikely to have a log-probability


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by both endpoints (OpenAI's, then fastgen/vLLM extensions)."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/completions``."""

    prompt: str | list[str | int | list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(msgspec.Struct, forbid_unknown_fields=True):
    type: str
    text: str | None = None


class ChatMessageIn(msgspec.Struct, forbid_unknown_fields=True):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageIn]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


@dataclass
class Choice:
    """One engine request of an OpenAI request."""

    index: int  # the choice's index in the response
    prompt_index: int
    prompt: Prompt
    params: SamplingParams


# -- requests -> choices ------------------------------------------------------------------------


def completion_choices(request: CompletionRequest) -> list[Choice]:
    """The engine requests of a completion request. ``echo`` with ``logprobs`` scores the prompt
    too; with ``max_tokens: 0`` it only scores the prompt (one token is generated and dropped).
    A prompt of token ids is echoed as the engine detokenizes it (evaluation harnesses send token
    ids), so its echo always asks the engine for the prompt's text and offsets."""
    _check_common(request)
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidRequestError("best_of", "only best_of == n (or unset) is supported")
    if request.suffix:
        raise InvalidRequestError("suffix", "suffixes are not supported")
    prompts = _completion_prompts(request.prompt)
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    if scores_prompt_only(request):
        max_tokens = 1
    prompt_logprobs = request.logprobs if request.echo else None
    if request.echo and prompt_logprobs is None and not isinstance(prompts[0], str):
        prompt_logprobs = 0  # the engine reads token ids back to text only while scoring them
    params = sampling_params(request, max_tokens, logprobs=request.logprobs, prompt_logprobs=prompt_logprobs)
    return _choices(request, prompts, params)


def scores_prompt_only(request: CompletionRequest) -> bool:
    """``echo`` with ``max_tokens: 0``: the prompt (and its log-probabilities) and nothing else."""
    return request.echo and request.max_tokens == 0


def echoed_prompt(prompt: Prompt, prompt_text: str | None) -> str:
    """The text an echo shows: the prompt as sent, or a prompt of token ids as the engine read
    it back (the text its log-probabilities' offsets count in)."""
    return prompt if isinstance(prompt, str) else prompt_text or ""


def chat_choices(request: ChatCompletionRequest) -> list[Choice]:
    _check_common(request)
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs: true")
    if not request.messages:
        raise InvalidRequestError("messages", "expected at least one message")
    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    params = sampling_params(request, max_tokens, logprobs=logprobs, field_names=_CHAT_FIELD_NAMES)
    messages = [
        ChatMessage(message.role, _message_text(message, i)) for i, message in enumerate(request.messages)
    ]
    return _choices(request, [ChatPrompt(messages)], params)


def _check_common(request: _Common) -> None:
    if not isinstance(request.n, int) or not 1 <= request.n <= MAX_CHOICES:
        raise InvalidRequestError("n", f"must be between 1 and {MAX_CHOICES}, got {request.n}")
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError("stream_options", "only allowed with stream: true")


def _completion_prompts(prompt: str | list) -> list[Prompt]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("prompt", "the prompt list is empty")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt):
        return list(prompt)
    raise InvalidRequestError(
        "prompt", "expected a string, a list of strings, a list of token ids or a list of token-id lists"
    )


def _message_text(message: ChatMessageIn, index: int) -> str:
    field = f"messages[{index}].content"
    if message.content is None:
        raise InvalidRequestError(field, "every message needs content (a string or text parts)")
    if isinstance(message.content, str):
        return message.content
    pieces = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequestError("messages", f"content parts of type {part.type!r} are not supported")
        pieces.append(part.text)
    return "".join(pieces)


def _choices(request: _Common, prompts: list[Prompt], base: SamplingParams) -> list[Choice]:
    choices = []
    for prompt_index, prompt in enumerate(prompts):
        for j in range(request.n):
            params = base
            if request.n > 1 and base.seed is not None:
                params = msgspec.structs.replace(base, seed=(base.seed + j) % _SEED_MODULUS)
            choices.append(Choice(len(choices), prompt_index, prompt, params))
    return choices


def sampling_params(
    request: _Common,
    max_tokens: int | None,
    *,
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    field_names: dict[str, str] = _FIELD_NAMES,
) -> SamplingParams:
    """OpenAI options -> `SamplingParams`; errors name the OpenAI field."""
    temperature = 1.0 if request.temperature is None else request.temperature
    options = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": request.min_tokens,
        "do_sample": temperature != 0,
        "temperature": temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "top_k": request.top_k or 0,
        "min_p": request.min_p or 0.0,
        "seed": request.seed,
        "stop": [request.stop] if isinstance(request.stop, str) else list(request.stop or []),
        "stop_token_ids": list(request.stop_token_ids or []),
        "include_stop_str_in_output": request.include_stop_str_in_output,
        "skip_special_tokens": request.skip_special_tokens,
        "ignore_eos": request.ignore_eos,
        "logprobs": logprobs,
        "prompt_logprobs": prompt_logprobs,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "repetition_penalty": request.repetition_penalty,
        "logit_bias": _logit_bias(request.logit_bias),
    }
    try:
        return SamplingParams.from_options(**options)
    except InvalidRequestError as exc:
        field = field_names.get(exc.field, exc.field)
        raise InvalidRequestError(field, exc.reason.replace(exc.field, field)) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's token-id strings -> ints (the values are checked with the other options)."""
    if bias is None:
        return None
    converted = {}
    for key, value in bias.items():
        try:
            converted[int(key)] = value
        except ValueError:
            raise InvalidRequestError("logit_bias", f"keys must be token ids, got {key!r}") from None
    return converted


# -- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _response_object(
    kind: str,
    response_id: str,
    model: str,
    created: int,
    choices: list[dict],
    usage_: dict | None,
    chunk: bool,
) -> dict:
    """A response body (``chunk``: one streamed event, which carries usage only when given)."""
    body = {"id": response_id, "object": kind, "created": created, "model": model, "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def completion_object(
    response_id: str, model: str, created: int, choices: list[dict], usage_: dict | None, chunk: bool
) -> dict:
    return _response_object("text_completion", response_id, model, created, choices, usage_, chunk)


def completion_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: list[TokenLogprob] | None = None,
    echoed: tuple[str, list[TokenLogprob | None]] | None = None,
) -> dict:
    """One choice; ``echoed`` (the prompt's text and log-probabilities) puts the prompt's tokens
    before the generated ones, with offsets counted in the echoed text."""
    legacy = None if logprobs is None else completion_logprobs(logprobs)
    if echoed is not None:
        legacy = echo_logprobs(*echoed, logprobs or [])
    return {"index": index, "text": text, "logprobs": legacy, "finish_reason": finish_reason}


def echo_logprobs(prompt_text: str, prompt: list[TokenLogprob | None], generated: list[TokenLogprob]) -> dict:
    """The legacy format for the prompt's tokens (the first has no log-probability and reads up to
    where the second begins) followed by the generated tokens."""
    scored = [entry for entry in prompt[1:] if entry is not None]
    legacy = completion_logprobs(scored + shift_offsets(generated, len(prompt_text)))
    first_end = scored[0].text_offset if scored else len(prompt_text)
    return {
        "tokens": [prompt_text[:first_end], *legacy["tokens"]],
        "token_logprobs": [None, *legacy["token_logprobs"]],
        "top_logprobs": [None, *legacy["top_logprobs"]],
        "text_offset": [0, *legacy["text_offset"]],
    }


def completion_logprobs(entries: list[TokenLogprob]) -> dict:
    """The legacy completions format: parallel lists, alternatives keyed by their text (where
    two alternatives read the same, the likelier one is kept)."""
    top_logprobs = []
    for entry in entries:
        alternatives: dict[str, float] = {}
        for token_id, logprob in entry.top.items():
            alternatives.setdefault(entry.top_text[token_id], _finite(logprob))
        top_logprobs.append(alternatives)
    return {
        "tokens": [entry.text for entry in entries],
        "token_logprobs": [_finite(entry.logprob) for entry in entries],
        "top_logprobs": top_logprobs,
        "text_offset": [entry.text_offset for entry in entries],
    }


def chat_object(
    response_id: str, model: str, created: int, choices: list[dict], usage_: dict | None, chunk: bool
) -> dict:
    kind = "chat.completion.chunk" if chunk else "chat.completion"
    return _response_object(kind, response_id, model, created, choices, usage_, chunk)


def chat_choice(
    index: int, text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None = None
) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None if logprobs is None else chat_logprobs(logprobs),
        "finish_reason": finish_reason,
    }


def chat_delta(
    index: int, delta: dict, finish_reason: str | None, logprobs: list[TokenLogprob] | None = None
) -> dict:
    chat = None if logprobs is None else chat_logprobs(logprobs)
    return {"index": index, "delta": delta, "logprobs": chat, "finish_reason": finish_reason}


def chat_logprobs(entries: list[TokenLogprob]) -> dict:
    """The chat format: one object per token, its alternatives most likely first."""
    content = []
    for entry in entries:
        top = [_chat_token(entry.top_text[token_id], logprob) for token_id, logprob in entry.top.items()]
        content.append({**_chat_token(entry.text, entry.logprob), "top_logprobs": top})
    return {"content": content, "refusal": None}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def _finite(logprob: float) -> float:
    return logprob if logprob >= _MIN_LOGPROB else _MIN_LOGPROB  # -inf (and NaN) are not JSON
