"""What one job attempt is: its identity, its folders, how it is asked to stop, how it ends.

The vocabulary the worker's job flow (trainer_worker.pipeline) and its consumer share.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.storage import Storage
from trainer_worker import events
from trainer_worker.devices import GpuPool

if TYPE_CHECKING:
    from trainer_worker.metrics import WorkerMetrics
    from trainer_worker.publisher import EventPublisher

RUN_PREFIX = "trainingRuns/"


class InvalidJob(ValueError):
    """A job message no worker can act on (it is terminated, not retried)."""


class JobFailed(Exception):
    """The attempt fails with `reason` (a stable code) and a message for a person."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class JobOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    # Stopped by a worker shutdown: no terminal event, the job goes back to the queue.
    INTERRUPTED = "interrupted"


class StopReason(StrEnum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


_STOPPING = frozenset(
    {training_run_pb2.TrainingRun.CANCELLING, training_run_pb2.TrainingRun.CANCELLED}
)


def is_cancel_request(data: bytes) -> bool:
    """Whether a message of the run's state subject (a TrainingRunEvent) asks the job to stop."""
    event = training_run_pb2.TrainingRunEvent()
    try:
        event.ParseFromString(data)
    except DecodeError:
        return False
    return (
        event.WhichOneof("payload") == "state_changed" and event.state_changed.to_state in _STOPPING
    )


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
    # The worker's Prometheus series (trainer_worker.metrics); None: not observed.
    metrics: WorkerMetrics | None = None

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


def attempt_key_prefix(run_id: str, attempt: int) -> str:
    """Where an attempt's files go in object storage (checkpoints, its log)."""
    return f"runs/{run_id}/attempt-{attempt}/"


@dataclass(frozen=True, slots=True, kw_only=True)
class Attempt:
    """One attempt of a job, and where it reports."""

    job: worker_pb2.TrainingJob
    run_id: str
    publisher: EventPublisher
    environment: WorkerEnvironment
    control: JobControl
    resume: ResumePoint | None

    @property
    def number(self) -> int:
        return self.job.attempt

    @property
    def folder(self) -> Path:
        return attempt_dir(self.environment.artifact_root, self.run_id, self.job.attempt)

    @property
    def work_dir(self) -> Path:
        return self.folder / "work"

    @property
    def log_path(self) -> Path:
        return self.folder / "train.log"

    async def notice(self, code: str, message: str) -> None:
        await self.publisher.publish(notice=events.notice(code, message))

    async def fail(self, reason: str, message: str, *artifacts: common_pb2.Artifact) -> JobOutcome:
        failure = events.failure(reason, message)
        failure.artifacts.extend(artifacts)
        await self.publisher.publish(critical=True, failed=failure)
        return JobOutcome.FAILED
