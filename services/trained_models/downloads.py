"""DownloadArtifact: any artifact of a model, a training run or a model evaluation.

The stored file is hashed before its first byte is sent: a caller never receives a
file that no longer is what was recorded, only to learn so at the end. It is hashed
again on the way, so a file that changes during the download ends the stream with an
error rather than silently. Messages name the artifact and its parent, never where
the file lives.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from services.trained_models import artifacts as files
from services.trained_models.artifact_choice import (
    Parent,
    ParentKind,
    artifact_name,
    choose,
    validate_wanted,
)
from services.trained_models.evaluation_reads import EvaluationReads
from services.trained_models.unit_of_work import UnitOfWork
from shared.errors import FailedPrecondition, NotFound, Unavailable
from shared.limits import quote
from shared.storage import ObjectNotFound, Storage, StorageError, UnsupportedUri, sha256_of


async def artifacts_of(uow: UnitOfWork, parent: Parent) -> list[dict[str, Any]]:
    """The parent's recorded artifacts; NOT_FOUND when the parent does not exist."""
    async with uow.reading():
        if parent.kind is ParentKind.MODEL:
            return list((await uow.models.require(parent.id)).artifacts)
        reads = EvaluationReads(uow.session)
        if parent.kind is ParentKind.RUN:
            run = await reads.run(parent.id)
            if run is None:
                raise NotFound(f"training run {parent.id} does not exist")
            return run[1]
        assert parent.model_id is not None
        found = await reads.artifacts_of_evaluation(parent.model_id, parent.id)
        if found is None:
            raise NotFound(f"model evaluation {parent.name} does not exist")
        return found


async def run_creator(uow: UnitOfWork, run_id: uuid.UUID) -> str | None:
    async with uow.reading():
        run = await EvaluationReads(uow.session).run(run_id)
    return run[0] if run else None


async def verified(artifact: Mapping[str, Any], storage: Storage, what: str) -> None:
    """FAILED_PRECONDITION unless the stored file has the recorded size and sha256;
    UNAVAILABLE when storage cannot be read now."""
    uri = str(artifact.get("uri", ""))
    try:
        store = storage.store_for(uri)
        size = await asyncio.to_thread(store.size, uri)
        if size is None:
            raise FailedPrecondition(f"{what} is missing from the artifact store")
        if size != int(artifact.get("size_bytes", -1)):
            raise FailedPrecondition(f"{what} no longer has its recorded size")
        stored = await asyncio.to_thread(sha256_of, store, uri)
    except UnsupportedUri:
        raise FailedPrecondition(f"{what} is not in the artifact store") from None
    except ObjectNotFound:
        raise FailedPrecondition(f"{what} is missing from the artifact store") from None
    except StorageError:
        raise Unavailable(_unreadable(what)) from None
    if stored.sha256 != str(artifact.get("sha256", "")).lower():
        raise FailedPrecondition(f"{what} no longer has its recorded sha256")


def _unreadable(what: str) -> str:
    # Storage errors name the object's location, which callers are not told.
    return f"{what} cannot be read from the artifact store now; retry"


async def download(
    uow: UnitOfWork, parent: Parent, wanted: str, *, storage: Storage
) -> AsyncIterator[dict[str, Any] | bytes]:
    """The artifact's record, then its bytes, once the stored file was verified."""
    validate_wanted(wanted)
    artifact = choose(await artifacts_of(uow, parent), wanted, parent.name)
    what = f"the artifact {quote(artifact_name(artifact))} of {parent.name}"
    await verified(artifact, storage, what)
    yield artifact
    size = int(artifact.get("size_bytes", 0))
    digest = hashlib.sha256()
    try:
        async for chunk in files.read_chunks(storage, str(artifact["uri"]), offset_limit=size):
            digest.update(chunk)
            yield chunk
    except ObjectNotFound:
        raise FailedPrecondition(f"{what} was removed while it was sent") from None
    except StorageError:
        raise Unavailable(_unreadable(what)) from None
    if digest.hexdigest() != str(artifact.get("sha256", "")).lower():
        raise FailedPrecondition(f"{what} changed while it was sent")
