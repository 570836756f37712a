"""Import of a root model: upload (or pick from the store), verify, then register.

Files are uploaded, or copied from the artifact store (the artifact root or the object
store, s3:// included), into `<artifact_root>/uploads/<id>/` and checked there by a child
process (torch and mmdet never load in the service). They then go where new artifacts go
(`Storage`): moved to `<artifact_root>/models/<model_id>/`, or uploaded to
`<artifact store>/models/<model_id>/` so that a worker on another machine can fine-tune
from the model. The model is registered in one transaction. Whatever fails on the way
removes what it wrote, uploaded objects included.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from services.trained_models import artifacts, import_files
from services.trained_models.domain import Origin, TrainedModel
from services.trained_models.handlers import Clock, utcnow, validate_edit
from services.trained_models.import_files import FILE_NAMES
from services.trained_models.import_files import Part as Part
from services.trained_models.unit_of_work import UnitOfWork
from shared import model_config
from shared.errors import AlreadyExists, FieldViolation, InvalidArgument, Violations
from shared.storage import Storage

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportCommand:
    display_name: str
    architecture: str
    classes: list[str]
    creator: str
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    config_uri: str = ""
    checkpoint_uri: str = ""
    request_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportPolicy:
    # Where the model's files go; uploads are staged under its artifact root.
    storage: Storage
    verify_timeout_s: float
    max_bytes: int


def _validate(command: ImportCommand) -> uuid.UUID | None:
    violations = Violations()
    validate_edit(
        violations,
        "metadata.",
        display_name=command.display_name,
        description=command.description,
        labels=command.labels,
    )
    violations.check(bool(command.architecture.strip()), "metadata.architecture", "required")
    violations.check(bool(command.classes), "metadata.classes", "name at least one class")
    violations.check(
        all(c.strip() for c in command.classes), "metadata.classes", "names must not be empty"
    )
    violations.check(
        len(set(command.classes)) == len(command.classes),
        "metadata.classes",
        "names must be unique",
    )
    violations.check(
        bool(command.config_uri) == bool(command.checkpoint_uri),
        "metadata.config_uri" if not command.config_uri else "metadata.checkpoint_uri",
        "give both URIs, or upload both files",
    )
    request_id = None
    if command.request_id:
        try:
            request_id = uuid.UUID(command.request_id)
        except ValueError:
            violations.add("metadata.request_id", "must be a UUID")
    violations.raise_if_any()
    return request_id


async def _stage(
    command: ImportCommand, parts: AsyncIterator[Part], folder: Path, policy: ImportPolicy
) -> dict[str, tuple[Path, int, str]]:
    """The staged files by kind: (path, size, sha256)."""
    staged = await import_files.receive(parts, folder, policy.max_bytes)
    if command.config_uri:
        if staged:
            raise InvalidArgument(
                [FieldViolation("metadata.config_uri", "give URIs or upload files, not both")]
            )
        uris = {"config": command.config_uri, "checkpoint": command.checkpoint_uri}
        return {
            kind: await asyncio.to_thread(import_files.copy_in, uri, kind, folder, policy.storage)
            for kind, uri in uris.items()
        }
    violations = Violations()
    for kind in FILE_NAMES:
        violations.check(
            kind in staged and staged[kind].size > 0, f"{kind}_chunk", f"no {kind} was uploaded"
        )
    violations.raise_if_any()
    return {k: (s.path, s.size, s.digest.hexdigest()) for k, s in staged.items()}


def _check_config(path: Path, field_name: str) -> None:
    """INVALID_ARGUMENT naming what makes the config unreadable as data (docs/imports.md)."""
    try:
        with path.open("rb") as file:
            source = file.read(model_config.MAX_CONFIG_BYTES + 1)
        model_config.read_config(source, configs_root=model_config.mmdet_configs_root())
    except model_config.ConfigRefused as error:
        raise InvalidArgument([FieldViolation(field_name, f"config: {error}")]) from None


async def _drain(parts: AsyncIterator[Part]) -> None:
    async for _ in parts:
        pass


async def import_model(
    uow_factory: Callable[[], UnitOfWork],
    command: ImportCommand,
    parts: AsyncIterator[Part],
    policy: ImportPolicy,
    *,
    clock: Clock = utcnow,
) -> TrainedModel:
    """Registers a verified root model; a repeated request_id returns the model it created."""
    request_id = _validate(command)
    if request_id is not None:
        async with uow_factory() as uow:
            existing = await uow.models.get_by_request(command.creator, request_id)
        if existing is not None:
            await _drain(parts)
            return existing

    storage = policy.storage
    staging = storage.artifact_root / "uploads" / uuid.uuid4().hex
    model_id = uuid.uuid4()
    try:
        # Made and removed in this task, not in a thread that could outlive a cancelled
        # call (a client stream broken by an oversized message cancels the call at once).
        staging.mkdir(parents=True, exist_ok=True)
        files = await _stage(command, parts, staging, policy)
        # Read as data before anything loads it: an uploaded config is never executed.
        await asyncio.to_thread(
            _check_config,
            files["config"][0],
            "metadata.config_uri" if command.config_uri else "config_chunk",
        )
        verdict = await artifacts.verify_model_files(
            files["config"][0], files["checkpoint"][0], timeout_s=policy.verify_timeout_s
        )
        violations = Violations()
        for kind, problem in sorted(verdict.errors.items()):
            where = f"metadata.{kind}_uri" if command.config_uri else f"{kind}_chunk"
            violations.add(where, f"the {kind} {problem}")
        if not verdict.errors and verdict.num_classes not in (None, len(command.classes)):
            violations.add(
                "metadata.classes",
                f"the config's model detects {verdict.num_classes} classes, "
                f"{len(command.classes)} are named",
            )
        violations.raise_if_any()

        records = await import_files.keep(files, model_id, storage)
        try:
            now = clock()
            model = TrainedModel(
                id=model_id,
                display_name=command.display_name,
                description=command.description,
                labels=dict(command.labels),
                architecture=command.architecture,
                classes=list(command.classes),
                artifacts=records,
                facts={"parameter_count": str(verdict.parameter_count)},
                creator=command.creator,
                origin=Origin.IMPORT,
                request_id=request_id,
                create_time=now,
                update_time=now,
            )
            async with uow_factory() as uow:
                uow.models.add(model)
                await uow.commit()
        except BaseException as error:
            await import_files.discard(storage, model_id)
            if not isinstance(error, AlreadyExists) or request_id is None:
                raise
            # The same request_id raced this one and won: answer with its model.
            async with uow_factory() as uow:
                existing = await uow.models.get_by_request(command.creator, request_id)
            if existing is None:
                raise
            return existing
    finally:
        artifacts.remove_tree(staging)
    log.info("trained model imported", model_id=str(model_id), creator=command.creator)
    return model
