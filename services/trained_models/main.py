"""Composition root of TrainedModelService."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.trained_models.consumer import RunSucceededHandler
from services.trained_models.servicer import TrainedModelServicer
from services.trained_models.unit_of_work import UnitOfWork
from shared.consumer import consume
from shared.grpc_server import Server
from shared.proto.raven.training.v1 import trained_model_pb2, trained_model_pb2_grpc
from shared.runtime import ServiceApp, run_service


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
            return UnitOfWork(sessions, self.subjects)

        trained_model_pb2_grpc.add_TrainedModelServiceServicer_to_server(
            TrainedModelServicer(uow_factory=uow_factory), server.server
        )
        return [
            consume(
                js,
                stream=self.subjects.events_stream,
                subject=self.subjects.run_lifecycle("succeeded"),
                durable=self.subjects.model_registry_consumer,
                handle=RunSucceededHandler(uow_factory),
            )
        ]


def run() -> None:
    run_service(TrainedModelsApp)


if __name__ == "__main__":
    run()
