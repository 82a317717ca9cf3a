"""DeepSpeed-MII compatibility: generation options with MII's names and defaults, and its
`Response` objects. Shared by `pipeline`, the persistent-deployment clients and the REST route."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from .errors import InvalidRequestError
from .sampling_params import SamplingParams

# MII's defaults (mii/config.py GenerateParamsConfig): sampling with top_p 0.9, 1024 tokens total
MII_DEFAULTS: dict[str, Any] = {
    "max_length": 1024,
    "max_new_tokens": None,
    "min_new_tokens": 0,
    "ignore_eos": False,
    "return_full_text": False,
    "do_sample": True,
    "top_p": 0.9,
    "top_k": None,
    "temperature": None,
    "stop": [],
    "seed": None,
    "stream": False,
}


class Response(msgspec.Struct, kw_only=True):
    """One prompt's result, as MII returns it."""

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str

    def __str__(self) -> str:
        return self.generated_text


class _Counts(Protocol):
    """What a `Response` takes from an output: a `RequestOutput` delta or a `CollectedOutput`."""

    prompt_tokens: int
    generated_tokens: int
    finish_reason: str | None


def mii_response(prompt: str, text: str, output: _Counts, *, full_text: bool, first: bool = True) -> Response:
    """MII's `Response` for ``text`` of ``prompt``: the whole generated text, or one streamed delta
    (``first``: the first of them). With ``return_full_text`` (``full_text``) the prompt leads the
    text, once. The finish reason is ``"none"`` until the request finishes."""
    return Response(
        generated_text=prompt + text if full_text and first else text,
        prompt_length=output.prompt_tokens,
        generated_length=output.generated_tokens,
        finish_reason=output.finish_reason or "none",
    )


def parse_mii_options(options: dict[str, Any]) -> tuple[SamplingParams, bool]:
    """MII keyword options -> (`SamplingParams`, ``return_full_text``); names unknown to MII
    raise `InvalidRequestError`."""
    for name in options:
        if name not in MII_DEFAULTS:
            raise InvalidRequestError(
                name, f"unknown generation option (known: {', '.join(sorted(MII_DEFAULTS))})"
            )
    merged = {**MII_DEFAULTS, **options}
    return_full_text = merged.pop("return_full_text")
    merged.pop("stream")
    if not isinstance(return_full_text, bool):
        raise InvalidRequestError("return_full_text", "must be a boolean")
    if merged["top_k"] is None:
        merged["top_k"] = 0
    if merged["temperature"] is None:
        merged["temperature"] = 1.0
    elif isinstance(merged["temperature"], int | float) and merged["temperature"] == 0:
        raise InvalidRequestError("temperature", "must be > 0 (use do_sample=False for greedy)")
    return SamplingParams.from_options(**merged), return_full_text
