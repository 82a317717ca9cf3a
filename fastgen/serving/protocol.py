"""The ZeroMQ wire protocol of deployments: msgpack-encoded, tagged msgspec structs (`fastgen.ipc`).

The same messages flow client -> server -> replica and back. Every request carries an id chosen
by its sender, so any number of requests share one socket; outputs are deltas, sent as the engine
produces them. What a client sends the server, and what a replica sends the router, is sealed
with the deployment's key (`fastgen.ipc.Seal`); a frame whose seal does not match is refused.
"""

from __future__ import annotations

from typing import Any

import msgspec

from fastgen.config import EngineConfig
from fastgen.errors import (
    AccessDeniedError,
    DeploymentNotFoundError,
    EngineDeadError,
    EngineOverloadedError,
    FastgenError,
    InvalidRequestError,
    RequestAbortedError,
    StepError,
)
from fastgen.inputs import Prompt
from fastgen.ipc import Codec
from fastgen.outputs import RequestOutput
from fastgen.sampling_params import SamplingParams

from .errors import ModelNotFoundError

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


class EngineDown(msgspec.Struct, tag="engine_down"):
    """A replica's engine cannot serve any more (``reason`` says why, without pids or paths); the
    replica stops and exits. The router stops routing to it on this message, before the exit."""

    replica_id: int
    reason: str


Message = Generate | Cancel | Control | Output | Error | Reply | Ready | EngineDown

_codec: Codec[Message] = Codec(Message)


def encode(message: Message) -> bytes:
    return _codec.encode(message)


def decode(data: bytes) -> Message:
    """Decode one message (raises `msgspec.DecodeError`/`ValidationError` on garbage)."""
    return _codec.decode(data)


class ReplicaSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What one replica process needs; its supervisor writes it to the replica's stdin (it holds
    the key, which must not appear on a command line)."""

    address: str  # the router's socket, which the replica dials
    replica_id: int
    identity: str  # the replica's socket identity (hex), new for every start
    key: str  # the deployment's key (hex): seals what the replica sends
    model: str
    config: EngineConfig
    device_slot: int = 0  # GPUs device_slot*tp .. device_slot*tp+tp-1 of its host
    replicas_on_host: int = 1  # replicas sharing this host's CPU cores


# -- errors on the wire ---------------------------------------------------------------------

_ERROR_TYPES: dict[str, type[FastgenError]] = {
    cls.__name__: cls
    for cls in (
        AccessDeniedError,
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
