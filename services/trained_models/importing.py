"""Import of a root model: upload (or pick from the store), verify, then register.

Files are staged under `<artifact_root>/uploads/<id>/`, checked by a child process
(torch and mmdet never load in the service), moved to `<artifact_root>/models/<model_id>/`
and registered in one transaction. Whatever fails on the way removes what it wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError

from services.trained_models import artifacts
from services.trained_models.domain import Origin, TrainedModel
from services.trained_models.handlers import Clock, utcnow, validate_edit
from services.trained_models.messages import created_message
from services.trained_models.unit_of_work import UnitOfWork
from shared.errors import FieldViolation, InvalidArgument, Violations
from shared.storage import sha256_file

log = structlog.get_logger(__name__)

# Upload parts: ("config" | "checkpoint", bytes).
Part = tuple[str, bytes]
FILE_NAMES = {"config": "config.py", "checkpoint": "checkpoint.pth"}


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
    artifact_root: Path
    verify_timeout_s: float
    max_bytes: int


@dataclass(slots=True)
class _Staged:
    path: Path
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)


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


async def _receive(parts: AsyncIterator[Part], folder: Path, max_bytes: int) -> dict[str, _Staged]:
    staged: dict[str, _Staged] = {}
    files: dict[str, Any] = {}
    total = 0
    try:
        async for kind, chunk in parts:
            if kind not in staged:
                staged[kind] = _Staged(folder / FILE_NAMES[kind])
                files[kind] = await asyncio.to_thread(staged[kind].path.open, "wb")
            total += len(chunk)
            if total > max_bytes:
                raise InvalidArgument(
                    [FieldViolation(f"{kind}_chunk", f"the upload exceeds {max_bytes} bytes")]
                )
            staged[kind].size += len(chunk)
            staged[kind].digest.update(chunk)
            await asyncio.to_thread(files[kind].write, chunk)
    finally:
        for file in files.values():
            await asyncio.to_thread(file.close)
    return staged


def _copy_in(uri: str, kind: str, folder: Path, root: Path) -> Path:
    field_name = f"metadata.{kind}_uri"
    source = artifacts.resolve(uri, root)
    if source is None:
        raise InvalidArgument([FieldViolation(field_name, "not a file in the artifact store")])
    if not source.is_file():
        raise InvalidArgument([FieldViolation(field_name, f"{uri} does not exist")])
    # The model owns a copy: deleting it later must not delete the caller's file.
    target = folder / FILE_NAMES[kind]
    shutil.copyfile(source, target)
    return target


async def _stage(
    command: ImportCommand, parts: AsyncIterator[Part], folder: Path, policy: ImportPolicy
) -> dict[str, tuple[Path, int, str]]:
    """The staged files by kind: (path, size, sha256)."""
    staged = await _receive(parts, folder, policy.max_bytes)
    if command.config_uri:
        if staged:
            raise InvalidArgument(
                [FieldViolation("metadata.config_uri", "give URIs or upload files, not both")]
            )
        result = {}
        for kind, uri in (("config", command.config_uri), ("checkpoint", command.checkpoint_uri)):
            path = await asyncio.to_thread(_copy_in, uri, kind, folder, policy.artifact_root)
            digest = await asyncio.to_thread(sha256_file, path)
            result[kind] = (path, path.stat().st_size, digest)
        return result
    violations = Violations()
    for kind in FILE_NAMES:
        violations.check(
            kind in staged and staged[kind].size > 0, f"{kind}_chunk", f"no {kind} was uploaded"
        )
    violations.raise_if_any()
    return {k: (s.path, s.size, s.digest.hexdigest()) for k, s in staged.items()}


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

    root = policy.artifact_root
    staging = root / "uploads" / uuid.uuid4().hex
    await asyncio.to_thread(staging.mkdir, parents=True, exist_ok=True)
    model_id = uuid.uuid4()
    target = root / "models" / str(model_id)
    try:
        files = await _stage(command, parts, staging, policy)
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

        await asyncio.to_thread(target.mkdir, parents=True)
        records = []
        for kind, (path, size, digest) in files.items():
            final = target / path.name
            await asyncio.to_thread(os.replace, path, final)
            records.append(
                {"kind": kind, "uri": final.as_uri(), "size_bytes": str(size), "sha256": digest}
            )
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
        try:
            async with uow_factory() as uow:
                await uow.models.add(model)
                uow.publish(created_message(model, uow.subjects))
                await uow.commit()
        except IntegrityError:
            # The same request_id raced this one and won: answer with its model.
            await asyncio.to_thread(artifacts.remove_tree, target)
            if request_id is None:
                raise
            async with uow_factory() as uow:
                existing = await uow.models.get_by_request(command.creator, request_id)
            if existing is None:
                raise
            return existing
    except BaseException:
        await asyncio.to_thread(artifacts.remove_tree, target)
        raise
    finally:
        await asyncio.to_thread(artifacts.remove_tree, staging)
    log.info("trained model imported", model_id=str(model_id), creator=command.creator)
    return model
