"""Error types of the serving layer and the one table that maps every error to an HTTP status.

Both the HTTP gateway and the ZeroMQ front end describe errors through `describe_error`, so a
type means the same thing on every transport.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


class DeploymentStartError(FastgenError, RuntimeError):
    """A deployment process exited (or never became ready) while the deployment was starting."""


class ModelNotFoundError(FastgenError, LookupError):
    """A request named a model (or deployment) this server does not serve."""


@dataclass(frozen=True)
class ErrorInfo:
    """How an error is reported: HTTP status, OpenAI-style type and code, the culprit field."""

    status: int
    type: str
    code: str
    message: str
    param: str | None = None

    def body(self) -> dict:
        """The OpenAI-style JSON error body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# (error type, HTTP status, OpenAI error type, code): the first matching row wins.
_TABLE: list[tuple[type[BaseException], int, str, str]] = [
    # ValidationError (well-formed JSON of the wrong shape) subclasses DecodeError (not JSON at all)
    (msgspec.ValidationError, 422, "invalid_request_error", "invalid_type"),
    (msgspec.DecodeError, 400, "invalid_request_error", "invalid_json"),
    (InvalidRequestError, 400, "invalid_request_error", "invalid_value"),
    (ModelNotFoundError, 404, "not_found_error", "model_not_found"),
    (DeploymentNotFoundError, 404, "not_found_error", "deployment_not_found"),
    (EngineOverloadedError, 503, "overloaded_error", "overloaded"),
    (EngineDeadError, 503, "service_unavailable_error", "engine_dead"),
    (RequestAbortedError, 503, "service_unavailable_error", "aborted"),
    (StepError, 500, "server_error", "step_failed"),
]


def describe_error(exc: BaseException) -> ErrorInfo:
    """The `ErrorInfo` of ``exc`` (unknown types are internal errors, status 500)."""
    for error_type, status, kind, code in _TABLE:
        if isinstance(exc, error_type):
            return ErrorInfo(status, kind, code, _message(exc), _param(exc))
    return ErrorInfo(500, "server_error", "internal_error", f"internal error: {exc!r}")


def _message(exc: BaseException) -> str:
    if isinstance(exc, msgspec.ValidationError):
        return f"invalid request body: {exc}"
    if isinstance(exc, msgspec.DecodeError):
        return f"the request body is not valid JSON: {exc}"
    return str(exc)


_FIELD_PATTERNS = (
    re.compile(r"(?:unknown|missing required) field `([^`]+)`"),
    re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)"),
)


def _param(exc: BaseException) -> str | None:
    if isinstance(exc, InvalidRequestError):
        return exc.field
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        for pattern in _FIELD_PATTERNS:
            match = pattern.search(text)
            if match:
                return match.group(1)
    return None
