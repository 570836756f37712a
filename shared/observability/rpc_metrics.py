"""RPCs by method and status code, their latency, and the streams open: the outermost
server interceptor, so it sees every call, the ones admission or the request guard refuse
(shared.calls) included, with the status the caller gets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latencies of unary RPCs: a Get is milliseconds, an import or a comparison seconds.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LABELS = ("grpc_service", "grpc_method")


class RpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "raven_grpc_server_handled_total",
            "RPCs completed, by method and the status code the caller got.",
            [*_LABELS, "grpc_code"],
            registry=registry,
        )
        self.latency = Histogram(
            "raven_grpc_server_handling_seconds",
            "Time from a unary-response RPC's start to its status (streams: not observed).",
            _LABELS,
            buckets=_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "raven_grpc_server_open_streams",
            "Server-streaming RPCs in progress (WatchTrainingRun: the open watch streams).",
            _LABELS,
            registry=registry,
        )


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return next((str(c.name) for c in grpc.StatusCode if c.value[0] == code), default.name)
    return str(default.name)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The wrapped handler of each method is built on its first call and kept: the
    interceptors inside this one wrap per method too, and read what is per call from
    the call's context. The methods are the server's, registered before it started."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics
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
        wrapped = _Instrumented(self._metrics, *_split(details.method)).wrap(handler)
        self._handlers[details.method] = wrapped
        return wrapped


class _Instrumented:
    def __init__(self, metrics: RpcMetrics, service: str, method: str) -> None:
        self._metrics = metrics
        self._labels = (service, method)
        # The series of this method, looked up once (and once per status code).
        self._latency = metrics.latency.labels(*self._labels)
        self._handled: dict[str, Any] = {}

    def _done(self, code: str) -> None:
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._metrics.handled.labels(*self._labels, code)
        handled.inc()

    async def unary(self, context: grpc.aio.ServicerContext, run: Awaitable[Any]) -> Any:
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN.name
        try:
            result = await run
            code = _code(context, grpc.StatusCode.OK)
            return result
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED.name
            raise
        except grpc.aio.AbortError:
            code = _code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            self._latency.observe(time.perf_counter() - started)
            self._done(code)

    async def stream(
        self, context: grpc.aio.ServicerContext, items: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        gauge = self._metrics.open_streams.labels(*self._labels)
        gauge.inc()
        code = grpc.StatusCode.UNKNOWN.name
        try:
            async for item in items:
                yield item
            code = _code(context, grpc.StatusCode.OK)
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED.name
            raise
        except grpc.aio.AbortError:
            code = _code(context, grpc.StatusCode.UNKNOWN)
            raise
        finally:
            gauge.dec()
            self._done(code)

    def wrap(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.unary(context, uu(request, context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, **serializers)
        if handler.stream_unary:
            su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self.unary(context, su(requests, context))

            return grpc.stream_unary_rpc_method_handler(stream_unary, **serializers)
        if handler.unary_stream:
            us = handler.unary_stream

            # grpc.aio runs only async generator functions as async streaming handlers.
            async def unary_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                async for item in self.stream(context, us(request, context)):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, **serializers)
        ss = handler.stream_stream

        async def stream_stream(
            requests: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            async for item in self.stream(context, ss(requests, context)):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, **serializers)
