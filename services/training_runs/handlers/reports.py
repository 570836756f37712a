"""What workers ask and tell about their jobs: job claims, and the reports of the worker
events stream (shared.reports), each applied once."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import assert_never

import structlog

from services.training_runs.domain import ClaimDecision, ClaimRefusal, RunState, TrainingRun
from services.training_runs.handlers.common import Clock, publish_job, utcnow
from services.training_runs.unit_of_work import UnitOfWork
from shared.errors import FailedPrecondition
from shared.reports import (
    Cancelled,
    CheckpointSaved,
    DatasetPrepared,
    EvaluationReported,
    Failed,
    Heartbeat,
    NoticeReported,
    Preparing,
    ProgressReported,
    Released,
    Report,
    ReportKind,
    Running,
    Succeeded,
)

log = structlog.get_logger(__name__)

WORKER_EVENTS_CONSUMER = "training-runs.worker-events"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReport:
    """A WorkerEvent, in domain terms."""

    event_id: str
    run_id: uuid.UUID
    attempt: int
    worker_id: str
    time: datetime
    payload: Report

    @property
    def kind(self) -> ReportKind:
        return self.payload.kind


async def claim_job(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    *,
    attempt: int,
    worker_id: str,
    max_attempts: int,
    clock: Clock = utcnow,
) -> ClaimDecision:
    """Answers a worker that wants to start a job; with the checkpoints to resume from."""
    async with uow:
        run = await uow.runs.get(run_id, for_update=True)
        if run is None:
            return ClaimDecision.refused(ClaimRefusal.UNKNOWN_RUN, attempt=attempt)
        claim = run.claim(
            attempt=attempt, worker_id=worker_id, max_attempts=max_attempts, now=clock()
        )
        await uow.commit()
    log.info(
        "job claimed" if claim.granted else "job claim refused",
        run_id=str(run_id),
        worker=worker_id,
        attempt=claim.attempt,
        refusal=claim.refusal or "",
    )
    return claim


async def apply_worker_report(uow: UnitOfWork, report: WorkerReport) -> bool:
    """Applies what a worker reported, once. Returns False when the report was
    ignored: a duplicate, a stale attempt, or a run that no longer accepts it."""
    async with uow:
        if isinstance(report.payload, Heartbeat) and await uow.runs.record_heartbeat(
            report.run_id, attempt=report.attempt, time=report.time
        ):
            await uow.commit()
            return True
        run = await uow.runs.get(report.run_id, for_update=True)
        if run is None:
            log.warning("report for an unknown run", run_id=str(report.run_id), kind=report.kind)
            return False
        if report.attempt != run.attempt:
            # A worker that lost its lease came back late: the newer attempt owns the run.
            log.warning(
                "stale attempt", run_id=str(run.id), attempt=report.attempt, current=run.attempt
            )
            return False
        if isinstance(report.payload, Heartbeat):
            run.heartbeat(now=report.time)
            await uow.commit()
            return True
        if not await uow.runs.mark_processed(WORKER_EVENTS_CONSUMER, report.event_id):
            return False
        try:
            applied = _apply(run, report)
        except FailedPrecondition as error:
            log.warning("report refused", run_id=str(run.id), kind=report.kind, error=error.message)
            return False
        if applied:
            if isinstance(report.payload, Released) and run.state is RunState.QUEUED:
                await publish_job(uow, run)
        await uow.commit()
        return applied


async def apply_progress_reports(uow: UnitOfWork, reports: Sequence[WorkerReport]) -> list[bool]:
    """Applies progress reports of many runs in one transaction; for each, whether it was
    applied. A progress report needs no dedupe row: one not newer than the run's last
    progress changes nothing (TrainingRun.report_progress), so a redelivery is harmless."""
    async with uow:
        runs = {
            run.id: run
            for run in await uow.runs.get_many({r.run_id for r in reports}, for_update=True)
        }
        applied: list[bool] = []
        for report in reports:
            run = runs.get(report.run_id)
            if run is None or report.attempt != run.attempt:
                applied.append(False)
                continue
            try:
                applied.append(_apply(run, report))
            except FailedPrecondition as error:
                log.warning(
                    "report refused", run_id=str(run.id), kind=report.kind, error=error.message
                )
                applied.append(False)
        await uow.commit()
    return applied


def _apply(run: TrainingRun, report: WorkerReport) -> bool:
    actor = f"worker:{report.worker_id}"
    now = report.time
    run.heartbeat(now=now)
    match report.payload:
        case Preparing():
            run.start_preparing(worker_id=report.worker_id, actor=actor, now=now)
        case DatasetPrepared(summary=summary):
            run.record_dataset(summary, actor=actor, now=now)
        case Running(device=device):
            run.start_running(device=device or "cpu", actor=actor, now=now)
        case ProgressReported(progress=progress):
            return run.report_progress(progress, actor=actor, now=now)
        case EvaluationReported(evaluation=evaluation):
            run.report_evaluation(evaluation, actor=actor, now=now)
        case NoticeReported(notice=notice):
            run.notify(code=notice.code, message=notice.message, actor=actor, now=now)
        case Succeeded() as succeeded if run.is_evaluation:
            run.succeed_evaluation(
                artifacts=succeeded.artifacts,
                evaluation=succeeded.evaluation,
                review=succeeded.review,
                actor=actor,
                now=now,
            )
        case Succeeded() as succeeded:
            run.succeed(
                artifacts=succeeded.artifacts,
                facts=succeeded.facts,
                best_evaluation=succeeded.evaluation,
                epoch_metrics=succeeded.epochs,
                test_evaluation=succeeded.test_evaluation,
                actor=actor,
                now=now,
            )
        case Failed() as failed:
            run.fail(
                reason=failed.reason or "training_failed",
                message=failed.message,
                artifacts=failed.artifacts,
                actor=actor,
                now=now,
            )
        case Cancelled():
            run.cancelled(actor=actor, now=now)
        case Released():
            run.release(actor=actor, now=now)
        case CheckpointSaved() as saved:
            run.record_checkpoint(saved.checkpoint, epoch=saved.epoch, now=now)
        case Heartbeat():
            pass  # Applied above.
        case unknown:
            assert_never(unknown)
    return True
