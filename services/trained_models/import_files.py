"""The files of an import: received from an upload or copied from the artifact store
into a staging folder, then kept at models/<model_id>/ in the artifact store, or
discarded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from shared.errors import FieldViolation, InvalidArgument, Unavailable
from shared.storage import ObjectNotFound, Storage, StorageError, UnsupportedUri

log = structlog.get_logger(__name__)

# Upload parts: ("config" | "checkpoint", bytes).
Part = tuple[str, bytes]
FILE_NAMES = {"config": "config.py", "checkpoint": "checkpoint.pth"}


@dataclass(slots=True)
class Staged:
    """An uploaded file as it is received."""

    path: Path
    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)


async def receive(parts: AsyncIterator[Part], folder: Path, max_bytes: int) -> dict[str, Staged]:
    """The uploaded files by kind, written into `folder`; at most `max_bytes` in all."""
    staged: dict[str, Staged] = {}
    files: dict[str, Any] = {}
    total = 0
    try:
        async for kind, chunk in parts:
            if kind not in staged:
                staged[kind] = Staged(folder / FILE_NAMES[kind])
                # Opened in this task: a file opened by a thread after a cancelled call's
                # staging folder was removed would bring the folder back.
                files[kind] = staged[kind].path.open("wb")
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


def copy_in(uri: str, kind: str, folder: Path, storage: Storage) -> tuple[Path, int, str]:
    """A copy in `folder` of the artifact store's file at `uri`: (path, size, sha256)."""
    field_name = f"metadata.{kind}_uri"
    if not storage.owns(uri):
        raise InvalidArgument([FieldViolation(field_name, "not a file in the artifact store")])
    # The model owns a copy: deleting it later must not delete the caller's file.
    target = folder / FILE_NAMES[kind]
    try:
        stored = storage.get_file(uri, target)
    except ObjectNotFound:
        raise InvalidArgument([FieldViolation(field_name, f"{uri} does not exist")]) from None
    except UnsupportedUri:
        raise InvalidArgument(
            [FieldViolation(field_name, "not a file in the artifact store")]
        ) from None
    except StorageError as error:
        raise Unavailable(f"the {kind} at {uri} cannot be read: {error}") from None
    return target, stored.size_bytes, stored.sha256


async def keep(
    files: dict[str, tuple[Path, int, str]], model_id: uuid.UUID, storage: Storage
) -> list[dict[str, str]]:
    """Puts the verified files at models/<model_id>/ in the artifact store (a rename under
    the artifact root, an upload to an object store); their records. Whatever it stored is
    removed if it fails."""
    records = []
    try:
        for kind, (path, size, digest) in files.items():
            key = f"models/{model_id}/{path.name}"
            if storage.remote:
                stored = await asyncio.to_thread(storage.put_artifact, path, key)
                if stored.sha256 != digest:
                    raise StorageError(
                        f"{stored.uri} was stored with sha256 {stored.sha256}, "
                        f"{digest} was verified"
                    )
                uri = stored.uri
            else:
                final = storage.artifact_root / key
                await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
                await asyncio.to_thread(os.replace, path, final)
                uri = final.as_uri()
            records.append({"kind": kind, "uri": uri, "size_bytes": str(size), "sha256": digest})
    except BaseException as error:
        await discard(storage, model_id)
        if isinstance(error, StorageError):
            raise Unavailable(f"the model's files cannot be stored: {error}") from None
        raise
    return records


async def discard(storage: Storage, model_id: uuid.UUID) -> None:
    """Removes models/<model_id>/ from the artifact store. A failure is logged, not raised
    in place of the error that led here."""
    uri = storage.artifact_uri(f"models/{model_id}/")
    try:
        await asyncio.to_thread(storage.delete_prefix, uri)
    except StorageError as error:
        log.warning("files of a failed import were not removed", uri=uri, error=str(error))
