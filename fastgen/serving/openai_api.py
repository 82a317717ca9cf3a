"""OpenAI-compatible request bodies (decoded and validated by msgspec) and response objects.

Requests become a list of `Choice` jobs: one engine request per (prompt, choice) pair, ``n``
choices of one prompt getting derived seeds. Responses are plain dicts ready for JSON.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import msgspec

from fastgen.errors import InvalidRequestError
from fastgen.sampling_params import SamplingParams

from .prompts import ChatMessage, ChatPrompt, Prompt

MAX_CHOICES = 128
_SEED_MODULUS = 2**63
# engine option names -> the OpenAI names a client used
_FIELD_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


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
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


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
    _check_unsupported(request)
    if request.logprobs is not None:
        raise InvalidRequestError("logprobs", "log probabilities are not supported by this server yet")
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidRequestError("best_of", "only best_of == n (or unset) is supported")
    if request.suffix:
        raise InvalidRequestError("suffix", "suffixes are not supported")
    prompts = _completion_prompts(request.prompt)
    if request.echo and not all(isinstance(p, str) for p in prompts):
        raise InvalidRequestError("echo", "echo needs text prompts")
    max_tokens = 16 if request.max_tokens is None else request.max_tokens
    return _choices(request, prompts, max_tokens)


def chat_choices(request: ChatCompletionRequest) -> list[Choice]:
    _check_unsupported(request)
    if request.logprobs:
        raise InvalidRequestError("logprobs", "log probabilities are not supported by this server yet")
    if request.top_logprobs:
        raise InvalidRequestError("top_logprobs", "log probabilities are not supported by this server yet")
    if not request.messages:
        raise InvalidRequestError("messages", "expected at least one message")
    messages = [ChatMessage(message.role, _message_text(message)) for message in request.messages]
    max_tokens = (
        request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    )
    return _choices(request, [ChatPrompt(messages)], max_tokens)


def _check_unsupported(request: _Common) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            raise InvalidRequestError(name, "penalties are not supported by this server yet")
    if request.logit_bias:
        raise InvalidRequestError("logit_bias", "logit_bias is not supported by this server yet")
    if not isinstance(request.n, int) or not 1 <= request.n <= MAX_CHOICES:
        raise InvalidRequestError("n", f"must be between 1 and {MAX_CHOICES}, got {request.n}")


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


def _message_text(message: ChatMessageIn) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    pieces = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise InvalidRequestError("messages", f"content parts of type {part.type!r} are not supported")
        pieces.append(part.text)
    return "".join(pieces)


def _choices(request: _Common, prompts: list[Prompt], max_tokens: int | None) -> list[Choice]:
    base = sampling_params(request, max_tokens)
    choices = []
    for prompt_index, prompt in enumerate(prompts):
        for j in range(request.n):
            params = base
            if request.n > 1 and base.seed is not None:
                params = msgspec.structs.replace(base, seed=(base.seed + j) % _SEED_MODULUS)
            choices.append(Choice(len(choices), prompt_index, prompt, params))
    return choices


def sampling_params(request: _Common, max_tokens: int | None) -> SamplingParams:
    """OpenAI options -> `SamplingParams`; errors name the OpenAI field."""
    temperature = 1.0 if request.temperature is None else request.temperature
    options = {
        "max_new_tokens": max_tokens,
        "min_new_tokens": request.min_tokens,
        "do_sample": temperature != 0,
        "temperature": temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "top_k": request.top_k or 0,
        "seed": request.seed,
        "stop": [request.stop] if isinstance(request.stop, str) else list(request.stop or []),
        "stop_token_ids": list(request.stop_token_ids or []),
        "ignore_eos": request.ignore_eos,
    }
    try:
        return SamplingParams.from_options(**options)
    except InvalidRequestError as exc:
        field = _FIELD_NAMES.get(exc.field, exc.field)
        raise InvalidRequestError(field, exc.reason.replace(exc.field, field)) from None


# -- responses ----------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_object(
    response_id: str, model: str, created: int, choices: list[dict], usage_: dict | None, chunk: bool
) -> dict:
    body = {
        "id": response_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chat_object(
    response_id: str, model: str, created: int, choices: list[dict], usage_: dict | None, chunk: bool
) -> dict:
    body = {
        "id": response_id,
        "object": "chat.completion.chunk" if chunk else "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def chat_choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }


def chat_delta(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
