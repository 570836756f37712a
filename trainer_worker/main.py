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
from shared.process import Loop, Supervisor, run_process
from shared.settings import Settings
from shared.storage import Storage
from trainer_worker.claims import ClaimClient
from trainer_worker.consumer import ConsumerOptions, JobConsumer
from trainer_worker.devices import GpuPool, visible_gpus, worker_concurrency
from trainer_worker.health import keep_writing
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

    async def start(self) -> None:
        settings = self.settings
        subjects = Subjects(namespace=settings.nats_namespace)
        gpus: tuple[str, ...] = ()
        if settings.worker_device != "cpu":
            gpus = await asyncio.to_thread(visible_gpus, os.environ)
        concurrency = worker_concurrency(settings.worker_concurrency, len(gpus))
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
        log.info("trainer worker stopped", worker_id=self.worker_id)


def run() -> None:
    """Console script `raven-trainer-worker`."""
    run_process(Worker)
