"""Job claims: before it starts a job, the worker asks TrainingRunService for it.

The answer fences the job: a redelivered job continues as the next attempt, and a
job whose run finished, was cancelled or was superseded is dropped. No answer
means the service is unavailable: the job goes back to the queue for later.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.errors import Error as NatsError
from opentelemetry.trace import SpanKind

from shared.messaging import Subjects
from shared.observability import tracing
from shared.proto.raven.training.v1 import common_pb2, worker_pb2

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    granted: bool
    # The attempt to report under.
    attempt: int
    refusal: str = ""
    # The newest checkpoint an earlier attempt stored, to resume from.
    resume_from: common_pb2.Artifact | None = None
    resume_epoch: int = 0
    # The best epoch's checkpoint so far, when it is not resume_from.
    best_checkpoint: common_pb2.Artifact | None = None
    best_epoch: int = 0


class ClaimClient:
    def __init__(self, *, nc: NATS, subjects: Subjects, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._subject = subjects.claims
        self._timeout_s = timeout_s

    async def claim(
        self, *, training_run: str, attempt: int, worker_id: str, delivery: int
    ) -> Claim | None:
        """The service's answer, or None when it did not answer."""
        request = worker_pb2.ClaimJobRequest(
            training_run=training_run, attempt=attempt, worker_id=worker_id, delivery=delivery
        )
        with tracing.span("claim job", kind=SpanKind.CLIENT, attributes={"attempt": attempt}):
            try:
                reply = await self._nc.request(
                    self._subject,
                    request.SerializeToString(),
                    timeout=self._timeout_s,
                    headers=tracing.inject(),
                )
                response = worker_pb2.ClaimJobResponse.FromString(reply.data)
            except (NatsError, TimeoutError, DecodeError) as error:
                log.warning("job claim unanswered", training_run=training_run, error=repr(error))
                return None
        return Claim(
            granted=response.granted,
            attempt=response.attempt or attempt,
            refusal=response.refusal,
            resume_from=response.resume_from if response.HasField("resume_from") else None,
            resume_epoch=response.resume_epoch,
            best_checkpoint=(
                response.best_checkpoint if response.HasField("best_checkpoint") else None
            ),
            best_epoch=response.best_epoch,
        )
