"""Composition root of TrainingRunService: settings, database, NATS, server, background loops."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine

from services.training_runs.consumer import WorkerEventHandler
from services.training_runs.servicer import TrainingRunServicer
from services.training_runs.unit_of_work import UnitOfWork
from services.training_runs.watch import EventHub
from shared import logs, messaging
from shared.consumer import consume
from shared.db.engine import create_engine, session_factory
from shared.db.migrate import upgrade
from shared.grpc_server import Server
from shared.outbox import OutboxRelay
from shared.process import serve_until_signalled
from shared.proto.raven.training.v1 import training_run_pb2, training_run_pb2_grpc
from shared.settings import Settings

log = structlog.get_logger(__name__)
SERVICE_NAME = training_run_pb2.DESCRIPTOR.services_by_name["TrainingRunService"].full_name


class TrainingRunsApp:
    """The whole service in one object: `start()` it, `stop()` it (tests run it in-process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = 0
        self._engine: AsyncEngine | None = None
        self._nc: NATS | None = None
        self._server: Server | None = None
        self._hub = EventHub()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        settings = self.settings
        subjects = messaging.Subjects(settings.nats_namespace)
        self._engine = create_engine(settings.database_url)
        await upgrade(self._engine)
        sessions = session_factory(self._engine)

        def uow_factory() -> UnitOfWork:
            return UnitOfWork(sessions, subjects)

        self._nc = await messaging.connect(settings.nats_url, name="raven-training-runs")
        js = self._nc.jetstream()
        await messaging.ensure_streams(js, subjects)
        await self._hub.start(self._nc, subjects)

        relay = OutboxRelay(engine=self._engine, js=js)
        self._tasks = [
            asyncio.create_task(relay.run(), name="outbox-relay"),
            asyncio.create_task(
                consume(
                    js,
                    stream=subjects.worker_events_stream,
                    subject=subjects.worker_events,
                    durable=subjects.worker_events_consumer,
                    handle=WorkerEventHandler(uow_factory),
                ),
                name="worker-events",
            ),
        ]

        self._server = Server([SERVICE_NAME])
        training_run_pb2_grpc.add_TrainingRunServiceServicer_to_server(
            TrainingRunServicer(
                uow_factory=uow_factory,
                hub=self._hub,
                artifact_root=settings.resolved_artifact_root(),
            ),
            self._server.server,
        )
        self.port = self._server.listen(settings.training_runs_addr)
        await self._server.start()
        log.info("TrainingRunService serving", address=settings.training_runs_addr, port=self.port)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._hub.stop()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._engine is not None:
            await self._engine.dispose()


async def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level, json=settings.log_json)
    await serve_until_signalled(TrainingRunsApp(settings))


def run() -> None:
    asyncio.run(main())


if __name__ == "__main__":
    run()
