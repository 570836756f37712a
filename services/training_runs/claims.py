"""Answers workers' job claims (request-reply on the claims subject)."""

from __future__ import annotations

from collections.abc import Callable

import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from services.training_runs.domain import ClaimRefusal
from services.training_runs.handlers import claim_job
from services.training_runs.unit_of_work import UnitOfWork
from shared.errors import InvalidArgument
from shared.names import TRAINING_RUNS, parse_name
from shared.observability import tracing
from shared.proto.raven.training.v1.worker_pb2 import ClaimJobRequest, ClaimJobResponse
from shared.proto_json import parse

log = structlog.get_logger(__name__)


class ClaimResponder:
    def __init__(self, uow_factory: Callable[[], UnitOfWork], *, max_attempts: int) -> None:
        self._uow_factory = uow_factory
        self._max_attempts = max_attempts

    async def handle(self, msg: Msg) -> None:
        # In the job's trace: the worker's claim span travels in the request's headers.
        with tracing.span("answer job claim", kind=SpanKind.SERVER, parent=msg.headers or {}):
            await self._answer(msg)

    async def _answer(self, msg: Msg) -> None:
        try:
            request = ClaimJobRequest.FromString(msg.data)
            run_id = parse_name(request.training_run, TRAINING_RUNS)
        except (DecodeError, InvalidArgument):
            log.warning("unreadable job claim", subject=msg.subject)
            refusal = ClaimRefusal.UNKNOWN_RUN
            await msg.respond(ClaimJobResponse(refusal=refusal).SerializeToString())
            return
        try:
            claim = await claim_job(
                self._uow_factory(),
                run_id,
                attempt=request.attempt,
                worker_id=request.worker_id,
                max_attempts=self._max_attempts,
            )
        except Exception:
            # No answer: the worker retries the job later.
            log.exception("job claim failed", run_id=str(run_id))
            return
        response = ClaimJobResponse(
            granted=claim.granted, attempt=claim.attempt, refusal=claim.refusal or ""
        )
        if claim.resume_from is not None:
            parse(claim.resume_from.to_json(), response.resume_from)
            response.resume_epoch = claim.resume_from.epoch or 0
        if claim.best_checkpoint is not None:
            parse(claim.best_checkpoint.to_json(), response.best_checkpoint)
            response.best_epoch = claim.best_checkpoint.epoch or 0
        await msg.respond(response.SerializeToString())
