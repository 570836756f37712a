"""Results upload: the files a run produced, recorded where the system keeps artifacts
(the local file, or its copy in object storage)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog

from shared.proto.raven.training.v1 import common_pb2, worker_pb2
from shared.storage import StorageError, sha256_file
from trainer_worker import storage_faults
from trainer_worker.job import WorkerEnvironment, attempt_key_prefix, model_dir

log = structlog.get_logger(__name__)


async def stored_log(
    path: Path, run_id: str, attempt: int, environment: WorkerEnvironment
) -> common_pb2.Artifact | None:
    """The attempt's training log as the failed run's `log` artifact, uploaded where
    artifacts go; None when there is no log or it cannot be stored (the failure still is)."""
    try:
        storage = environment.store()
        if storage.remote:
            stored = await asyncio.to_thread(
                storage.put_artifact, path, attempt_key_prefix(run_id, attempt) + path.name
            )
            return common_pb2.Artifact(
                kind="log", uri=stored.uri, size_bytes=stored.size_bytes, sha256=stored.sha256
            )
        size, digest = await asyncio.to_thread(_size_and_digest, path)
    except (OSError, StorageError) as error:
        log.warning("the training log was not stored", run_id=run_id, error=str(error))
        return None
    return common_pb2.Artifact(kind="log", uri=path.as_uri(), size_bytes=size, sha256=digest)


async def stored_checkpoint(
    path: Path, key_prefix: str, environment: WorkerEnvironment
) -> common_pb2.Artifact | None:
    """The checkpoint as the system records it: the local file, or its copy in object
    storage; None when the upload failed (training goes on without it)."""
    storage = environment.store()
    if not storage.remote:
        size, digest = await asyncio.to_thread(_size_and_digest, path)
        return common_pb2.Artifact(
            kind="checkpoint", uri=path.as_uri(), size_bytes=size, sha256=digest
        )
    try:
        stored = await asyncio.to_thread(storage.put_artifact, path, key_prefix + path.name)
    except StorageError as error:
        log.warning("checkpoint not stored", path=str(path), error=str(error))
        return None
    return common_pb2.Artifact(
        kind="checkpoint", uri=stored.uri, size_bytes=stored.size_bytes, sha256=stored.sha256
    )


async def store_results(
    succeeded: worker_pb2.WorkerEvent.Succeeded,
    run_id: str,
    attempt: int,
    environment: WorkerEnvironment,
) -> None:
    """With object storage for artifacts: uploads the model's files and points the event's
    artifacts at them, then drops the local copies and this attempt's stored checkpoints
    (as a local run drops its stale epoch files)."""
    storage = environment.store()
    if not storage.remote:
        return
    for artifact in succeeded.artifacts:
        path = Path(unquote(urlparse(artifact.uri).path))
        stored = await asyncio.to_thread(storage.put_artifact, path, f"models/{run_id}/{path.name}")
        artifact.uri = stored.uri
        artifact.size_bytes = stored.size_bytes
        artifact.sha256 = stored.sha256
    await asyncio.to_thread(
        shutil.rmtree, model_dir(environment.artifact_root, run_id), ignore_errors=True
    )
    try:
        await asyncio.to_thread(
            storage.delete_prefix, storage.artifact_uri(attempt_key_prefix(run_id, attempt))
        )
    except StorageError as error:
        log.warning("stale checkpoints not deleted", run_id=run_id, error=str(error))


def _size_and_digest(path: Path) -> tuple[int, str]:
    return path.stat().st_size, sha256_file(path)


def upload_failure(error: StorageError | OSError, artifact_root: Path) -> tuple[str, str]:
    """Why the model could not be stored; re-raises an error that is none of the worker's
    storage faults or of its object storage."""
    fault = storage_faults.fault_of(error, within=artifact_root)
    if fault is not None:
        return fault[0], storage_faults.message(*fault)
    if not isinstance(error, StorageError):
        raise error
    return "artifact_upload_failed", f"the trained model could not be stored: {error}"
