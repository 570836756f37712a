"""The one wrapper around every gRPC handler: request guard, admission, error mapping.

`CallWrapper` wraps every call, inside the span and access log of
`shared.observability.tracing_grpc`. It resolves the handler and returns
it wrapped, since under grpc.aio an interceptor sees a handler's exceptions only from
inside the handler's behaviour. Per call, in order: the caller is admitted
(`shared.auth.admission`, skipped for health and reflection), each request is parsed
and checked (`shared.request_guard`), the handler runs, and whatever it raises becomes
a status (`shared.status`) inside the admission's audit, which records that status.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import Message

from shared import status
from shared.auth.admission import Access, Admission
from shared.auth.permissions import OPEN_SERVICES, service_of
from shared.errors import InvalidArgument
from shared.request_guard import Unparsed, check_request, safe_deserializer


class CallWrapper(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every handler; `admission` None admits every caller (no audit)."""

    def __init__(self, admission: Admission | None = None) -> None:
        self._admission = admission
        # Each method's handler, wrapped on its first call.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        wrapped = self._handlers.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None:
            return None
        # Health and reflection admit everyone and report their own statuses.
        open_service = service_of(details.method) in OPEN_SERVICES
        call = _Call(
            admission=None if open_service else self._admission,
            method=details.method,
            map_errors=not open_service,
        )
        wrapped = self._handlers[details.method] = _wrap(handler, call)
        return wrapped


@dataclass(frozen=True, slots=True)
class _Call:
    """What the calls of one method share; what is per call comes from the context."""

    admission: Admission | None
    method: str
    map_errors: bool

    async def enter(
        self, context: grpc.aio.ServicerContext, request: Message | None
    ) -> Access | None:
        if self.admission is None:
            return None
        metadata = tuple(context.invocation_metadata() or ())
        return await self.admission.admit(context, self.method, metadata, request)

    async def unary(
        self,
        access: Access | None,
        context: grpc.aio.ServicerContext,
        request: Message | None,
        run: Callable[[], Awaitable[Any]],
    ) -> Any:
        async def mapped() -> Any:
            result = None
            async with self.mapping(context):
                result = await run()
            return result

        if self.admission is None or access is None:
            return await mapped()
        return await self.admission.audited(self.method, access, context, request, mapped)

    async def stream(
        self, context: grpc.aio.ServicerContext, items: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        async with self.mapping(context):
            async for item in items:
                yield item

    @contextlib.asynccontextmanager
    async def mapping(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Ends the call with the status of what the handler raised (`shared.status`)."""
        try:
            yield
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            if not self.map_errors:
                raise
            await status.abort(context, error)


async def _refuse_if_bad(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Unparsed):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {request.type_name}"
        )
    if isinstance(request, Message):
        violations = check_request(request)
        if violations:
            await context.abort_with_status(status.to_status(InvalidArgument(violations)))


async def _checked(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        await _refuse_if_bad(request, context)
        yield request


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
    serializers = {
        "request_deserializer": safe_deserializer(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            access = await call.enter(context, request)

            async def run() -> Any:
                await _refuse_if_bad(request, context)
                return await _result(inner_uu(request, context))

            return await call.unary(access, context, request, run)

        return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            access = await call.enter(context, None)
            return await call.unary(
                access,
                context,
                None,
                lambda: _result(inner_su(_checked(requests, context), context)),
            )

        return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
    # Streaming responses: reads only in our table, never audited as changes. A state-changing
    # streaming RPC would need its outcome recorded after the stream ends.
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            await call.enter(context, request)
            await _refuse_if_bad(request, context)
            async for item in call.stream(context, _items(inner_us(request, context))):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await call.enter(context, None)
        checked = _checked(requests, context)
        async for item in call.stream(context, _items(inner_ss(checked, context))):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)
