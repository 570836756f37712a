"""Traces: OpenTelemetry spans from a gRPC call through the outbox, JetStream and the worker.

`configure` installs the SDK's tracer provider in a process; it exports only when the
standard variables ask for it (OTEL_TRACES_EXPORTER=otlp|console, or an
OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT with no exporter named).
Whether exported or not, the W3C `traceparent` of the current span travels with every
message (`inject`, `extract`), so a downstream process that does export continues the
same trace, and every log line names its `trace_id`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

log = structlog.get_logger(__name__)

TRACER_NAME = "raven"
TRACEPARENT = "traceparent"


@functools.cache
def tracer() -> trace.Tracer:
    """The process's tracer, looked up once: one taken before `configure` is a proxy that
    follows the provider installed later."""
    return trace.get_tracer(TRACER_NAME)


def exporter_from_env(environ: Mapping[str, str]) -> SpanExporter | None:
    """The span exporter the OTEL_* variables ask for; None: traces are not exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if named in ("", "otlp") and (named == "otlp" or endpoint):
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        if protocol.strip().lower() != "grpc":
            log.error(
                "traces not exported: only the grpc OTLP protocol is installed", protocol=protocol
            )
            return None
        # Reads the endpoint, headers, certificates and timeout from OTEL_EXPORTER_OTLP_*.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if named == "console":
        return ConsoleSpanExporter()
    if named not in ("", "none"):
        log.error("traces not exported: unknown OTEL_TRACES_EXPORTER", exporter=named)
    return None


def configure(service_name: str, environ: Mapping[str, str] | None = None) -> TracerProvider:
    """Installs the SDK's tracer provider, exporting as the OTEL_* variables say (nowhere by
    default: spans still get ids, which travel with messages and appear in the logs as
    `trace_id`). OTEL_SERVICE_NAME overrides `service_name`; OTEL_RESOURCE_ATTRIBUTES adds
    resource attributes."""
    environ = os.environ if environ is None else environ
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    exporter = exporter_from_env(environ)
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("exporting traces", exporter=type(exporter).__name__)
    trace.set_tracer_provider(provider)
    return provider


def shutdown() -> None:
    """Flushes and stops the installed provider, if any."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


def inject(carrier: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """`carrier` (or a new dict) with the current span's `traceparent` (and `tracestate`)."""
    headers: dict[str, str] = dict(carrier or {})
    propagate.inject(headers)
    return headers


def traceparent() -> str | None:
    """The W3C traceparent of the current span; None outside any span."""
    return inject().get(TRACEPARENT)


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a message's headers (or an RPC's metadata) carry; empty without one."""
    return propagate.extract(dict(carrier or {}))


def current_trace_id() -> str | None:
    """The current span's trace id in hex, as trace backends show it; None outside spans."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x")


@contextlib.contextmanager
def span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: Mapping[str, str] | None = None,
    links: Mapping[str, str] | None = None,
    attributes: Mapping[str, Any] | None = None,
    expected: tuple[type[BaseException], ...] = (),
) -> Iterator[Span]:
    """A span around the block, current inside it. `parent`: headers whose traceparent
    becomes its parent (the current span otherwise); `links`: headers of a related trace
    to link to. An exception ends it with an ERROR status (unless it is one of `expected`)
    and is raised again."""
    context = extract(parent) if parent is not None else None
    link_list = []
    if links is not None:
        linked = trace.get_current_span(extract(links)).get_span_context()
        if linked.is_valid:
            link_list.append(Link(linked))
    with tracer().start_as_current_span(
        name,
        context=context,
        kind=kind,
        links=link_list,
        attributes=dict(attributes or {}),
        record_exception=True,
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except expected:
            raise
        except BaseException as error:
            current.set_status(Status(StatusCode.ERROR, type(error).__name__))
            raise
