"""The ZeroMQ wire protocol: msgpack-encoded, tagged msgspec structs.

The same messages flow client -> server -> replica and back. Every request carries an id chosen
by its sender, so any number of requests share one socket; outputs are deltas, sent as the engine
produces them.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fastgen.errors import (
    DeploymentNotFoundError,
    EngineDeadError,
    EngineOverloadedError,
    FastgenError,
    InvalidRequestError,
    RequestAbortedError,
    StepError,
)
from fastgen.outputs import RequestOutput
from fastgen.sampling_params import SamplingParams

from .errors import ModelNotFoundError
from .prompts import Prompt

# -- requests ------------------------------------------------------------------------------


class Generate(msgspec.Struct, tag="generate"):
    """Start a request; outputs come back as `Output` messages with the same id."""

    request_id: str
    prompt: Prompt
    params: SamplingParams


class Cancel(msgspec.Struct, tag="cancel"):
    """Stop a request and free its KV cache (the consumer went away)."""

    request_id: str


class Control(msgspec.Struct, tag="control"):
    """A question or order for the receiving process: ``info``, ``stats``, ``ping`` or ``shutdown``;
    answered by a `Reply`."""

    request_id: str
    command: str


# -- answers ------------------------------------------------------------------------------


class Output(msgspec.Struct, tag="output"):
    """One delta of a request's output."""

    output: RequestOutput


class Error(msgspec.Struct, tag="error"):
    """A request failed; ``kind`` names the fastgen error type, ``field`` the culprit input."""

    request_id: str
    kind: str
    message: str
    field: str | None = None


class Reply(msgspec.Struct, tag="reply"):
    """The answer to a `Control` message."""

    request_id: str
    body: Any = None


class Ready(msgspec.Struct, tag="ready"):
    """A replica's engine is loaded and listening."""

    replica_id: int
    pid: int
    max_model_len: int
    num_kv_blocks: int


Message = Generate | Cancel | Control | Output | Error | Reply | Ready

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Decode one message (raises `msgspec.DecodeError`/`ValidationError` on garbage)."""
    return _decoder.decode(data)


# -- errors on the wire ---------------------------------------------------------------------

_ERROR_TYPES: dict[str, type[FastgenError]] = {
    cls.__name__: cls
    for cls in (
        InvalidRequestError,
        EngineOverloadedError,
        EngineDeadError,
        StepError,
        RequestAbortedError,
        DeploymentNotFoundError,
        ModelNotFoundError,
    )
}


def error_message(request_id: str, exc: BaseException) -> Error:
    """The `Error` message that carries ``exc`` to the requester."""
    if isinstance(exc, InvalidRequestError):
        return Error(request_id, "InvalidRequestError", exc.reason, exc.field)
    kind = type(exc).__name__
    if kind not in _ERROR_TYPES:
        return Error(request_id, "FastgenError", f"internal error: {exc!r}")
    return Error(request_id, kind, str(exc))


def error_from_message(message: Error) -> FastgenError:
    """Rebuild the exception an `Error` message describes."""
    if message.kind == "InvalidRequestError":
        return InvalidRequestError(message.field or "request", message.message)
    return _ERROR_TYPES.get(message.kind, FastgenError)(message.message)
