"""Use cases of TrainedModelService."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import structlog

from services.trained_models import artifacts
from services.trained_models.domain import Lineage, TrainedModel
from services.trained_models.messages import model_from_run
from services.trained_models.repository import ModelFilter
from services.trained_models.unit_of_work import UnitOfWork
from shared import limits
from shared.errors import Conflict, FailedPrecondition, NotFound, Unavailable, Violations
from shared.limits import quote
from shared.pagination import Cursor
from shared.storage import Storage, StorageError, UnsupportedUri

log = structlog.get_logger(__name__)

MAX_LINEAGE_DEPTH = 50
MAX_DISPLAY_NAME = limits.DISPLAY_NAME_MAX
MAX_DESCRIPTION = limits.DESCRIPTION_MAX
MAX_LABELS = limits.LABELS_MAX
# A run that ended in one of these no longer reads its base model's files.
FINISHED_RUN_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
EDITABLE_FIELDS = ("display_name", "description", "labels")

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


async def register_from_run(uow: UnitOfWork, run_id: uuid.UUID) -> bool:
    """Registers the model of a succeeded run, once per run however often its completion
    is delivered. The run's record, read once, is the model's one source: a stale or
    forged completion event names a run, it does not describe it. Returns False when the
    model was already registered, or the run did not succeed."""
    async with uow:
        run = await uow.models.succeeded_run(run_id)
        if run is None:
            log.warning("completion of a run that did not succeed ignored", run_id=str(run_id))
            return False
        model = model_from_run(run_id, run)
        if not await uow.models.add_if_absent(model):
            return False
        await uow.commit()
    log.info("trained model registered", model_id=str(model.id), run_id=str(run_id))
    return True


async def get_model(uow: UnitOfWork, model_id: uuid.UUID) -> TrainedModel:
    async with uow.reading():
        return await uow.models.require(model_id)


async def list_models(
    uow: UnitOfWork, filter_: ModelFilter, *, limit: int, after: Cursor | None
) -> Sequence[TrainedModel]:
    async with uow.reading():
        return await uow.models.list(filter_, limit=limit, after=after)


async def lineage(uow: UnitOfWork, model_id: uuid.UUID, *, depth: int) -> Lineage:
    async with uow.reading():
        result = await uow.lineage.get(model_id, max_depth=min(depth, MAX_LINEAGE_DEPTH))
    if not result.ancestors:
        raise NotFound(f"trained model {model_id} does not exist")
    return result


def check_etag(model: TrainedModel, etag: str) -> None:
    if etag and etag != model.etag:
        raise Conflict(f"trained model {model.id} was changed since it was read: get it again")


def validate_edit(
    violations: Violations,
    prefix: str,
    *,
    display_name: str | None = None,
    description: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> None:
    """The rules of the editable fields, shared by update and import."""
    if display_name is not None:
        violations.check(bool(display_name.strip()), f"{prefix}display_name", "must not be empty")
        violations.check(
            len(display_name) <= MAX_DISPLAY_NAME,
            f"{prefix}display_name",
            f"at most {MAX_DISPLAY_NAME} characters",
        )
    if description is not None:
        violations.check(
            len(description) <= MAX_DESCRIPTION,
            f"{prefix}description",
            f"at most {MAX_DESCRIPTION} characters",
        )
    if labels is not None:
        for problem in limits.label_problems(labels):
            violations.add(f"{prefix}labels", problem)


@dataclass(frozen=True, slots=True, kw_only=True)
class Edit:
    display_name: str
    description: str
    labels: dict[str, str]
    # Which of the fields above to change.
    fields: frozenset[str]
    etag: str = ""


async def update_model(
    uow: UnitOfWork, model_id: uuid.UUID, edit: Edit, *, clock: Clock = utcnow
) -> TrainedModel:
    violations = Violations()
    if not edit.fields:
        violations.add("update_mask", "name the fields to change: " + ", ".join(EDITABLE_FIELDS))
    for field in sorted(edit.fields - set(EDITABLE_FIELDS)):
        violations.add("update_mask", f"{quote(field)} cannot be changed; only {EDITABLE_FIELDS}")
    changes: dict[str, Any] = {f: getattr(edit, f) for f in edit.fields & set(EDITABLE_FIELDS)}
    validate_edit(violations, "trained_model.", **changes)
    violations.raise_if_any()
    async with uow:
        model = await uow.models.require(model_id, for_update=True)
        check_etag(model, edit.etag)
        model.edit(now=clock(), **changes)
        await uow.commit()
    return model


async def delete_model(
    uow: UnitOfWork, model_id: uuid.UUID, *, etag: str, actor: str, storage: Storage
) -> None:
    """Deletes the row, then (after the commit) the files: a crash in between leaves
    files without a row, never a row pointing at missing files."""
    async with uow:
        model = await uow.models.require(model_id, for_update=True)
        check_etag(model, etag)
        model.ensure_deletable()
        child = await uow.models.a_child(model_id)
        if child is not None:
            raise FailedPrecondition(
                f"trained model {model_id} is the base model of trainedModels/{child}; "
                "delete that model first"
            )
        run = await uow.models.an_unfinished_run_of(model_id, finished=FINISHED_RUN_STATES)
        if run is not None:
            run_id, state = run
            what = "has not finished" if state != "SUCCEEDED" else "has no registered model yet"
            raise FailedPrecondition(
                f"trained model {model_id} is the base model of trainingRuns/{run_id}, "
                f"which is {state} and {what}"
            )
        uow.models.delete(model, actor=actor)
        await uow.commit()
    log.info("trained model deleted", model_id=str(model_id))
    await remove_deleted_files(uow, storage, model_id=model_id)


async def remove_deleted_files(
    uow: UnitOfWork, storage: Storage, *, model_id: uuid.UUID | None = None
) -> int:
    """Removes the files of deleted models (one, or all still pending); returns how many
    models' files went. Safe to run from several processes: each row is taken by one.
    Files that cannot be removed now (storage unreachable) stay pending for the next sweep."""
    removed = 0
    while True:
        failed = False
        async with uow:
            pending = await uow.models.deletions_with_files(model_id=model_id)
            for deleted_id, files in pending:
                try:
                    await asyncio.to_thread(artifacts.remove, files, storage)
                except StorageError as error:
                    log.warning(
                        "files of a deleted model not removed yet",
                        model_id=str(deleted_id),
                        error=str(error),
                    )
                    failed = True
                    continue
                await uow.models.files_removed(deleted_id)
                removed += 1
            await uow.commit()
        if model_id is not None or not pending or failed:
            return removed


async def download(
    uow: UnitOfWork, model_id: uuid.UUID, *, kind: str, storage: Storage
) -> AsyncIterator[dict[str, Any] | bytes]:
    """The artifact's record, then its bytes. The bytes are hashed on the way: a file
    that changed since it was recorded ends the stream with an error, not silently."""
    model = await get_model(uow, model_id)
    artifact = model.artifact(kind)
    if artifact is None:
        raise FailedPrecondition(f"trained model {model_id} has no {kind} artifact")
    uri = str(artifact.get("uri", ""))
    try:
        found = await asyncio.to_thread(storage.size, uri)
    except UnsupportedUri:
        found = None
    except StorageError as error:
        raise Unavailable(f"the {kind} file of trained model {model_id}: {error}") from None
    if found is None:
        raise FailedPrecondition(f"the {kind} file of trained model {model_id} is missing")
    size = int(artifact.get("size_bytes", 0))
    if found != size:
        raise FailedPrecondition(
            f"the {kind} file of trained model {model_id} no longer has its recorded size"
        )
    yield artifact
    digest = hashlib.sha256()
    try:
        async for chunk in artifacts.read_chunks(storage, uri, offset_limit=size):
            digest.update(chunk)
            yield chunk
    except StorageError as error:
        raise Unavailable(f"the {kind} file of trained model {model_id}: {error}") from None
    if digest.hexdigest() != str(artifact.get("sha256", "")).lower():
        raise FailedPrecondition(
            f"the {kind} file of trained model {model_id} no longer has its recorded sha256"
        )
