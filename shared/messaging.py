"""NATS JetStream: stream and subject names, and the streams every process expects.

Three streams:
- jobs: training jobs, a work queue shared by all trainer workers.
- worker events: what workers report, consumed by TrainingRunService.
- events: domain events published from the outbox (run history, run results,
  model registry changes), for the services and any outside subscriber.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError

from shared.settings import Settings

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

    @property
    def claims(self) -> str:
        """Request-reply: a worker claims a job before it starts it."""
        return f"{self._root}.claims"

    def run_event(self, run_id: str) -> str:
        """A TrainingRunEvent of one run (its history, as it is written)."""
        return f"{self._root}.training_run.{run_id}.event"

    @property
    def run_events(self) -> str:
        return f"{self._root}.training_run.*.event"

    def run_state(self, run_id: str) -> str:
        """The state changes of one run alone (its `state_changed` TrainingRunEvents): the
        last message is the run's state, which is all a worker asks to learn a cancel."""
        return f"{self._root}.training_run.{run_id}.state"

    def run_lifecycle(self, what: str) -> str:
        """`training_run.succeeded`, `.failed`, `.cancelled`, `.created` with a TrainingRun."""
        return f"{self._root}.training_run.{what}"

    @property
    def audit_recorded(self) -> str:
        """An AuditRecord, for every state-changing or refused call (shared/auth/audit.py)."""
        return f"{self._root}.audit.recorded"

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


@dataclass(frozen=True, slots=True)
class NatsSecurity:
    """TLS (server verified against `ca_file`, optional client certificate) and credentials."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    creds_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> NatsSecurity:
        return cls(
            ca_file=settings.nats_tls_ca_file,
            cert_file=settings.nats_tls_cert_file,
            key_file=settings.nats_tls_key_file,
            creds_file=settings.nats_creds_file,
        )

    def options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if self.ca_file or self.cert_file:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert_file:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
            options["tls"] = context
        if self.creds_file:
            options["user_credentials"] = str(self.creds_file)
        return options


async def connect(url: str, *, name: str, security: NatsSecurity | None = None) -> NATS:
    """A connection that reconnects forever: the process outlives NATS restarts."""
    return await nats.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        **(security or NatsSecurity()).options(),
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
                f"{subjects.namespace}.{API_VERSION}.audit.>",
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
