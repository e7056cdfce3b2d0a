"""Errors the request path raises, each mapped to one gRPC status code by the servicer.

The core (validation, pipeline, service) raises these plain exceptions and never imports
grpc, so it is testable without a server; `servicer.py` turns them into status codes.
"""
from __future__ import annotations

__all__ = ["ServingError", "InvalidArgument", "NotFound", "FailedPrecondition", "PermissionDenied", "Unavailable", "DeadlineExceeded"]


class ServingError(Exception):
    """Base class: `code` names the gRPC status code (grpc.StatusCode[code])."""

    code = "INTERNAL"


class InvalidArgument(ServingError, ValueError):
    """A request field is wrong; the message starts with the field's name."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServingError):
    code = "NOT_FOUND"


class FailedPrecondition(ServingError):
    """The request is well formed but the server's state refuses it (a skewed release, ...)."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(ServingError):
    """The caller is who it says, but may not do this (load a release from outside the releases root)."""

    code = "PERMISSION_DENIED"


class Unavailable(ServingError):
    """A dependency (the online store) could not answer; retrying later may work."""

    code = "UNAVAILABLE"


class DeadlineExceeded(ServingError):
    code = "DEADLINE_EXCEEDED"
