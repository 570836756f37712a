"""Composition root of TrainedModelService."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.trained_models.consumer import RunSucceededHandler
from services.trained_models.handlers import remove_deleted_files
from services.trained_models.importing import ImportPolicy
from services.trained_models.publication import PublicationPolicy
from services.trained_models.servicer import TrainedModelServicer
from services.trained_models.unit_of_work import UnitOfWork
from shared.consumer import consume
from shared.grpc_server import Server
from shared.proto.raven.training.v1 import trained_model_pb2, trained_model_pb2_grpc
from shared.runtime import ServiceApp, run_service
from shared.storage import Storage

log = structlog.get_logger(__name__)


class TrainedModelsApp(ServiceApp):
    service_names = (
        trained_model_pb2.DESCRIPTOR.services_by_name["TrainedModelService"].full_name,
    )
    client_name = "raven-trained-models"

    def address(self) -> str:
        return self.settings.trained_models_addr

    async def setup(
        self,
        server: Server,
        sessions: async_sessionmaker[AsyncSession],
        nc: NATS,
        js: JetStreamContext,
    ) -> list[Coroutine[Any, Any, None]]:
        def uow_factory() -> UnitOfWork:
            return UnitOfWork(sessions, self.subjects, read_sessions=self.read_sessions)

        storage = Storage.from_settings(self.settings)
        servicer = TrainedModelServicer(
            uow_factory=uow_factory,
            storage=storage,
            publish_policy=PublicationPolicy(
                storage=storage,
                default_channel=self.settings.default_publish_channel,
                min_bbox_map=self.settings.publish_min_bbox_map,
            ),
            import_policy=ImportPolicy(
                storage=storage,
                verify_timeout_s=self.settings.import_verify_timeout_s,
                max_bytes=self.settings.import_max_bytes,
            ),
        )
        trained_model_pb2_grpc.add_TrainedModelServiceServicer_to_server(servicer, server.server)
        return [
            self._sweep(uow_factory(), storage),
            consume(
                js,
                stream=self.subjects.events_stream,
                subject=self.subjects.run_lifecycle("succeeded"),
                durable=self.subjects.model_registry_consumer,
                handle=RunSucceededHandler(uow_factory),
            ),
        ]

    async def _sweep(self, uow: UnitOfWork, storage: Storage) -> None:
        """Finishes deletions a crash interrupted between the commit and the files."""
        removed = await remove_deleted_files(uow, storage)
        if removed:
            log.info("files of deleted trained models removed", models=removed)


def run() -> None:
    run_service(TrainedModelsApp)


if __name__ == "__main__":
    run()
