"""NATS JetStream: stream and subject names, and the streams every process expects.

Three streams:
- jobs: training jobs, a work queue shared by all trainer workers.
- worker events: what workers report, consumed by TrainingRunService.
- events: domain events published from the outbox (run history, run results,
  model registry changes), for the services and any outside subscriber.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

API_VERSION = "training.v1"


@dataclass(frozen=True, slots=True)
class Subjects:
    """Names under one namespace (`raven` in production, a unique one per test session)."""

    namespace: str = "raven"

    @property
    def _root(self) -> str:
        return f"{self.namespace}.{API_VERSION}"

    # Streams.
    @property
    def jobs_stream(self) -> str:
        return f"{self.namespace.upper()}_TRAINING_JOBS"

    @property
    def worker_events_stream(self) -> str:
        return f"{self.namespace.upper()}_TRAINING_WORKER_EVENTS"

    @property
    def events_stream(self) -> str:
        return f"{self.namespace.upper()}_TRAINING_EVENTS"

    # Subjects.
    def job(self, run_id: str) -> str:
        return f"{self._root}.jobs.{run_id}"

    @property
    def jobs(self) -> str:
        return f"{self._root}.jobs.*"

    def worker_event(self, run_id: str) -> str:
        return f"{self._root}.worker.{run_id}"

    @property
    def worker_events(self) -> str:
        return f"{self._root}.worker.*"

    def run_event(self, run_id: str) -> str:
        """A TrainingRunEvent of one run (its history, as it is written)."""
        return f"{self._root}.training_run.{run_id}.event"

    @property
    def run_events(self) -> str:
        return f"{self._root}.training_run.*.event"

    def run_lifecycle(self, what: str) -> str:
        """`training_run.succeeded`, `.failed`, `.cancelled`, `.created` with a TrainingRun."""
        return f"{self._root}.training_run.{what}"

    def model_lifecycle(self, what: str) -> str:
        """`trained_model.created`, `.published`, ... with a TrainedModel."""
        return f"{self._root}.trained_model.{what}"

    # Durable consumers.
    @property
    def trainer_consumer(self) -> str:
        return f"{self.namespace}-trainer"

    @property
    def worker_events_consumer(self) -> str:
        return f"{self.namespace}-training-runs"

    @property
    def model_registry_consumer(self) -> str:
        return f"{self.namespace}-trained-models"


async def connect(url: str, *, name: str) -> NATS:
    """A connection that reconnects forever: the process outlives NATS restarts."""
    return await nats.connect(
        url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=5
    )


async def ensure_streams(js: JetStreamContext, subjects: Subjects) -> None:
    """Creates the streams, or updates them to this configuration. Safe to call from every process."""
    configs = [
        StreamConfig(
            name=subjects.jobs_stream,
            subjects=[subjects.jobs],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120,
        ),
        StreamConfig(
            name=subjects.worker_events_stream,
            subjects=[subjects.worker_events],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120,
        ),
        StreamConfig(
            name=subjects.events_stream,
            subjects=[
                f"{subjects.namespace}.{API_VERSION}.training_run.>",
                f"{subjects.namespace}.{API_VERSION}.trained_model.>",
            ],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * 24 * 3600,
            duplicate_window=120,
        ),
    ]
    for config in configs:
        try:
            await js.add_stream(config)
        except BadRequestError:
            # Exists with another configuration: bring it to this one.
            await js.update_stream(config)
