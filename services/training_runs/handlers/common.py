"""What the use cases of TrainingRunService share: the clock, loading a run to change
it, the etag check and the request_id."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

from services.training_runs.domain import SYSTEM, TrainingRun
from services.training_runs.messages import job_message
from services.training_runs.unit_of_work import UnitOfWork
from shared.errors import Conflict, Violations

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


async def locked(uow: UnitOfWork, run_id: uuid.UUID) -> TrainingRun:
    return await uow.runs.require(run_id, for_update=True)


def check_etag(run: TrainingRun, etag: str) -> None:
    if etag and etag != run.etag:
        raise Conflict(f"training run {run.id} changed since it was read: get it again")


def parse_request_id(raw: str, violations: Violations) -> uuid.UUID | None:
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        violations.add("request_id", "must be a UUID")
        return None


async def publish_job(uow: UnitOfWork, run: TrainingRun) -> None:
    """Queues the job message of the run's current attempt, with the model it fine-tunes
    or evaluates. An evaluation job whose model was deleted meanwhile fails instead."""
    if run.is_evaluation:
        model_id = run.evaluation.trained_model_id if run.evaluation else None
        base = await uow.runs.base_model(model_id) if model_id else None
        if base is None:
            run.fail(
                reason="model_deleted",
                message="the evaluated model was deleted; nothing is left to evaluate",
                actor=SYSTEM,
                now=utcnow(),
            )
            return
    else:
        base = await uow.runs.base_model(run.base_model_id) if run.base_model_id else None
    uow.publish(job_message(run, base, uow.subjects))
