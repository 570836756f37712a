"""One job attempt from start to its terminal event: what the worker does, not how it is fed.

The claim moved the run to PREPARING; then dataset_prepared -> (notices) -> running ->
progress/evaluation -> succeeded | failed | cancelled. A shutdown of the worker stops
the training without a terminal event, so the job is redelivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from pathlib import Path

import structlog

from shared.observability import tracing
from shared.proto.raven.training.v1 import worker_pb2
from shared.storage import StorageError
from trainer_worker import events, storage_faults
from trainer_worker.dataset import DatasetError, PreparedDataset
from trainer_worker.evaluation import execute_evaluation
from trainer_worker.inputs import Checkpoints, prepare, verified_checkpoints
from trainer_worker.job import (
    Attempt,
    JobControl,
    JobFailed,
    JobOutcome,
    ResumePoint,
    StopReason,
    WorkerEnvironment,
    model_dir,
    run_id_of,
)
from trainer_worker.placement import Placement, device_env, place
from trainer_worker.plan import ConfigError, TrainingPlan, plan_of
from trainer_worker.publisher import EventPublisher
from trainer_worker.relay import ChildEventRelay
from trainer_worker.run_config import write_config
from trainer_worker.training import (
    TrainingCancelled,
    TrainingFailed,
    TrainingOutcome,
    TrainingSucceeded,
    run_training,
)
from trainer_worker.training_report import with_report
from trainer_worker.upload import store_results, stored_log, upload_failure

__all__ = ["JobControl", "JobOutcome", "ResumePoint", "WorkerEnvironment", "execute_job"]

log = structlog.get_logger(__name__)


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
    attempt = Attempt(
        job=job,
        run_id=run_id_of(job),
        publisher=publisher,
        environment=environment,
        control=control,
        resume=resume,
    )
    if job.HasField("evaluation"):
        return await execute_evaluation(attempt)
    try:
        outcome = await _train_under_root(attempt)
    except (JobFailed, DatasetError) as failure:
        log.info(
            "job failed", run_id=attempt.run_id, reason=failure.reason, message=failure.message
        )
        return await attempt.fail(failure.reason, failure.message)
    if isinstance(outcome, TrainingSucceeded):
        return await _succeed(attempt, outcome)
    if isinstance(outcome, TrainingFailed):
        log_artifact = await stored_log(
            attempt.log_path, attempt.run_id, attempt.number, environment
        )
        return await attempt.fail(
            outcome.reason, outcome.message, *([log_artifact] if log_artifact else [])
        )
    if control.reason is StopReason.CANCEL:
        await publisher.publish(critical=True, cancelled=worker_pb2.WorkerEvent.Cancelled())
        return JobOutcome.CANCELLED
    await attempt.notice("worker_stopping", "the worker stopped; the job is queued again")
    return JobOutcome.INTERRUPTED


async def _train_under_root(attempt: Attempt) -> TrainingOutcome:
    """_train, with a failure to write under the artifact root as the run's failure."""
    try:
        return await _train(attempt)
    except OSError as error:
        fault = storage_faults.fault_of(error, within=attempt.environment.artifact_root)
        if fault is None:
            raise
        raise JobFailed(fault[0], storage_faults.message(*fault)) from None


async def _train(attempt: Attempt) -> TrainingOutcome:
    plan = _plan(attempt.job)
    # Each attempt has its own folder: an earlier one keeps the checkpoint resumed from.
    await asyncio.to_thread(_fresh_dir, attempt.folder)
    prepared = await _prepare_dataset(attempt, plan)
    if attempt.control.stop.is_set():
        return TrainingCancelled()
    checkpoints = await verified_checkpoints(
        attempt.job,
        attempt.resume,
        work_dir=attempt.work_dir,
        inputs=attempt.folder / "inputs",
        environment=attempt.environment,
    )
    placement = place(attempt.job.spec, attempt.environment, batch_size=plan.batch_size)
    config_path = await write_config(attempt, plan, prepared, checkpoints, placement)
    leased = await _lease_gpus(attempt, placement)
    if leased is None:
        return TrainingCancelled()
    if attempt.environment.metrics is not None:
        attempt.environment.metrics.leased(attempt.run_id, leased)
    try:
        outcome = await _run(attempt, config_path, prepared, checkpoints, placement, leased)
    finally:
        attempt.environment.gpus.release(leased)
        if attempt.environment.metrics is not None:
            attempt.environment.metrics.released(attempt.run_id)
    if isinstance(outcome, TrainingSucceeded):
        # The best epoch's evaluation, like every validation, covered the val split.
        outcome = dataclasses.replace(
            outcome, val_image_count=prepared.val_image_count, data_loading=placement.loading
        )
        outcome = await with_report(
            outcome,
            prepared=prepared,
            title=f"Training report: {attempt.job.training_run}",
            architecture=plan.architecture,
            work_dir=attempt.work_dir,
            artifact_dir=model_dir(attempt.environment.artifact_root, attempt.run_id),
            notice=attempt.notice,
        )
    return outcome


def _plan(job: worker_pb2.TrainingJob) -> TrainingPlan:
    try:
        return plan_of(job.spec, fine_tune=job.HasField("base_model"))
    except ConfigError as error:
        raise JobFailed("invalid_spec", str(error)) from None


async def _prepare_dataset(attempt: Attempt, plan: TrainingPlan) -> PreparedDataset:
    started = time.perf_counter()
    with tracing.span("prepare dataset"):
        prepared = await asyncio.to_thread(
            prepare, attempt.job.spec, plan, attempt.folder / "dataset", attempt.environment
        )
    if attempt.environment.metrics is not None:
        attempt.environment.metrics.dataset_prepared(time.perf_counter() - started)
    await attempt.publisher.publish(dataset_prepared=events.dataset_summary(prepared))
    if prepared.split_source == "dataset":
        await attempt.notice(
            "dataset_splits",
            f"the dataset defines its splits ({prepared.train_image_count} train, "
            f"{prepared.val_image_count} val, {prepared.test_image_count} test): "
            "val_fraction and test_fraction do not apply",
        )
    return prepared


async def _lease_gpus(attempt: Attempt, placement: Placement) -> tuple[str, ...] | None:
    """The GPUs leased for the run; None when the job was stopped while it waited."""
    wanted, gpus = placement.gpus, attempt.environment.gpus
    if wanted and gpus.would_wait(wanted):
        await attempt.notice("waiting_for_gpus", f"waiting for {wanted} GPUs of this worker")
    return await gpus.acquire(wanted or 0, unless=attempt.control.stop)


async def _run(
    attempt: Attempt,
    config_path: Path,
    prepared: PreparedDataset,
    checkpoints: Checkpoints,
    placement: Placement,
    leased: tuple[str, ...],
) -> TrainingOutcome:
    relay = ChildEventRelay(
        publisher=attempt.publisher,
        environment=attempt.environment,
        run_id=attempt.run_id,
        attempt=attempt.number,
        prepared=prepared,
        placed=checkpoints.placed,
    )
    with tracing.span("train", attributes={"raven.gpus": len(leased)}):
        return await run_training(
            config_path=config_path,
            work_dir=attempt.work_dir,
            artifact_dir=model_dir(attempt.environment.artifact_root, attempt.run_id),
            split_path=prepared.split_path,
            log_path=attempt.log_path,
            on_event=relay,
            stop=attempt.control.stop,
            env=device_env(leased, cpu=placement.gpus is None),
            processes=max(1, len(leased)),
        )


async def _succeed(attempt: Attempt, outcome: TrainingSucceeded) -> JobOutcome:
    succeeded = events.succeeded(outcome)
    try:
        await store_results(succeeded, attempt.run_id, attempt.number, attempt.environment)
    except (StorageError, OSError) as error:
        reason, message = upload_failure(error, attempt.environment.artifact_root)
        log.warning("job failed", run_id=attempt.run_id, reason=reason, message=message)
        return await attempt.fail(reason, message)
    await attempt.publisher.publish(critical=True, succeeded=succeeded)
    return JobOutcome.SUCCEEDED


def _fresh_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
