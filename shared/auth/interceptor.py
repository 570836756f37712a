"""Authentication and authorization of every call, before the servicer runs.

The interceptor resolves the handler and returns it wrapped: the wrapper runs
in the call's own task, with the servicer context, so it can read the verified
peer certificate, refuse the call, and publish the caller through a context
variable that `shared.identity` reads. Domain errors are still mapped by
`shared.errors.grpc_errors` inside the handler; the wrapper only sees their
final status (for the audit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf.message import Message

from shared.auth.audit import UNAUTHENTICATED_IDENTITY, AuditLog, Entry, expect_change
from shared.auth.authenticate import Authenticator, Principal, Unauthenticated
from shared.auth.permissions import (
    OPEN_SERVICES,
    READ_RULES,
    RULES,
    Level,
    Rule,
    level,
    service_of,
)
from shared.auth.policy import PolicyStore

log = structlog.get_logger(__name__)

# Constant texts: a refused caller learns nothing about what exists or what is missing.
_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: "authentication required",
    grpc.StatusCode.PERMISSION_DENIED: "permission denied",
}


@dataclass(frozen=True, slots=True)
class Access:
    principal: Principal
    # Set when the caller may only touch what this identity created (a `.own` permission).
    owner: str | None = None
    # By collection ("trainingRuns", "trainedModels"): the identity whose resources alone
    # the caller may name, because it may read only its own (READ_RULES).
    scopes: Mapping[str, str] = dataclasses.field(default_factory=dict)


_access: ContextVar[Access | None] = ContextVar("raven_access", default=None)


def current_access() -> Access | None:
    """The admitted caller of the call running in this task; None outside a guarded call."""
    return _access.get()


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(
        self,
        *,
        authenticator: Authenticator,
        policies: PolicyStore,
        audit: AuditLog | None,
        rules: Mapping[str, Rule] = RULES,
    ) -> None:
        self._authenticator = authenticator
        self._policies = policies
        self._audit = audit
        self._rules = rules
        # Audit writes of cancelled calls finish in the background; keep them referenced.
        self._pending: set[asyncio.Task[None]] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or service_of(details.method) in OPEN_SERVICES:
            return handler
        return _wrap(handler, _Call(self, details.method, tuple(details.invocation_metadata or ())))

    async def admit(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        metadata: tuple[Any, ...],
        request: Message | None,
    ) -> Access:
        """The caller and its scope, or the call aborted with UNAUTHENTICATED or PERMISSION_DENIED."""
        try:
            principal = self._authenticator.authenticate(context, metadata)
        except Unauthenticated as error:
            await self._refuse(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                Entry(
                    identity=error.workload or UNAUTHENTICATED_IDENTITY,
                    rpc=method,
                    resource=resource_of(request),
                    outcome=grpc.StatusCode.UNAUTHENTICATED.name,
                    detail=error.reason,
                    peer=context.peer(),
                ),
            )
        rule = self._rules.get(method)
        policy = self._policies.current()
        workload = level(policy.for_workload(principal.workload), rule) if rule else None
        user = (
            level(policy.for_claims(principal.user.claims), rule)
            if rule and principal.user
            else Level.ALL
        )
        if rule is None or workload is None or user is None:
            if rule is None:
                log.error("RPC has no permission rule; denied", rpc=method)
                detail = "RPC has no permission rule"
            else:
                who = "workload" if workload is None else "user"
                detail = f"{who} lacks {rule.permission}"
            await self._refuse(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                _entry(principal, method, request, "PERMISSION_DENIED", context, detail=detail),
            )
        owner = principal.acting_as if Level.OWN in (workload, user) else None
        scopes = {}
        for collection, read in READ_RULES.items():
            reads = (
                level(policy.for_workload(principal.workload), read),
                level(policy.for_claims(principal.user.claims), read) if principal.user else None,
            )
            if Level.OWN in reads:
                scopes[collection] = principal.acting_as
        return Access(principal, owner, scopes)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, entry: Entry
    ) -> NoReturn:
        log.warning("call refused", rpc=entry.rpc, identity=entry.identity, reason=entry.detail)
        if self._audit is not None:
            await self._audit.record(entry)
        await context.abort(code, _REFUSALS[code])
        raise AssertionError("abort returned")  # pragma: no cover

    async def audited(
        self,
        call: _Call,
        access: Access,
        context: grpc.aio.ServicerContext,
        request: Message | None,
        run: Callable[[], Awaitable[Any]],
    ) -> Any:
        """Runs the handler; records the outcome of a state-changing call: with the
        change, by the unit of work that commits it, or here when none committed."""
        rule = self._rules.get(call.method)
        if self._audit is None or rule is None or not rule.mutates:
            return await run()
        change = expect_change(_entry(access.principal, call.method, request, "OK", context))
        response = None
        try:
            response = await run()
            outcome = grpc.StatusCode.OK.name
            return response
        except asyncio.CancelledError:
            outcome = grpc.StatusCode.CANCELLED.name
            if not change.close():
                entry = _entry(access.principal, call.method, request, outcome, context)
                task = asyncio.create_task(self._audit.record(entry))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
            raise
        except BaseException:
            code = context.code()
            outcome = code.name if isinstance(code, grpc.StatusCode) else "INTERNAL"
            raise
        finally:
            if outcome != grpc.StatusCode.CANCELLED.name and not change.close():
                await self._audit.record(
                    _entry(access.principal, call.method, request, outcome, context, response)
                )


@dataclass(frozen=True, slots=True)
class _Call:
    interceptor: AuthInterceptor
    method: str
    metadata: tuple[Any, ...]

    async def enter(self, context: grpc.aio.ServicerContext, request: Message | None) -> Access:
        access = await self.interceptor.admit(context, self.method, self.metadata, request)
        # Each call runs in its own task (and context copy): no reset needed, no leak to others.
        _access.set(access)
        return access


def _entry(
    principal: Principal,
    method: str,
    request: Message | None,
    outcome: str,
    context: grpc.aio.ServicerContext,
    response: Any = None,
    *,
    detail: str = "",
) -> Entry:
    return Entry(
        identity=principal.workload,
        on_behalf_of=principal.on_behalf_of or "",
        proxy=principal.proxy or "",
        rpc=method,
        resource=resource_of(response) or resource_of(request),
        outcome=outcome,
        detail=detail,
        peer=context.peer(),
    )


def resource_of(message: Any) -> str:
    """The resource name a request or response carries: its `name`, or the `name` of a
    top-level message field (`UpdateTrainingRunRequest.training_run.name`)."""
    if not isinstance(message, Message):
        return ""
    fields = message.DESCRIPTOR.fields_by_name
    if "name" in fields and isinstance(message.name, str) and message.name:  # type: ignore[attr-defined]
        return str(message.name)  # type: ignore[attr-defined]
    for field in message.DESCRIPTOR.fields:
        if field.message_type is None or "name" not in field.message_type.fields_by_name:
            continue
        try:
            present = message.HasField(field.name)
        except ValueError:  # Repeated and map fields have no presence.
            continue
        if present:
            name = getattr(getattr(message, field.name), "name", "")
            if isinstance(name, str) and name:
                return name
    return ""


async def _result(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _items(value: Any) -> AsyncIterator[Any]:
    if hasattr(value, "__aiter__"):
        async for item in value:
            yield item
    elif inspect.isawaitable(value):
        await value  # A handler that writes with context.write() and returns nothing.
    else:
        for item in value:
            yield item


def _wrap(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    interceptor = call.interceptor
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Message, context: grpc.aio.ServicerContext) -> Any:
            access = await call.enter(context, request)
            return await interceptor.audited(
                call, access, context, request, lambda: _result(inner_uu(request, context))
            )

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            access = await call.enter(context, None)
            return await interceptor.audited(
                call, access, context, None, lambda: _result(inner_su(requests, context))
            )

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
    # Streaming responses: reads only in our table, never audited as changes. A state-changing
    # streaming RPC would need its outcome recorded after the stream ends.
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(
            request: Message, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await call.enter(context, request)
            async for item in _items(inner_us(request, context)):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await call.enter(context, None)
        async for item in _items(inner_ss(requests, context)):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)
