"""CreateTrainingRun: the request checked (names, labels, base model, dataset, spec),
the run created once per request_id, its first job queued."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog

from services.training_runs.domain import TrainingRun
from services.training_runs.handlers.common import Clock, parse_request_id, utcnow
from services.training_runs.messages import job_message
from services.training_runs.repository import BaseModel
from services.training_runs.spec import SpecRequest, validate_spec
from services.training_runs.unit_of_work import UnitOfWork
from shared import catalog
from shared.datasets import DatasetUriError, resolve_dataset_uri
from shared.errors import AlreadyExists, DomainError, NotFound, Unavailable, Violations
from shared.limits import label_problems, quote
from shared.names import TRAINED_MODELS, parse_name
from shared.storage import Storage, StorageError

log = structlog.get_logger(__name__)


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


async def create_run(
    uow: UnitOfWork, command: CreateRun, *, storage: Storage, clock: Clock = utcnow
) -> TrainingRun:
    violations = Violations()
    parsed_request_id = parse_request_id(command.request_id, violations)
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
    await check_dataset_exists(command.spec.dataset_uri, storage, violations)
    async with uow:
        try:
            run = await _checked_run(
                uow,
                command,
                name=name,
                base_model_id=base_model_id,
                request_id=parsed_request_id,
                violations=violations,
                storage=storage,
                clock=clock,
            )
            await uow.commit()
        except DomainError:
            # A repeated request answers with the run the first one created, whatever its
            # checks say now; the unique request_id refuses the repeat's insert (also when
            # the first one raced it and committed first). No lookup before: most requests
            # are new ones.
            if parsed_request_id is None:
                raise
            existing = await _repeated(uow, command, parsed_request_id)
            if existing is None:
                raise
            return existing
    log.info("training run created", run_id=str(run.id), architecture=run.architecture)
    return run


async def _checked_run(
    uow: UnitOfWork,
    command: CreateRun,
    *,
    name: str,
    base_model_id: uuid.UUID | None,
    request_id: uuid.UUID | None,
    violations: Violations,
    storage: Storage,
    clock: Clock,
) -> TrainingRun:
    """The new run of `command`, added to the unit of work with its first job, once the
    base model and the spec pass their checks."""
    base: BaseModel | None = None
    if base_model_id is not None:
        base = await uow.runs.base_model(base_model_id, lock=True)
        if base is None:
            raise NotFound(f"base model {command.base_model} does not exist")
        if command.base_model_owner not in (None, base.creator):
            # Another's model, for a caller that may read only its own: as if missing.
            raise NotFound(f"base model {command.base_model} does not exist")
        missing = await asyncio.to_thread(missing_artifacts, base, storage)
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


def missing_artifacts(base: BaseModel, storage: Storage) -> list[str]:
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


async def check_dataset_exists(
    uri: str,
    storage: Storage,
    violations: Violations,
    *,
    field: str = "training_run.spec.dataset_uri",
) -> None:
    """A violation of `field` when no annotation file is at `uri`."""
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
