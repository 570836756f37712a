"""The one table from domain errors to gRPC statuses, and the abort for any exception.

Field violations travel as `google.rpc.BadRequest` details. An exception that
says a dependency is down becomes UNAVAILABLE; anything else unmapped is logged
with its traceback and returned as INTERNAL with no internals in the message.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared.errors import (
    AlreadyExists,
    Conflict,
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from shared.outages import unavailable_dependency

log = structlog.get_logger(__name__)

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


async def abort(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    """Ends the call with the status `error` maps to (raises grpc.aio.AbortError)."""
    if isinstance(error, DomainError):
        await context.abort_with_status(to_status(error))
    dependency = unavailable_dependency(error)
    if dependency is not None:
        log.warning("dependency unavailable", dependency=dependency, error=str(error)[:200])
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"{dependency} is unavailable; retry")
    log.exception("unhandled error in handler")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error")
    raise AssertionError("abort returned")  # pragma: no cover
