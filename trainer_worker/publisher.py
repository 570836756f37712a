"""Publishes the WorkerEvents of one job attempt to JetStream.

Each event has a fresh id, sent as `Nats-Msg-Id`, so a retried publish is stored
once. Progress and heartbeats are best effort; terminal events are retried until
JetStream acknowledges them, because the job message is acked only after that.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import structlog
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from shared.messaging import Subjects
from shared.observability import tracing
from shared.proto.raven.training.v1 import worker_pb2

log = structlog.get_logger(__name__)

_CRITICAL_ATTEMPTS = 10
_PUBLISH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class JobIdentity:
    training_run: str  # trainingRuns/{id}
    run_id: str
    attempt: int
    worker_id: str


class EventPublisher:
    """Publishes the WorkerEvents of one job attempt."""

    def __init__(self, *, js: JetStreamContext, subjects: Subjects, job: JobIdentity) -> None:
        self._js = js
        self._subject = subjects.worker_event(job.run_id)
        self._job = job

    async def publish(self, *, critical: bool = False, **payload: Any) -> None:
        """Publishes one event whose payload is the single keyword argument, e.g.
        `publish(progress=Progress(...))`. A critical event is retried until stored."""
        (field_name, message), *rest = payload.items()
        if rest:
            raise TypeError("one payload per event")
        event = worker_pb2.WorkerEvent(
            event_id=uuid.uuid4().hex,
            training_run=self._job.training_run,
            attempt=self._job.attempt,
            worker_id=self._job.worker_id,
        )
        event.time.GetCurrentTime()
        getattr(event, field_name).CopyFrom(message)
        data = event.SerializeToString()
        # The job's trace goes on in the service's consumer of the event.
        headers = tracing.inject({"Nats-Msg-Id": event.event_id})
        attempts = _CRITICAL_ATTEMPTS if critical else 1
        for attempt in range(1, attempts + 1):
            try:
                await self._js.publish(
                    self._subject, data, headers=headers, timeout=_PUBLISH_TIMEOUT_S
                )
                return
            except (NatsError, TimeoutError) as error:
                log.warning(
                    "event not published",
                    kind=field_name,
                    attempt=attempt,
                    error=repr(error),
                    run_id=self._job.run_id,
                )
                if attempt == attempts:
                    if critical:
                        raise
                    return
                await asyncio.sleep(min(30.0, 0.5 * 2**attempt))
