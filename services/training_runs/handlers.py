"""Use cases of TrainingRunService: each takes a unit of work, asks the domain,
and commits once."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import structlog

from services.training_runs.domain import Claim, RunEvent, RunState, TrainingRun
from services.training_runs.messages import job_message
from services.training_runs.repository import BaseModel, RunFilter
from services.training_runs.spec import SpecRequest, validate_spec
from services.training_runs.unit_of_work import UnitOfWork
from shared import catalog
from shared.datasets import DatasetUriError, resolve_dataset_uri
from shared.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    NotFound,
    Unavailable,
    Violations,
)
from shared.limits import label_problems, quote
from shared.names import TRAINED_MODELS, parse_name
from shared.pagination import Cursor
from shared.storage import Storage, StorageError

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRun:
    display_name: str
    labels: Mapping[str, str]
    spec: SpecRequest
    base_model: str
    request_id: str
    creator: str
    # Fingerprint of the request body: the same request_id must come with the same body.
    request_hash: str
    # Set for a caller that may read only its own models: the base model must be one.
    base_model_owner: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReport:
    """A WorkerEvent, in domain terms."""

    event_id: str
    run_id: uuid.UUID
    attempt: int
    worker_id: str
    time: datetime
    kind: str
    payload: dict[str, Any] = field(default_factory=dict)


async def create_run(
    uow: UnitOfWork, command: CreateRun, *, storage: Storage, clock: Clock = utcnow
) -> TrainingRun:
    violations = Violations()
    request_id = _request_id(command.request_id, violations)
    base_model_id = (
        parse_name(command.base_model, TRAINED_MODELS, field="training_run.base_model")
        if command.base_model
        else None
    )
    name = command.display_name.strip()
    violations.check(bool(name), "training_run.display_name", "required")
    violations.check(
        len(name) <= catalog.DISPLAY_NAME_MAX,
        "training_run.display_name",
        f"at most {catalog.DISPLAY_NAME_MAX} characters",
    )
    for problem in label_problems(command.labels):
        violations.add("training_run.labels", problem)
    # Outside the transaction: an object store may take a while to answer.
    await _check_dataset_exists(command.spec.dataset_uri, storage, violations)
    async with uow:
        if request_id is not None:
            existing = await _repeated(uow, command, request_id)
            if existing is not None:
                return existing

        base: BaseModel | None = None
        if base_model_id is not None:
            base = await uow.runs.base_model(base_model_id, lock=True)
            if base is None:
                raise NotFound(f"base model {command.base_model} does not exist")
            if command.base_model_owner not in (None, base.creator):
                # Another's model, for a caller that may read only its own: as if missing.
                raise NotFound(f"base model {command.base_model} does not exist")
            missing = await asyncio.to_thread(_missing_artifacts, base, storage)
            if missing:
                raise NotFound(f"base model {command.base_model} has lost its {', '.join(missing)}")

        spec = validate_spec(
            command.spec, violations, base_architecture=base.architecture if base else None
        )
        violations.raise_if_any()
        assert spec is not None

        run = TrainingRun.create(
            display_name=name,
            labels=command.labels,
            spec=spec,
            base_model_id=base_model_id,
            creator=command.creator,
            request_id=request_id,
            request_hash=command.request_hash,
            now=clock(),
        )
        uow.runs.add(run)
        uow.publish(job_message(run, base, uow.subjects))
        try:
            await uow.commit()
        except AlreadyExists:
            # The same request raced this one and committed first.
            if request_id is None:
                raise
            existing = await _repeated(uow, command, request_id)
            if existing is None:
                raise
            return existing
    log.info("training run created", run_id=str(run.id), architecture=run.architecture)
    return run


async def _repeated(
    uow: UnitOfWork, command: CreateRun, request_id: uuid.UUID
) -> TrainingRun | None:
    """The run an earlier request with this request_id created, if the bodies match."""
    existing = await uow.runs.get_by_request(command.creator, request_id)
    if existing is not None and existing.request_hash != command.request_hash:
        raise AlreadyExists(
            f"request_id {request_id} was used for another request (training run {existing.id})"
        )
    return existing


def _missing_artifacts(base: BaseModel, storage: Storage) -> list[str]:
    """The kinds of the base model's weights and config that are not where its record says."""
    by_kind = {a.get("kind"): a for a in base.artifacts}
    missing = []
    for kind in ("checkpoint", "config"):
        uri = str(by_kind.get(kind, {}).get("uri", ""))
        parsed = urlparse(uri)
        if not uri:
            missing.append(kind)
        elif parsed.scheme == "file" and not Path(unquote(parsed.path)).is_file():
            missing.append(kind)
        elif parsed.scheme == "s3":
            try:
                if storage.s3.size(uri) is None:
                    missing.append(kind)
            except StorageError as error:
                raise Unavailable(f"the {kind} of base model {base.id}: {error}") from None
    return missing


def _request_id(raw: str, violations: Violations) -> uuid.UUID | None:
    if not raw:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        violations.add("request_id", "must be a UUID")
        return None


async def _check_dataset_exists(uri: str, storage: Storage, violations: Violations) -> None:
    field = "training_run.spec.dataset_uri"
    if not uri:
        return
    try:
        location = resolve_dataset_uri(uri, storage.artifact_root)
    except DatasetUriError:
        return  # reported by the spec validation
    if isinstance(location, Path):
        try:
            found = await asyncio.to_thread(location.is_file)
        except OSError:  # A name too long for the file system, say.
            found = False
        if not found:
            violations.add(field, f"no annotation file at {quote(uri)}")
        return
    try:
        size = await asyncio.to_thread(storage.s3.size, str(location))
    except StorageError as error:
        violations.add(field, f"cannot check the annotation file: {error}")
        return
    if size is None:
        violations.add(field, f"no annotation file at {quote(uri)}")


async def get_run(uow: UnitOfWork, run_id: uuid.UUID) -> TrainingRun:
    async with uow.reading():
        run = await uow.runs.get(run_id)
    if run is None:
        raise NotFound(f"training run {run_id} does not exist")
    return run


async def list_runs(
    uow: UnitOfWork, filter_: RunFilter, *, limit: int, after: Cursor | None
) -> Sequence[TrainingRun]:
    async with uow.reading():
        return await uow.runs.list(filter_, limit=limit, after=after)


async def list_events(
    uow: UnitOfWork, run_id: uuid.UUID, *, after_sequence: int, limit: int
) -> Sequence[RunEvent]:
    async with uow.reading():
        if await uow.runs.get(run_id) is None:
            raise NotFound(f"training run {run_id} does not exist")
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
        run = await _locked(uow, run_id)
        _check_etag(run, etag)
        run.rename(display_name=display_name, labels=labels, now=clock())
        await uow.commit()
    return run


async def cancel_run(
    uow: UnitOfWork, run_id: uuid.UUID, *, reason: str, actor: str, clock: Clock = utcnow
) -> TrainingRun:
    async with uow:
        run = await _locked(uow, run_id)
        run.request_cancel(reason=reason, actor=actor, now=clock())
        await uow.commit()
    return run


async def delete_run(uow: UnitOfWork, run_id: uuid.UUID, *, etag: str, storage: Storage) -> None:
    """Deletes the run's rows, then (after they are gone) its working files and stored
    checkpoints. Its model, if any, stays in the registry with its own artifacts."""
    async with uow:
        run = await _locked(uow, run_id)
        _check_etag(run, etag)
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
    parsed_request_id = _request_id(request_id, violations)
    violations.raise_if_any()
    request_hash = f"retry:{run_id}"
    async with uow:
        if parsed_request_id is not None:
            existing = await uow.runs.get_by_request(creator, parsed_request_id)
            if existing is not None:
                if existing.request_hash != request_hash:
                    raise AlreadyExists(f"request_id {request_id} was used for another request")
                return existing
        original = await uow.runs.get(run_id)
        if original is None:
            raise NotFound(f"training run {run_id} does not exist")
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


async def claim_job(
    uow: UnitOfWork,
    run_id: uuid.UUID,
    *,
    attempt: int,
    worker_id: str,
    max_attempts: int,
    clock: Clock = utcnow,
) -> Claim:
    """Answers a worker that wants to start a job; with the checkpoints to resume from."""
    async with uow:
        run = await uow.runs.get(run_id, for_update=True)
        if run is None:
            return Claim(granted=False, attempt=attempt, refusal="unknown_run")
        claim = run.claim(
            attempt=attempt, worker_id=worker_id, max_attempts=max_attempts, now=clock()
        )
        await uow.commit()
    log.info(
        "job claimed" if claim.granted else "job claim refused",
        run_id=str(run_id),
        worker=worker_id,
        attempt=claim.attempt,
        refusal=claim.refusal,
    )
    return claim


async def recover_lost_runs(
    uow: UnitOfWork,
    *,
    timeout_s: float,
    max_attempts: int,
    clock: Clock = utcnow,
    batch: int = 100,
) -> list[TrainingRun]:
    """Requeues (or fails) active runs whose worker went silent. Returns the changed runs."""
    now = clock()
    async with uow:
        silent = await uow.runs.silent_runs(since=now - timedelta(seconds=timeout_s), limit=batch)
        for run in silent:
            assert run.heartbeat_time is not None
            silent_s = (now - run.heartbeat_time).total_seconds()
            run.lose_worker(max_attempts=max_attempts, silent_s=silent_s, now=now)
            if run.state is RunState.QUEUED:
                base = await uow.runs.base_model(run.base_model_id) if run.base_model_id else None
                uow.publish(job_message(run, base, uow.subjects))
            log.warning(
                "worker lost", run_id=str(run.id), state=run.state.value, attempt=run.attempt
            )
        await uow.commit()
    return list(silent)


async def recover_lost_runs_forever(
    uow_factory: Callable[[], UnitOfWork], *, timeout_s: float, max_attempts: int
) -> None:
    """Checks a few times per timeout; cheap: an index holds only active runs."""
    while True:
        try:
            await recover_lost_runs(uow_factory(), timeout_s=timeout_s, max_attempts=max_attempts)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recovering lost runs failed")
        await asyncio.sleep(max(timeout_s / 4, 0.2))


async def _locked(uow: UnitOfWork, run_id: uuid.UUID) -> TrainingRun:
    run = await uow.runs.get(run_id, for_update=True)
    if run is None:
        raise NotFound(f"training run {run_id} does not exist")
    return run


def _check_etag(run: TrainingRun, etag: str) -> None:
    if etag and etag != run.etag:
        raise Conflict(f"training run {run.id} changed since it was read: get it again")


WORKER_EVENTS_CONSUMER = "training-runs.worker-events"


async def apply_worker_report(uow: UnitOfWork, report: WorkerReport) -> bool:
    """Applies what a worker reported, once. Returns False when the report was
    ignored: a duplicate, a stale attempt, or a run that no longer accepts it."""
    async with uow:
        if report.kind == "heartbeat" and await uow.runs.record_heartbeat(
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
        if report.kind == "heartbeat":
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
            if report.kind == "released" and run.state is RunState.QUEUED:
                base = await uow.runs.base_model(run.base_model_id) if run.base_model_id else None
                uow.publish(job_message(run, base, uow.subjects))
        await uow.commit()
        return applied


def _apply(run: TrainingRun, report: WorkerReport) -> bool:
    actor = f"worker:{report.worker_id}"
    now = report.time
    payload = report.payload
    run.heartbeat(now=now)
    match report.kind:
        case "preparing":
            run.start_preparing(worker_id=report.worker_id, actor=actor, now=now)
        case "dataset_prepared":
            run.record_dataset(payload, actor=actor, now=now)
        case "running":
            run.start_running(device=payload.get("device", "cpu"), actor=actor, now=now)
        case "progress":
            return run.report_progress(payload, actor=actor, now=now)
        case "evaluation":
            run.report_evaluation(payload, actor=actor, now=now)
        case "notice":
            run.notify(
                code=payload.get("code", ""),
                message=payload.get("message", ""),
                actor=actor,
                now=now,
            )
        case "succeeded":
            run.succeed(
                artifacts=payload.get("artifacts", []),
                facts=payload.get("facts", {}),
                best_evaluation=payload.get("evaluation"),
                epoch_metrics=payload.get("epochs", []),
                test_evaluation=payload.get("test_evaluation"),
                actor=actor,
                now=now,
            )
        case "failed":
            run.fail(
                reason=payload.get("reason") or "training_failed",
                message=payload.get("message", ""),
                artifacts=payload.get("artifacts", []),
                actor=actor,
                now=now,
            )
        case "cancelled":
            run.cancelled(actor=actor, now=now)
        case "released":
            run.release(actor=actor, now=now)
        case "checkpoint_saved":
            run.record_checkpoint(
                payload.get("checkpoint", {}), epoch=int(payload.get("epoch", 0)), now=now
            )
        case _:
            log.warning("unknown report kind", kind=report.kind)
            return False
    return True
