"""Which span exporter the standard OTEL_* variables choose: none unless asked for (here
for the OTLP exporter, which loads grpc); whether logs are JSON."""

from __future__ import annotations

import io

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace.export import ConsoleSpanExporter

from shared.logs import wants_json
from shared.observability.tracing import exporter_from_env


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        },
    ],
)
def test_no_exporter_unless_the_variables_ask_for_one(environ: dict[str, str]) -> None:
    assert exporter_from_env(environ) is None


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4317"},
    ],
)
def test_otlp_when_named_or_given_an_endpoint(environ: dict[str, str]) -> None:
    exporter = exporter_from_env(environ)
    assert isinstance(exporter, OTLPSpanExporter)
    exporter.shutdown()


def test_console_when_named() -> None:
    assert isinstance(exporter_from_env({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_off_a_terminal_text_at_one_unless_forced() -> None:
    assert wants_json(None, io.StringIO())
    assert not wants_json(None, _Terminal())
    assert wants_json(True, _Terminal())
    assert not wants_json(False, io.StringIO())
