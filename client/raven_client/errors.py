"""Typed exceptions for the statuses the services return.

Every failed call raises a `RavenError` subclass chosen by its status code; an
INVALID_ARGUMENT carries the request's field violations, which the services send as
`google.rpc.BadRequest` details.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One wrong field of a request: its path ("training_run.spec.epochs") and why."""

    field: str
    description: str


class RavenError(Exception):
    """A call that failed: its status code, the server's message and the status details."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        details: tuple[any_pb2.Any, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(RavenError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        found: list[FieldViolation] = []
        for detail in self.details:
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(bad):
                found.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
        return tuple(found)

    @property
    def fields(self) -> dict[str, str]:
        """Each violated field's description, by field path."""
        return {v.field: v.description for v in self.field_violations}

    def __str__(self) -> str:
        shown = "; ".join(f"{v.field}: {v.description}" for v in self.field_violations)
        return f"{super().__str__()} ({shown})" if shown else super().__str__()


class NotFound(RavenError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RavenError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RavenError):
    """The resource is not in a state that allows the call (e.g. cancelling an ended run)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RavenError):
    """A conflict: typically a stale etag. Read the resource again and retry."""

    code = grpc.StatusCode.ABORTED


class PermissionDenied(RavenError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RavenError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(RavenError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RavenError):
    """The service (or a dependency of it) cannot be reached; safe calls were retried."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RavenError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(RavenError):
    code = grpc.StatusCode.CANCELLED


class Internal(RavenError):
    code = grpc.StatusCode.INTERNAL


class ChecksumMismatch(RavenError):
    """A downloaded file whose size or sha256 differs from what the server announced."""

    code = grpc.StatusCode.DATA_LOSS


_BY_CODE: dict[grpc.StatusCode, type[RavenError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        Aborted,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
    )
}


def from_rpc_error(error: grpc.RpcError) -> RavenError:
    """The typed exception for a failed call (`grpc.RpcError` raised by a stub)."""
    code: grpc.StatusCode = (
        error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    )
    message = str(error.details() or "") if isinstance(error, grpc.Call) else str(error)
    details: tuple[any_pb2.Any, ...] = ()
    if isinstance(error, grpc.Call):
        for key, value in error.trailing_metadata() or ():
            if key == _DETAILS_KEY and isinstance(value, bytes):
                details = tuple(status_pb2.Status.FromString(value).details)
    cls = _BY_CODE.get(code, RavenError)
    return cls(message, code=code, details=details)
