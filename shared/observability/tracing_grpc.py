"""gRPC spans and access logs: a server interceptor and client interceptors for grpc.aio.

Server side, per call: a SERVER span (child of the caller's `traceparent` metadata when it
sends one), the call's `request_id` (the caller's `x-request-id` metadata, or a new one)
and `rpc` bound to every log line of the call, and one access-log line `rpc` with the
status `code` and `duration_ms` when the call ends. Health checks log theirs at debug
level, so that probes do not fill the logs. Client side: a CLIENT span whose context
travels as `traceparent` metadata, with an `x-request-id`.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
import structlog
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from shared.observability import tracing

log = structlog.get_logger("raven.access")

REQUEST_ID = "x-request-id"
_HEALTH = "/grpc.health.v1.Health/"
# A caller's request id is kept when it looks like one; anything else gets a new one.
_REQUEST_ID_FORM = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def request_id_of(metadata: Sequence[Any]) -> str:
    for key, value in metadata:
        if key == REQUEST_ID and isinstance(value, str) and _REQUEST_ID_FORM.fullmatch(value):
            return value
    return uuid.uuid4().hex


class ObservedCalls(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The outermost server interceptor: the span and the access log see the final status.
    Each method's handler is wrapped once, on its first call."""

    def __init__(self) -> None:
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
        wrapped = self._handlers[details.method] = _observed(handler, _Method(details.method))
        return wrapped


def _code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        for known in grpc.StatusCode:
            if known.value[0] == code:
                return known
    if error is None:
        return grpc.StatusCode.OK
    # Cancelled, or closed while suspended between messages: the client went away.
    if isinstance(error, GeneratorExit) or type(error).__name__ == "CancelledError":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class _Method:
    """What the span and the access log of a method's calls share, worked out once."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.span_name = method.lstrip("/")
        service, _, name = self.span_name.partition("/")
        self.attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        # The tracer provider is installed before the server starts, so before any call.
        self.tracer = tracing.tracer()
        self.log = log.debug if method.startswith(_HEALTH) else log.info


class _Call:
    """One call's span, request id and clock. The span is current, and the call's ids are
    bound to log lines, only while the handler runs (`running`): a streaming handler is
    suspended between its messages, and its generator may be closed later from another
    context (when the client went away), where a context entered before could not be left."""

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext) -> None:
        metadata = context.invocation_metadata() or ()
        headers = {k: v for k, v in metadata if isinstance(v, str)}
        self.method = method
        self.context = context
        self.request_id = request_id_of(metadata)
        self.started = time.monotonic()
        self.span = method.tracer.start_span(
            method.span_name,
            context=tracing.extract(headers),
            kind=SpanKind.SERVER,
            attributes=method.attributes,
            record_exception=False,
            set_status_on_exception=False,
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with (
            trace.use_span(
                self.span, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ),
            structlog.contextvars.bound_contextvars(
                request_id=self.request_id, rpc=self.method.method
            ),
        ):
            yield

    def end(self, error: BaseException | None) -> None:
        """The status on the span, the access-log line, and the span ended."""
        code = _code(self.context, error)
        self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            self.span.set_status(Status(StatusCode.ERROR, code.name))
        with self.running():
            self.method.log(
                "rpc", code=code.name, duration_ms=round((time.monotonic() - self.started) * 1e3, 2)
            )
        self.span.end()


def _observed(handler: grpc.RpcMethodHandler, method: _Method) -> Any:
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary or handler.stream_unary:
        streaming_requests = handler.unary_unary is None
        inner = handler.stream_unary if streaming_requests else handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(method, context)
            error: BaseException | None = None
            try:
                with call.running():
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
            except BaseException as raised:
                error = raised
                raise
            finally:
                call.end(error)

        if streaming_requests:
            return grpc.stream_unary_rpc_method_handler(unary, **serializers)
        return grpc.unary_unary_rpc_method_handler(unary, **serializers)
    streaming_requests = handler.unary_stream is None
    inner_stream = handler.stream_stream if streaming_requests else handler.unary_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = _Call(method, context)
        items = aiter(inner_stream(request, context))
        error: BaseException | None = None
        try:
            while True:
                with call.running():
                    try:
                        item = await anext(items)
                    except StopAsyncIteration:
                        break
                yield item
        except BaseException as raised:  # GeneratorExit too: closed while suspended
            error = raised
            raise
        finally:
            try:
                close = getattr(items, "aclose", None)
                if close is not None:
                    with call.running():
                        await close()
            finally:
                call.end(error)

    if streaming_requests:
        return grpc.stream_stream_rpc_method_handler(stream, **serializers)
    return grpc.unary_stream_rpc_method_handler(stream, **serializers)


def _outgoing(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    if not any(key == REQUEST_ID for key, _ in metadata):
        metadata.append((REQUEST_ID, uuid.uuid4().hex))
    metadata.extend(tracing.inject().items())
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=grpc.aio.Metadata(*metadata),
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


def _method_name(details: grpc.aio.ClientCallDetails) -> str:
    method = details.method
    return (method.decode() if isinstance(method, bytes) else str(method)).lstrip("/")


class _UnaryClient(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        with tracing.span(_method_name(details), kind=SpanKind.CLIENT):
            call = await continuation(_outgoing(details), request)
            await call
            return call


class _StreamClient(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(
        self, continuation: Any, details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        # The span covers the start of the call; the stream's messages flow after it.
        with tracing.span(_method_name(details), kind=SpanKind.CLIENT):
            return await continuation(_outgoing(details), request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Client spans with their context in the metadata, and an x-request-id per call."""
    return [_UnaryClient(), _StreamClient()]
