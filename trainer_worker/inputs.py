"""A job's inputs, each checked before training uses it: the dataset, prepared and split;
the base model's checkpoint; and the checkpoints of an earlier attempt to resume from.

A checkpoint is used only if its bytes are the ones the system recorded: the training
child unpickles it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog

from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.storage import StorageError, sha256_file
from trainer_worker import remote
from trainer_worker.config import BaseCheckpoint
from trainer_worker.dataset import PreparedDataset, prepare_dataset, resolve_location
from trainer_worker.job import JobFailed, ResumePoint, WorkerEnvironment
from trainer_worker.plan import TrainingPlan
from trainer_worker.training import place_checkpoint

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Checkpoints:
    """The verified checkpoints a run starts from."""

    base: BaseCheckpoint | None = None
    resume_from: Path | None = None
    # Epochs of an earlier attempt whose checkpoints are in the new work dir.
    placed: frozenset[int] = field(default_factory=frozenset)


def prepare(
    spec: training_run_pb2.TrainingSpec,
    plan: TrainingPlan,
    out_dir: Path,
    environment: WorkerEnvironment,
) -> PreparedDataset:
    """The spec's dataset, downloaded first when it lives in object storage, validated and
    split by the plan's seed and fractions."""
    root = environment.artifact_root
    if remote.is_remote(spec.dataset_uri) or remote.is_remote(spec.image_root):
        fetched = remote.fetch_dataset(
            dataset_uri=spec.dataset_uri,
            image_root=spec.image_root,
            folder=out_dir / "source",
            storage=environment.store(),
            artifact_root=root,
        )
        annotation_path, image_root = fetched.annotation_path, fetched.image_root
    else:
        annotation_path = resolve_location(spec.dataset_uri, artifact_root=root)
        image_root = (
            resolve_location(spec.image_root, artifact_root=root) if spec.image_root else None
        )
    return prepare_dataset(
        annotation_path=annotation_path,
        image_root=image_root,
        out_dir=out_dir,
        val_fraction=plan.val_fraction,
        test_fraction=plan.test_fraction,
        seed=plan.seed,
    )


async def verified_checkpoints(
    job: worker_pb2.TrainingJob,
    resume: ResumePoint | None,
    *,
    work_dir: Path,
    inputs: Path,
    environment: WorkerEnvironment,
) -> Checkpoints:
    """The base model's checkpoint (a fine-tune), and the earlier attempt's checkpoints
    placed in `work_dir` (a resumed run); downloads go into `inputs`."""
    base = await verified_base(job, environment, inputs) if job.HasField("base_model") else None
    if resume is None:
        return Checkpoints(base=base)
    resume_from = await verified_file(
        resume.checkpoint,
        what="the checkpoint to resume from",
        environment=environment,
        inputs=inputs,
    )
    placed = await place_earlier_checkpoints(
        resume, resume_from, work_dir, environment=environment, inputs=inputs
    )
    return Checkpoints(base=base, resume_from=resume_from, placed=frozenset(placed))


async def verified_base(
    job: worker_pb2.TrainingJob, environment: WorkerEnvironment, inputs: Path
) -> BaseCheckpoint:
    base = job.base_model
    path = await verified_file(
        base.checkpoint, what=f"base model {base.name}", environment=environment, inputs=inputs
    )
    return BaseCheckpoint(path=path, architecture=base.architecture, classes=tuple(base.classes))


async def place_earlier_checkpoints(
    resume: ResumePoint,
    resume_from: Path,
    work_dir: Path,
    *,
    environment: WorkerEnvironment,
    inputs: Path,
) -> set[int]:
    """Puts the checkpoints of the epoch resumed from and of the best epoch so far into the
    new work dir, where training chooses the model's checkpoint. The epochs placed; a best
    checkpoint that cannot be verified is left out (the relay then says so)."""
    await asyncio.to_thread(place_checkpoint, resume_from, work_dir, epoch=resume.epoch)
    placed = {resume.epoch}
    if resume.best_checkpoint is None or resume.best_epoch in placed:
        return placed
    try:
        best = await verified_file(
            resume.best_checkpoint,
            what=f"the checkpoint of the best epoch {resume.best_epoch}",
            environment=environment,
            inputs=inputs,
        )
    except JobFailed as failure:
        log.warning("best checkpoint unavailable", reason=failure.reason, error=failure.message)
        return placed
    await asyncio.to_thread(place_checkpoint, best, work_dir, epoch=resume.best_epoch)
    return {*placed, resume.best_epoch}


async def verified_file(
    artifact: common_pb2.Artifact, *, what: str, environment: WorkerEnvironment, inputs: Path
) -> Path:
    """The artifact's local path (an object in storage is downloaded into `inputs`), only
    if its bytes are the ones the system recorded."""
    uri = artifact.uri
    parsed = urlparse(uri)
    if remote.is_remote(uri):
        try:
            return await asyncio.to_thread(
                remote.fetch_verified,
                environment.store(),
                uri,
                sha256=artifact.sha256,
                folder=inputs,
            )
        except remote.CorruptObject as error:
            raise JobFailed("checkpoint_corrupt", f"{what}: {error}") from None
        except StorageError as error:
            raise JobFailed("checkpoint_unavailable", f"{what}: {error}") from None
    if parsed.scheme != "file":
        raise JobFailed(
            "checkpoint_unavailable",
            f"{what}: this worker reads checkpoints from file:// and s3:// URIs, got {uri!r}",
        )
    path = Path(unquote(parsed.path))
    digest = await asyncio.to_thread(_digest_if_present, path)
    if digest is None:
        # The message goes to the run's caller: no path of this machine, only what the
        # record says.
        raise JobFailed(
            "checkpoint_unavailable",
            f"{what}: no file where its record says it is; restore it or train it again",
        )
    if not artifact.sha256 or digest != artifact.sha256.lower():
        raise JobFailed(
            "checkpoint_corrupt",
            f"{what}: the stored file has sha256 {digest}, the system recorded "
            f"{artifact.sha256 or 'none'}; restore it or train it again",
        )
    return path


def _digest_if_present(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None
