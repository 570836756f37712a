"""The series of a service process: its RPCs, the outbox, its JetStream consumers.

Every service has its own registry (tests run both services in one process). What lives
elsewhere is read on scrape (`Source`s of shared.observability.metrics_server): the
outbox's backlog from Postgres, the consumers' pending counts from JetStream's consumer
info. Handling times are observed as messages are handled.
"""

from __future__ import annotations

import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.consumer import Handler, Retry, Unprocessable
from shared.db.schema import outbox, outbox_dead_letters
from shared.observability.metrics_server import MetricsServer, Source
from shared.observability.rpc_metrics import RpcMetrics

# Handling a consumed message: a database transaction, rarely more than a second.
_HANDLING_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServiceMetrics:
    """A service's registry, its `/metrics` server, and the series every service has."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.server = MetricsServer(self.registry)
        self.rpc = RpcMetrics(self.registry)
        r = self.registry
        self.outbox_backlog = Gauge(
            "raven_outbox_backlog_messages",
            "Outbox rows committed and not yet published to JetStream (read on scrape).",
            registry=r,
        )
        self.outbox_oldest_age = Gauge(
            "raven_outbox_oldest_message_age_seconds",
            "Age of the oldest unpublished outbox row; 0 when the outbox is empty.",
            registry=r,
        )
        self.outbox_dead_letters = Gauge(
            "raven_outbox_dead_letters",
            "Outbox rows set aside as unpublishable (outbox_dead_letters).",
            registry=r,
        )
        self.consumer_pending = Gauge(
            "raven_jetstream_consumer_pending_messages",
            "Messages of a durable consumer not yet delivered (the job_queue consumer: "
            "jobs waiting for a worker), from the consumer info on scrape.",
            ["consumer"],
            registry=r,
        )
        self.consumer_ack_pending = Gauge(
            "raven_jetstream_consumer_ack_pending_messages",
            "Messages delivered and not yet acknowledged (job_queue: jobs being trained).",
            ["consumer"],
            registry=r,
        )
        self.consumer_redelivered = Gauge(
            "raven_jetstream_consumer_redelivered_messages",
            "Messages of the consumer delivered more than once and not yet acknowledged.",
            ["consumer"],
            registry=r,
        )
        self.handling = Histogram(
            "raven_consumer_handling_seconds",
            "Time this process took to handle a consumed message, by outcome "
            "(ok, retry, unprocessable, error).",
            ["consumer", "outcome"],
            buckets=_HANDLING_BUCKETS,
            registry=r,
        )
        self.handling_lag = Histogram(
            "raven_consumer_lag_seconds",
            "Time from a message's arrival in its JetStream stream to the start of its handling.",
            ["consumer"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900),
            registry=r,
        )

    def watch_outbox(self, engine: AsyncEngine) -> None:
        async def refresh() -> None:
            query = select(
                func.count(), func.extract("epoch", func.now() - func.min(outbox.c.create_time))
            )
            async with engine.connect() as connection:
                count, age = (await connection.execute(query)).one()
                dead = await connection.scalar(
                    select(func.count()).select_from(outbox_dead_letters)
                )
            self.outbox_backlog.set(count)
            self.outbox_oldest_age.set(float(age or 0.0))
            self.outbox_dead_letters.set(dead or 0)

        self.server.add(Source("outbox", refresh))

    def watch_consumer(
        self,
        js: JetStreamContext,
        *,
        consumer: str,
        stream: str,
        durable: str,
        work_queue: bool = False,
    ) -> None:
        """Pending counts of `durable` on `stream`, labelled `consumer`. On a `work_queue`
        stream whose durable consumer nobody created yet (no worker started), every message
        of the stream is pending: its message count is reported."""

        async def refresh() -> None:
            try:
                info = await js.consumer_info(stream, durable)
            except NotFoundError:
                if not work_queue:
                    return
                state = (await js.stream_info(stream)).state
                pending, ack_pending, redelivered = state.messages, 0, 0
            else:
                pending = info.num_pending or 0
                ack_pending = info.num_ack_pending or 0
                redelivered = info.num_redelivered or 0
            self.consumer_pending.labels(consumer).set(pending)
            self.consumer_ack_pending.labels(consumer).set(ack_pending)
            self.consumer_redelivered.labels(consumer).set(redelivered)

        self.server.add(Source(f"consumer {consumer}", refresh))

    def timed(self, consumer: str, handle: Handler) -> Handler:
        """`handle`, observing its handling time and outcome, and the message's lag."""

        async def timed_handle(msg: Msg) -> None:
            published = msg.metadata.timestamp if msg.metadata else None
            if published is not None:
                self.handling_lag.labels(consumer).observe(
                    max(0.0, time.time() - published.timestamp())
                )
            started = time.perf_counter()
            outcome = "error"
            try:
                await handle(msg)
                outcome = "ok"
            except Retry:
                outcome = "retry"
                raise
            except Unprocessable:
                outcome = "unprocessable"
                raise
            finally:
                self.handling.labels(consumer, outcome).observe(time.perf_counter() - started)

        return timed_handle
