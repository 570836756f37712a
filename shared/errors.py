"""Domain errors, and the one place they become gRPC statuses.

Errors say what went wrong in domain words and carry identifiers, never
transport codes. `grpc_errors` wraps servicer methods (unary and streaming);
an interceptor cannot see handler exceptions under grpc.aio.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = structlog.get_logger(__name__)


class DomainError(Exception):
    """Base of every error a caller can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(DomainError):
    pass


class AlreadyExists(DomainError):
    pass


class FailedPrecondition(DomainError):
    pass


class Conflict(DomainError):
    """A concurrent change won (stale etag or version)."""


class PermissionDenied(DomainError):
    pass


class Unavailable(DomainError):
    """A dependency outside the system (object storage) cannot be reached: try again."""


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(DomainError):
    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        fields = ", ".join(v.field for v in self.violations)
        super().__init__(f"invalid request: {fields}" if fields else "invalid request")


class Violations:
    """Collects every violated field of a request, so that all are reported at once."""

    def __init__(self) -> None:
        self._items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self._items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.add(field, description)

    def raise_if_any(self) -> None:
        if self._items:
            raise InvalidArgument(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)


_CODES: dict[type[DomainError], code_pb2.Code.ValueType] = {
    NotFound: code_pb2.NOT_FOUND,
    AlreadyExists: code_pb2.ALREADY_EXISTS,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    Conflict: code_pb2.ABORTED,
    PermissionDenied: code_pb2.PERMISSION_DENIED,
    Unavailable: code_pb2.UNAVAILABLE,
    InvalidArgument: code_pb2.INVALID_ARGUMENT,
}


# A status travels in trailing metadata (16 KiB at most): texts are cut well below that.
_MESSAGE_MAX = 1024
_DESCRIPTION_MAX = 512


def _clip(text: str, most: int) -> str:
    return text if len(text) <= most else text[:most] + "..."


def to_status(error: DomainError) -> grpc.Status:
    code = next(c for cls, c in _CODES.items() if isinstance(error, cls))
    status = status_pb2.Status(code=code, message=_clip(error.message, _MESSAGE_MAX))
    if isinstance(error, InvalidArgument):
        details = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=_clip(v.description, _DESCRIPTION_MAX)
                )
                for v in error.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(details)
        status.details.append(packed)
    return rpc_status.to_status(status)


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, DomainError):
        await context.abort_with_status(to_status(error))
    # Here, not at the top: the domain modules import this one, and the drivers stay out.
    from shared.outages import unavailable_dependency

    dependency = unavailable_dependency(error)
    if dependency is not None:
        log.warning("dependency unavailable", dependency=dependency, error=str(error)[:200])
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{dependency} is unavailable; retry")
    log.exception("unhandled error in handler")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Maps DomainError (and anything unexpected) to a gRPC status for one servicer method."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort(context, error)

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)

    return unary  # type: ignore[return-value]
