"""`/metrics` over HTTP on the process's event loop, refreshing async sources per scrape.

Some series are read from where they live when Prometheus asks (Postgres counts, JetStream
consumer info): each `Source` is awaited, with a time limit, before the registry is
rendered. A source that fails or times out leaves its series at their last values and
counts a `raven_metrics_source_failures_total`; the scrape itself still answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from shared.observability.metrics_addresses import split_address

log = structlog.get_logger(__name__)

_REQUEST_LIMIT = 8192
_READ_TIMEOUT_S = 5.0
# How long one source may take before the scrape answers without it.
SOURCE_TIMEOUT_S = 3.0


@dataclass(frozen=True, slots=True)
class Source:
    """Series brought up to date by `refresh` on every scrape."""

    name: str
    refresh: Callable[[], Awaitable[None]]


class MetricsServer:
    """Serves `registry` at GET /metrics; `add` registers sources refreshed per scrape."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._sources: list[Source] = []
        self._server: asyncio.Server | None = None
        self.port = 0
        self._failures = Counter(
            "raven_metrics_source_failures_total",
            "Scrapes in which a source of series read on scrape failed or timed out.",
            ["source"],
            registry=registry,
        )
        self._scrape = Histogram(
            "raven_metrics_scrape_seconds",
            "Time to refresh the sources and render /metrics.",
            registry=registry,
        )

    def add(self, source: Source) -> None:
        self._sources.append(source)

    async def start(self, address: str) -> int:
        """Listens on `address` (port 0: a free one); returns the port bound."""
        host, port = split_address(address)
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("serving metrics", address=address, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def render(self) -> bytes:
        """The exposition text after refreshing every source."""
        started = time.perf_counter()
        await asyncio.gather(*(self._refresh(source) for source in self._sources))
        body = generate_latest(self.registry)
        self._scrape.observe(time.perf_counter() - started)
        return body

    async def _refresh(self, source: Source) -> None:
        try:
            await asyncio.wait_for(source.refresh(), SOURCE_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._failures.labels(source.name).inc()
            log.warning("metrics source failed", source=source.name, error=repr(error))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            status, body, content_type = await self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if head.startswith(b"HEAD ") else body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > _REQUEST_LIMIT:
            return "431 Request Header Fields Too Large", b"", "text/plain"
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3:
            return "400 Bad Request", b"bad request\n", "text/plain"
        method, target, _ = parts
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        if target.split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return "404 Not Found", b"GET /metrics\n", "text/plain"
        return "200 OK", await self.render(), CONTENT_TYPE_LATEST
