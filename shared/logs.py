"""Structured logging for every process (structlog over the standard library).

One format for every logger of the process: structlog's own and the standard library's
(alembic, asyncio, nats, ...), which go through structlog's ProcessorFormatter. JSON
lines when `json` is True, or when it is None and stderr is not a terminal; text lines
for a person at a terminal. Every line carries the context bound with structlog's
contextvars (`run_id`, `attempt`, `worker_id` in the worker; `request_id`, `rpc` during
a gRPC call) and the `trace_id` of the current span.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from shared.observability.tracing import current_trace_id


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to `stream`, or to the sys.stderr of the moment when None (so that a
    replaced sys.stderr, as under test runners, is followed)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__()
        self._fixed = stream

    @property
    def stream(self) -> TextIO:
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        """StreamHandler sets it; the property decides."""


def add_trace_id(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The current span's trace id, for finding a log line's trace (and back)."""
    if "trace_id" not in event:
        trace_id = current_trace_id()
        if trace_id is not None:
            event["trace_id"] = trace_id
    return event


def wants_json(json: bool | None, stream: TextIO) -> bool:
    """`json` when set; otherwise JSON unless `stream` is a terminal."""
    if json is not None:
        return json
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):
        return True


def configure(
    level: str = "INFO", *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_trace_id,
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if wants_json(json, stream or sys.stderr)
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    numeric_level = logging.getLevelName(level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    # What a LogRecord would look up for every line and no line shows (the renderer writes
    # the event dict): the process, the thread and the calling frame, found by walking the
    # stack (the standard library's documented switches, "Optimization" in its HOWTO).
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # Alembic's own logging setup (alembic.ini) is not used: its lines come here.
    for name in ("alembic", "asyncio", "nats"):
        logging.getLogger(name).propagate = True
