"""Reading runs, and what a caller does to one after creating it: update, cancel,
delete, retry."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Mapping, Sequence

import structlog

from services.training_runs.domain import RunEvent, TrainingRun
from services.training_runs.handlers.common import (
    Clock,
    check_etag,
    locked,
    parse_request_id,
    utcnow,
)
from services.training_runs.messages import job_message
from services.training_runs.unit_of_work import UnitOfWork
from shared import catalog
from shared.errors import AlreadyExists, FailedPrecondition, Violations
from shared.limits import label_problems
from shared.storage import Storage, StorageError

log = structlog.get_logger(__name__)


async def get_run(uow: UnitOfWork, run_id: uuid.UUID) -> TrainingRun:
    async with uow.reading():
        return await uow.runs.require(run_id)


async def list_events(
    uow: UnitOfWork, run_id: uuid.UUID, *, after_sequence: int, limit: int
) -> Sequence[RunEvent]:
    async with uow.reading():
        await uow.runs.require(run_id)
        return await uow.runs.events(run_id, after_sequence=after_sequence, limit=limit)


async def update_run(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    *,
    etag: str,
    display_name: str | None,
    labels: Mapping[str, str] | None,
    clock: Clock = utcnow,
) -> TrainingRun:
    violations = Violations()
    if display_name is not None:
        display_name = display_name.strip()
        violations.check(bool(display_name), "training_run.display_name", "required")
        violations.check(
            len(display_name) <= catalog.DISPLAY_NAME_MAX,
            "training_run.display_name",
            f"at most {catalog.DISPLAY_NAME_MAX} characters",
        )
    for problem in label_problems(labels or {}):
        violations.add("training_run.labels", problem)
    violations.raise_if_any()
    async with uow:
        run = await locked(uow, run_id)
        check_etag(run, etag)
        run.rename(display_name=display_name, labels=labels, now=clock())
        await uow.commit()
    return run


async def cancel_run(
    uow: UnitOfWork, run_id: uuid.UUID, *, reason: str, actor: str, clock: Clock = utcnow
) -> TrainingRun:
    async with uow:
        run = await locked(uow, run_id)
        run.request_cancel(reason=reason, actor=actor, now=clock())
        await uow.commit()
    return run


async def delete_run(uow: UnitOfWork, run_id: uuid.UUID, *, etag: str, storage: Storage) -> None:
    """Deletes the run's rows, then (after they are gone) its working files and stored
    checkpoints. Its model, if any, stays in the registry with its own artifacts."""
    async with uow:
        run = await locked(uow, run_id)
        check_etag(run, etag)
        run.ensure_deletable()
        uow.runs.delete(run)
        await uow.commit()
    work_dir = storage.artifact_root / "runs" / str(run_id)
    await asyncio.to_thread(shutil.rmtree, work_dir, ignore_errors=True)
    if storage.remote:
        try:
            await asyncio.to_thread(storage.delete_prefix, storage.artifact_uri(f"runs/{run_id}/"))
        except StorageError as error:
            log.warning(
                "stored checkpoints of a deleted run remain", run_id=str(run_id), error=str(error)
            )


async def retry_run(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    *,
    request_id: str,
    creator: str,
    clock: Clock = utcnow,
) -> TrainingRun:
    violations = Violations()
    parsed_request_id = parse_request_id(request_id, violations)
    violations.raise_if_any()
    request_hash = f"retry:{run_id}"
    async with uow:
        if parsed_request_id is not None:
            existing = await uow.runs.get_by_request(creator, parsed_request_id)
            if existing is not None:
                if existing.request_hash != request_hash:
                    raise AlreadyExists(f"request_id {request_id} was used for another request")
                return existing
        original = await uow.runs.require(run_id)
        base = None
        if original.base_model_id is not None:
            base = await uow.runs.base_model(original.base_model_id, lock=True)
            if base is None:
                raise FailedPrecondition(
                    f"the base model of training run {run_id} was deleted; create a new run"
                )
        run = original.retried(
            creator=creator, request_id=parsed_request_id, request_hash=request_hash, now=clock()
        )
        uow.runs.add(run)
        uow.publish(job_message(run, base, uow.subjects))
        await uow.commit()
    return run
