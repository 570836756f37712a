"""One job attempt from start to its terminal event: what the worker does, not how it is fed.

preparing -> dataset_prepared -> (notices) -> running -> progress/evaluation ->
succeeded | failed | cancelled. A shutdown of the worker stops the training
without a terminal event, so the job is redelivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import unquote, urlparse

import structlog

from shared import catalog
from shared.metrics import best_epoch
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.storage import Storage, StorageError, sha256_file
from trainer_worker import events, remote, storage_faults
from trainer_worker.architectures import UnknownArchitecture, mmdet_configs_root
from trainer_worker.config import (
    BaseCheckpoint,
    ConfigError,
    DatasetFiles,
    TrainingPlan,
    generate_config,
)
from trainer_worker.dataset import DatasetError, PreparedDataset, prepare_dataset, resolve_location
from trainer_worker.devices import (
    CUDA_VISIBLE_DEVICES,
    DataLoading,
    GpuPool,
    data_loading,
    per_device_batch,
)
from trainer_worker.events import EventPublisher
from trainer_worker.protocol import (
    CheckpointWritten,
    ChildEvent,
    EpochsRestored,
    Evaluated,
    ProgressReported,
    TrainingStarted,
)
from trainer_worker.training import (
    TrainingCancelled,
    TrainingFailed,
    TrainingSucceeded,
    place_checkpoint,
    run_training,
)

log = structlog.get_logger(__name__)
_LOG_NAME = "train.log"

RUN_PREFIX = "trainingRuns/"
Device = training_run_pb2.TrainingSpec.Device


class InvalidJob(ValueError):
    """A job message no worker can act on (it is terminated, not retried)."""


class JobOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Stopped by a worker shutdown: no terminal event, the job goes back to the queue.
    INTERRUPTED = "interrupted"


class StopReason(StrEnum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class JobControl:
    """How the worker asks a running job to stop, and why."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: StopReason | None = None

    def request(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumePoint:
    """A checkpoint an earlier attempt of the run stored, as the service recorded it."""

    checkpoint: common_pb2.Artifact
    epoch: int
    # The best epoch's checkpoint so far, when it is not `checkpoint`.
    best_checkpoint: common_pb2.Artifact | None = None
    best_epoch: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerEnvironment:
    artifact_root: Path
    # "auto", "cpu" or "cuda": what this worker may use, whatever a spec asks.
    device: str = "auto"
    # Loader processes per dataloader (RAVEN_WORKER_DATALOADER_WORKERS); None: chosen per
    # run from its device (trainer_worker.devices.data_loading).
    dataloader_workers: int | None = None
    # The GPUs its jobs lease; none known (no nvidia-smi): a child uses what torch finds.
    gpus: GpuPool = field(default_factory=GpuPool)
    # Where new checkpoints and models go, and how recorded URIs are read; None: the
    # artifact root (s3:// URIs are still read, with the default AWS configuration).
    storage: Storage | None = None

    def store(self) -> Storage:
        return self.storage or Storage(artifact_root=self.artifact_root)


def run_id_of(job: worker_pb2.TrainingJob) -> str:
    name = job.training_run
    run_id = name.removeprefix(RUN_PREFIX)
    if not name.startswith(RUN_PREFIX) or not run_id or "/" in run_id or "." in run_id:
        raise InvalidJob(f"training_run {name!r} is not trainingRuns/{{id}}")
    if job.attempt < 1:
        raise InvalidJob(f"attempt {job.attempt} of {name} is not positive")
    return run_id


def attempt_dir(artifact_root: Path, run_id: str, attempt: int) -> Path:
    return artifact_root / "runs" / run_id / f"attempt-{attempt}"


def model_dir(artifact_root: Path, run_id: str) -> Path:
    return artifact_root / "models" / run_id


def plan_of(spec: training_run_pb2.TrainingSpec, *, fine_tune: bool = False) -> TrainingPlan:
    """The spec's values, with the catalog defaults where a field is unset (the service
    normally fills them; a job from elsewhere still trains the same way). `fine_tune`:
    the run starts from a base model's weights."""
    try:
        arch = catalog.ARCHITECTURES[spec.architecture]
    except KeyError:
        raise ConfigError(f"unknown architecture {spec.architecture!r}") from None
    recipe = arch.recipe(fine_tune=fine_tune)
    batch_size = spec.batch_size if spec.HasField("batch_size") else catalog.DEFAULT_BATCH_SIZE
    optimizer = (
        training_run_pb2.TrainingSpec.Optimizer.Name(spec.optimizer)
        if spec.optimizer
        else recipe.optimizer
    )
    return TrainingPlan(
        architecture=arch.key,
        epochs=spec.epochs if spec.HasField("epochs") else catalog.DEFAULT_EPOCHS,
        batch_size=batch_size,
        learning_rate=(
            spec.learning_rate
            if spec.HasField("learning_rate")
            else catalog.default_learning_rate(
                arch, optimizer=optimizer, batch_size=batch_size, fine_tune=fine_tune
            )
        ),
        frozen_stages=(
            spec.frozen_stages if spec.HasField("frozen_stages") else recipe.frozen_stages
        ),
        image_size=spec.image_size if spec.HasField("image_size") else catalog.DEFAULT_IMAGE_SIZE,
        seed=spec.seed if spec.HasField("seed") else 0,
        optimizer=optimizer,
        warmup_iterations=(spec.warmup_iterations if spec.HasField("warmup_iterations") else None),
        augment=spec.augment if spec.HasField("augment") else True,
        val_interval=(
            spec.val_interval if spec.HasField("val_interval") else catalog.DEFAULT_VAL_INTERVAL
        ),
        early_stopping_patience=(
            spec.early_stopping_patience
            if spec.HasField("early_stopping_patience")
            else catalog.DEFAULT_EARLY_STOPPING_PATIENCE
        ),
        mixed_precision=spec.mixed_precision if spec.HasField("mixed_precision") else None,
        deterministic=spec.deterministic if spec.HasField("deterministic") else False,
    )


class _Failed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _storage_failure(error: OSError, artifact_root: Path) -> _Failed | None:
    """The run's failure when the worker could not write its files under the artifact
    root (disk full, read-only); None for any other OSError."""
    fault = storage_faults.fault_of(error, within=artifact_root)
    if fault is None:
        return None
    return _Failed(fault[0], storage_faults.message(*fault))


async def execute_job(
    job: worker_pb2.TrainingJob,
    *,
    publisher: EventPublisher,
    environment: WorkerEnvironment,
    control: JobControl,
    resume: ResumePoint | None = None,
) -> JobOutcome:
    """Runs one attempt of a job and publishes its events, the terminal one included
    (except when interrupted by a shutdown). With `resume`, training continues from an
    earlier attempt's checkpoint."""
    run_id = run_id_of(job)
    await publisher.publish(preparing=worker_pb2.WorkerEvent.Preparing())
    folder = attempt_dir(environment.artifact_root, run_id, job.attempt)
    try:
        try:
            outcome = await _train(job, run_id, folder, publisher, environment, control, resume)
        except OSError as error:
            failure = _storage_failure(error, environment.artifact_root)
            if failure is None:
                raise
            raise failure from None
    except (_Failed, DatasetError) as failure:
        log.info("job failed", run=run_id, reason=failure.reason, message=failure.message)
        await publisher.publish(
            critical=True, failed=events.failure(failure.reason, failure.message)
        )
        return JobOutcome.FAILED
    if isinstance(outcome, TrainingSucceeded):
        succeeded = events.succeeded(outcome)
        try:
            await _store_results(succeeded, run_id, job.attempt, environment)
        except (StorageError, OSError) as error:
            fault = storage_faults.fault_of(error, within=environment.artifact_root)
            if fault is not None:
                await publisher.publish(
                    critical=True, failed=events.failure(fault[0], storage_faults.message(*fault))
                )
                return JobOutcome.FAILED
            if not isinstance(error, StorageError):
                raise
            message = f"the trained model could not be stored: {error}"
            log.warning("job failed", run=run_id, reason="artifact_upload_failed", message=message)
            await publisher.publish(
                critical=True, failed=events.failure("artifact_upload_failed", message)
            )
            return JobOutcome.FAILED
        await publisher.publish(critical=True, succeeded=succeeded)
        return JobOutcome.SUCCEEDED
    if isinstance(outcome, TrainingFailed):
        failure = events.failure(outcome.reason, outcome.message)
        log_artifact = await _stored_log(folder / _LOG_NAME, run_id, job.attempt, environment)
        if log_artifact is not None:
            failure.artifacts.append(log_artifact)
        await publisher.publish(critical=True, failed=failure)
        return JobOutcome.FAILED
    if control.reason is StopReason.CANCEL:
        await publisher.publish(critical=True, cancelled=worker_pb2.WorkerEvent.Cancelled())
        return JobOutcome.CANCELLED
    await publisher.publish(
        notice=events.notice("worker_stopping", "the worker stopped; the job is queued again")
    )
    return JobOutcome.INTERRUPTED


async def _train(
    job: worker_pb2.TrainingJob,
    run_id: str,
    folder: Path,
    publisher: EventPublisher,
    environment: WorkerEnvironment,
    control: JobControl,
    resume: ResumePoint | None,
) -> TrainingSucceeded | TrainingFailed | TrainingCancelled:
    spec = job.spec
    try:
        plan = plan_of(spec, fine_tune=job.HasField("base_model"))
    except ConfigError as error:
        raise _Failed("invalid_spec", str(error)) from None
    # Each attempt has its own folder: an earlier one keeps the checkpoint resumed from.
    await asyncio.to_thread(_fresh_dir, folder)

    prepared = await asyncio.to_thread(_prepare, spec, folder / "dataset", environment)
    await publisher.publish(dataset_prepared=events.dataset_summary(prepared))
    if prepared.split_source == "dataset":
        await publisher.publish(
            notice=events.notice(
                "dataset_splits",
                f"the dataset defines its splits ({prepared.train_image_count} train, "
                f"{prepared.val_image_count} val, {prepared.test_image_count} test): "
                "val_fraction and test_fraction do not apply",
            )
        )
    if control.stop.is_set():
        return TrainingCancelled()

    inputs = folder / "inputs"
    base = await _verified_base(job, environment, inputs) if job.HasField("base_model") else None
    resume_from = (
        await _verified_file(
            resume.checkpoint,
            what="the checkpoint to resume from",
            environment=environment,
            inputs=inputs,
        )
        if resume is not None
        else None
    )
    placed = (
        await place_earlier_checkpoints(
            resume, resume_from, folder / "work", environment=environment, inputs=inputs
        )
        if resume is not None and resume_from is not None
        else set()
    )
    try:
        configs_root = mmdet_configs_root()
    except RuntimeError as error:
        raise _Failed("worker_misconfigured", str(error)) from None
    wanted, device_notice = gpus_wanted(spec, environment)
    loading = run_data_loading(wanted, environment)
    try:
        generated = generate_config(
            plan=dataclasses.replace(
                plan, num_workers=loading.workers, pin_memory=loading.pin_memory
            ),
            dataset=DatasetFiles(
                train_path=prepared.train_path,
                val_path=prepared.val_path,
                classes=prepared.classes,
                train_image_count=prepared.train_image_count,
                test_path=prepared.test_path,
            ),
            work_dir=folder / "work",
            configs_root=configs_root,
            base=base,
            resume_from=resume_from,
        )
    except (ConfigError, UnknownArchitecture) as error:
        raise _Failed("invalid_spec", str(error)) from None
    config_path = folder / "config.py"
    config_path.write_text(generated.text)
    if resume is not None:
        await publisher.publish(
            notice=events.notice(
                "resumed", f"training resumes after epoch {resume.epoch} of an earlier attempt"
            )
        )
    for item in generated.notices:
        await publisher.publish(notice=events.notice(item.code, item.message))
    if device_notice:
        await publisher.publish(notice=events.notice("device", device_notice))
    if wanted and plan.batch_size % wanted:
        per_gpu = per_device_batch(plan.batch_size, wanted)
        await publisher.publish(
            notice=events.notice(
                "batch_size",
                f"batch size {plan.batch_size} over {wanted} GPUs: {per_gpu} per GPU, "
                f"{per_gpu * wanted} per iteration",
            )
        )
    if wanted and environment.gpus.would_wait(wanted):
        await publisher.publish(
            notice=events.notice("waiting_for_gpus", f"waiting for {wanted} GPUs of this worker")
        )
    leased = await environment.gpus.acquire(wanted or 0, unless=control.stop)
    if leased is None:
        return TrainingCancelled()

    async def relay(event: ChildEvent) -> None:
        if isinstance(event, TrainingStarted):
            await publisher.publish(running=worker_pb2.WorkerEvent.Running(device=event.device))
        elif isinstance(event, ProgressReported):
            await publisher.publish(progress=events.progress(event))
        elif isinstance(event, Evaluated):
            count = prepared.test_image_count if event.split == "test" else prepared.val_image_count
            # Stored before the epoch's checkpoint is reported: an attempt resuming from that
            # checkpoint does not validate the epoch again.
            await publisher.publish(
                critical=True, evaluation=events.evaluation(event, image_count=count)
            )
        elif isinstance(event, EpochsRestored):
            restored = {int(e["epoch"]): e.get("val") or {} for e in event.epochs}
            best = best_epoch(restored, last_epoch=0)
            if best is not None and best not in placed:
                await publisher.publish(
                    notice=events.notice(
                        "best_checkpoint_unavailable",
                        f"epoch {best} of an earlier attempt has the best mAP so far, but its "
                        "checkpoint is not available: the model's checkpoint is chosen among "
                        f"epochs {', '.join(map(str, sorted(placed)))} and this attempt's",
                    )
                )
        elif isinstance(event, CheckpointWritten):
            checkpoint = await _stored_checkpoint(
                Path(event.path), f"runs/{run_id}/attempt-{job.attempt}/", environment
            )
            if checkpoint is None:
                await publisher.publish(
                    notice=events.notice(
                        "checkpoint_not_stored",
                        f"the checkpoint of epoch {event.epoch} could not be stored: "
                        "a resumed attempt starts from an earlier one",
                    )
                )
                return
            await publisher.publish(
                checkpoint_saved=worker_pb2.WorkerEvent.CheckpointSaved(
                    epoch=event.epoch, iteration=event.iter, checkpoint=checkpoint
                )
            )

    try:
        outcome = await run_training(
            config_path=config_path,
            work_dir=folder / "work",
            artifact_dir=model_dir(environment.artifact_root, run_id),
            split_path=prepared.split_path,
            log_path=folder / _LOG_NAME,
            on_event=relay,
            stop=control.stop,
            env=device_env(leased, cpu=wanted is None),
            processes=max(1, len(leased)),
        )
    finally:
        environment.gpus.release(leased)
    if isinstance(outcome, TrainingSucceeded):
        # The best epoch's evaluation, like every validation, covered the val split.
        outcome = dataclasses.replace(
            outcome, val_image_count=prepared.val_image_count, data_loading=loading
        )
    return outcome


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
        best = await _verified_file(
            resume.best_checkpoint,
            what=f"the checkpoint of the best epoch {resume.best_epoch}",
            environment=environment,
            inputs=inputs,
        )
    except _Failed as failure:
        log.warning("best checkpoint unavailable", reason=failure.reason, error=failure.message)
        return placed
    await asyncio.to_thread(place_checkpoint, best, work_dir, epoch=resume.best_epoch)
    return {*placed, resume.best_epoch}


def _prepare(
    spec: training_run_pb2.TrainingSpec, out_dir: Path, environment: WorkerEnvironment
) -> PreparedDataset:
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
    val_fraction = (
        spec.val_fraction if spec.HasField("val_fraction") else catalog.DEFAULT_VAL_FRACTION
    )
    return prepare_dataset(
        annotation_path=annotation_path,
        image_root=image_root,
        out_dir=out_dir,
        val_fraction=val_fraction,
        test_fraction=spec.test_fraction if spec.HasField("test_fraction") else 0.0,
        seed=spec.seed if spec.HasField("seed") else 0,
    )


async def _verified_base(
    job: worker_pb2.TrainingJob, environment: WorkerEnvironment, inputs: Path
) -> BaseCheckpoint:
    base = job.base_model
    path = await _verified_file(
        base.checkpoint, what=f"base model {base.name}", environment=environment, inputs=inputs
    )
    return BaseCheckpoint(path=path, architecture=base.architecture, classes=tuple(base.classes))


async def _verified_file(
    artifact: common_pb2.Artifact, *, what: str, environment: WorkerEnvironment, inputs: Path
) -> Path:
    """The artifact's local path (an object in storage is downloaded into `inputs`), only
    if its bytes are the ones the system recorded: the child unpickles checkpoints."""
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
            raise _Failed("checkpoint_corrupt", f"{what}: {error}") from None
        except StorageError as error:
            raise _Failed("checkpoint_unavailable", f"{what}: {error}") from None
    if parsed.scheme != "file":
        raise _Failed(
            "checkpoint_unavailable",
            f"{what}: this worker reads checkpoints from file:// and s3:// URIs, got {uri!r}",
        )
    path = Path(unquote(parsed.path))
    digest = await asyncio.to_thread(_digest_if_present, path)
    if digest is None:
        raise _Failed("checkpoint_unavailable", f"{what}: {path} does not exist")
    if not artifact.sha256 or digest != artifact.sha256.lower():
        raise _Failed(
            "checkpoint_corrupt",
            f"{what}: {path} has sha256 {digest}, the system recorded {artifact.sha256 or 'none'}",
        )
    return path


def gpus_wanted(
    spec: training_run_pb2.TrainingSpec, environment: WorkerEnvironment
) -> tuple[int | None, str]:
    """How many of the worker's GPUs the run trains on (None: on CPU; 0: on whatever device
    the child finds), and a notice when the spec is not met.

    A run asking for more GPUs than the worker has trains on all it has, with the same
    total batch: a smaller worker is slower, not a failure.
    """
    if environment.device == "cpu" or spec.device == Device.CPU:
        return None, "this worker trains on CPU only" if spec.device == Device.GPU else ""
    asked = spec.gpu_count if spec.HasField("gpu_count") and spec.gpu_count > 1 else 1
    have = len(environment.gpus.devices)
    if have == 0:
        return 0, f"{asked} GPUs requested: this worker trains on one device" if asked > 1 else ""
    if asked > have:
        return have, f"{asked} GPUs requested, this worker has {have}: it trains on {have}"
    return asked, ""


def run_data_loading(wanted: int | None, environment: WorkerEnvironment) -> DataLoading:
    """The data loading of a run on `wanted` GPUs (gpus_wanted: None or 0, no GPU known)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return data_loading(
        environment.dataloader_workers,
        run_gpus=wanted or 0,
        worker_gpus=len(environment.gpus.devices),
        cpu_count=cpus,
    )


def device_env(leased: tuple[str, ...], *, cpu: bool) -> dict[str, str]:
    """Environment that pins the child to its leased GPUs, or to the CPU."""
    if cpu:
        return {CUDA_VISIBLE_DEVICES: ""}
    return {CUDA_VISIBLE_DEVICES: ",".join(leased)} if leased else {}


def _fresh_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def _digest_if_present(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


async def _stored_log(
    path: Path, run_id: str, attempt: int, environment: WorkerEnvironment
) -> common_pb2.Artifact | None:
    """The attempt's training log as the failed run's `log` artifact, uploaded where
    artifacts go; None when there is no log or it cannot be stored (the failure still is)."""
    try:
        storage = environment.store()
        if storage.remote:
            stored = await asyncio.to_thread(
                storage.put_artifact, path, f"runs/{run_id}/attempt-{attempt}/{_LOG_NAME}"
            )
            return common_pb2.Artifact(
                kind="log", uri=stored.uri, size_bytes=stored.size_bytes, sha256=stored.sha256
            )
        size, digest = await asyncio.to_thread(_size_and_digest, path)
    except (OSError, StorageError) as error:
        log.warning("the training log was not stored", run=run_id, error=str(error))
        return None
    return common_pb2.Artifact(kind="log", uri=path.as_uri(), size_bytes=size, sha256=digest)


def _size_and_digest(path: Path) -> tuple[int, str]:
    return path.stat().st_size, sha256_file(path)


async def _stored_checkpoint(
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


async def _store_results(
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
            storage.delete_prefix, storage.artifact_uri(f"runs/{run_id}/attempt-{attempt}/")
        )
    except StorageError as error:
        log.warning("stale checkpoints not deleted", run=run_id, error=str(error))
