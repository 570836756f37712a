"""Composition root of the trainer worker: settings, logging, NATS, the job consumer, signals."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import structlog

from shared.messaging import NatsSecurity, Subjects, connect, ensure_streams
from shared.settings import Settings
from shared.storage import Storage
from trainer_worker.claims import ClaimClient
from trainer_worker.consumer import ConsumerOptions, JobConsumer
from trainer_worker.devices import GpuPool, visible_gpus, worker_concurrency
from trainer_worker.pipeline import WorkerEnvironment

log = structlog.get_logger(__name__)


def configure_logging(settings: Settings) -> None:
    level = logging.getLevelNamesMapping().get(settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(message)s")
    renderer = (
        structlog.processors.JSONRenderer()
        if settings.log_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
    )


async def main(settings: Settings | None = None) -> None:
    """Serves training jobs until SIGTERM or SIGINT, then stops running jobs (they are
    queued again) and drains the NATS connection."""
    settings = settings or Settings()
    configure_logging(settings)
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    subjects = Subjects(namespace=settings.nats_namespace)
    gpus: tuple[str, ...] = ()
    if settings.worker_device != "cpu":
        gpus = await asyncio.to_thread(visible_gpus, os.environ)
    concurrency = worker_concurrency(settings.worker_concurrency, len(gpus))
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown.set)

    nc = await connect(
        settings.nats_url,
        name=f"raven-trainer-worker-{worker_id}",
        security=NatsSecurity.from_settings(settings),
    )
    try:
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
                worker_id=worker_id,
                concurrency=concurrency,
                ack_wait_s=settings.job_ack_wait_s,
                max_deliver=settings.job_max_deliver,
            ),
            claims=ClaimClient(nc=nc, subjects=subjects),
        )
        log.info(
            "trainer worker ready",
            worker=worker_id,
            namespace=subjects.namespace,
            gpus=len(gpus),
            concurrency=concurrency,
        )
        await consumer.run(shutdown)
    finally:
        await nc.drain()
        log.info("trainer worker stopped", worker=worker_id)


def run() -> None:
    """Console script `raven-trainer-worker`."""
    asyncio.run(main())
