"""Error types. The HTTP and ZeroMQ layers map these to status codes in one place."""

from __future__ import annotations


class FastgenError(Exception):
    """Base class of every error fastgen raises on purpose."""


class InvalidRequestError(FastgenError, ValueError):
    """A request (prompt or sampling option) is invalid; `field` names the culprit."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


class UnsupportedModelError(FastgenError, ValueError):
    """The checkpoint's architecture is not one fastgen implements."""


class EngineOverloadedError(FastgenError):
    """The waiting queue is full; try again later."""


class EngineDeadError(FastgenError):
    """The engine (or one of its workers) stopped; no further requests can be served."""


class StepError(FastgenError):
    """A forward step failed; the requests in that step are failed with this error."""


class RequestAbortedError(FastgenError):
    """The request was aborted (client went away, engine shut down)."""


class DeploymentNotFoundError(FastgenError, LookupError):
    """No persistent deployment with that name is registered."""


class ModelLoadError(FastgenError):
    """A model could not be loaded; the message says why, and what to give or install instead."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """No checkpoint at the path given (or no default model installed)."""


class AccessDeniedError(FastgenError, PermissionError):
    """A message to a deployment did not carry the deployment's secret (see `fastgen.ipc.Seal`)."""
