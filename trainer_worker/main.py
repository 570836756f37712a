"""Composition root of the trainer worker: settings, NATS, the job consumer.

Logging, signals and the exit status come from `shared.process`, as for the services.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog
from nats.aio.client import Client as NATS

from shared.messaging import NatsSecurity, Subjects, connect, ensure_streams
from shared.observability.metrics_addresses import WORKER_METRICS_ADDR, metrics_address
from shared.process import Loop, Supervisor, run_process
from shared.settings import Settings
from shared.storage import Storage
from trainer_worker.claims import ClaimClient
from trainer_worker.consumer import ConsumerOptions, JobConsumer
from trainer_worker.devices import GpuPool, visible_gpus, worker_concurrency
from trainer_worker.health import keep_writing
from trainer_worker.metrics import WorkerMetrics
from trainer_worker.pipeline import WorkerEnvironment

log = structlog.get_logger(__name__)


class Worker:
    """Serves training jobs until stopped; stopping stops the running jobs (they are queued
    again) and drains the NATS connection."""

    # The service name of its traces.
    client_name = "raven-trainer-worker"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.supervisor = Supervisor()
        self._shutdown = asyncio.Event()
        self._nc: NATS | None = None
        self.metrics: WorkerMetrics | None = None
        # The port `/metrics` is served on once started (0: metrics off).
        self.metrics_port = 0

    async def start(self) -> None:
        settings = self.settings
        subjects = Subjects(namespace=settings.nats_namespace)
        gpus: tuple[str, ...] = ()
        if settings.worker_device != "cpu":
            gpus = await asyncio.to_thread(visible_gpus, os.environ)
        concurrency = worker_concurrency(settings.worker_concurrency, len(gpus))
        self.metrics = WorkerMetrics(slots=concurrency)
        metrics_at = metrics_address(settings.metrics_addr, WORKER_METRICS_ADDR)
        if metrics_at is not None:
            self.metrics_port = await self.metrics.server.start(metrics_at)
        self._nc = nc = await connect(
            settings.nats_url,
            name=f"raven-trainer-worker-{self.worker_id}",
            security=NatsSecurity.from_settings(settings),
        )
        js = nc.jetstream()
        await ensure_streams(js, subjects)
        consumer = JobConsumer(
            js=js,
            subjects=subjects,
            environment=WorkerEnvironment(
                artifact_root=settings.resolved_artifact_root(),
                device=settings.worker_device,
                dataloader_workers=settings.worker_dataloader_workers,
                gpus=GpuPool(gpus),
                storage=Storage.from_settings(settings),
                metrics=self.metrics,
            ),
            options=ConsumerOptions(
                worker_id=self.worker_id,
                concurrency=concurrency,
                ack_wait_s=settings.job_ack_wait_s,
                max_deliver=settings.job_max_deliver,
            ),
            claims=ClaimClient(nc=nc, subjects=subjects),
        )
        loops = [Loop("job consumer", consumer.run(self._shutdown))]
        if settings.worker_health_file is not None:
            # For probes (python -m trainer_worker.health): the loop is alive, NATS is up.
            loops.append(
                Loop(
                    "health file",
                    keep_writing(
                        settings.worker_health_file, lambda: nc.is_connected, self._shutdown
                    ),
                )
            )
        self.supervisor.start(loops)
        log.info(
            "trainer worker ready",
            worker_id=self.worker_id,
            namespace=subjects.namespace,
            gpus=len(gpus),
            concurrency=concurrency,
        )

    async def stop(self) -> None:
        self.supervisor.stopping()
        self._shutdown.set()
        await self.supervisor.stop(cancel=False)
        if self._nc is not None:
            await self._nc.drain()
        if self.metrics is not None:
            await self.metrics.server.stop()
        log.info("trainer worker stopped", worker_id=self.worker_id)


def run() -> None:
    """Console script `raven-trainer-worker`."""
    run_process(Worker)
