"""Error types of the serving layer and the one table that maps every error to an HTTP status.

Both the HTTP gateway and the ZeroMQ front end describe errors through `describe_error`, so a
type means the same thing on every transport. Errors of the request (4xx) keep their message and
the field they name; server-side errors (5xx) are described by their type alone, so no exception
text, path or pid reaches a client (the server logs them in full).
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


class RequestTooLargeError(FastgenError):
    """The request's body is larger than the server accepts (`HttpPolicy.max_body_bytes`)."""


class RequestTimeoutError(FastgenError):
    """The request's body did not arrive in time (`HttpPolicy.body_timeout_s`)."""


class UnsupportedMediaTypeError(FastgenError):
    """A JSON route was sent a body that does not say ``Content-Type: application/json``."""


class HostNotAllowedError(FastgenError):
    """The ``Host`` header names a host this server does not answer for (DNS rebinding)."""


class OriginNotAllowedError(FastgenError):
    """The request comes from a web page whose origin is not allowed."""


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


# (error type, HTTP status, OpenAI error type, code, the message of a server-side error): the first
# matching row wins; a row without a message passes the exception's own message on.
_TABLE: list[tuple[type[BaseException], int, str, str, str | None]] = [
    # ValidationError (well-formed JSON of the wrong shape) subclasses DecodeError (not JSON at all)
    (msgspec.ValidationError, 422, "invalid_request_error", "invalid_type", None),
    (msgspec.DecodeError, 400, "invalid_request_error", "invalid_json", None),
    (InvalidRequestError, 400, "invalid_request_error", "invalid_value", None),
    (OriginNotAllowedError, 403, "invalid_request_error", "origin_not_allowed", None),
    (ModelNotFoundError, 404, "not_found_error", "model_not_found", None),
    (DeploymentNotFoundError, 404, "not_found_error", "deployment_not_found", None),
    (RequestTimeoutError, 408, "invalid_request_error", "request_timeout", None),
    (RequestTooLargeError, 413, "invalid_request_error", "request_too_large", None),
    (UnsupportedMediaTypeError, 415, "invalid_request_error", "unsupported_media_type", None),
    (HostNotAllowedError, 421, "invalid_request_error", "host_not_allowed", None),
    (EngineOverloadedError, 503, "overloaded_error", "overloaded", None),
    (EngineDeadError, 503, "service_unavailable_error", "engine_dead", "the engine is not running"),
    (RequestAbortedError, 503, "service_unavailable_error", "aborted", "the request was aborted"),
    (StepError, 500, "server_error", "step_failed", "the engine failed while running the request"),
]
_INTERNAL_ERROR = "internal server error"


def describe_error(exc: BaseException) -> ErrorInfo:
    """The `ErrorInfo` of ``exc`` (unknown types are internal errors, status 500)."""
    for error_type, status, kind, code, message in _TABLE:
        if isinstance(exc, error_type):
            return ErrorInfo(status, kind, code, message or _message(exc), _param(exc))
    return ErrorInfo(500, "server_error", "internal_error", _INTERNAL_ERROR)


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
