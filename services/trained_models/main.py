"""Composition root of TrainedModelService."""

from __future__ import annotations

import structlog

from services.trained_models.consumer import RunSucceededHandler
from services.trained_models.handlers import remove_deleted_files
from services.trained_models.importing import ImportPolicy
from services.trained_models.incumbent import IncumbentPolicy
from services.trained_models.publication import PublicationPolicy
from services.trained_models.servicer import TrainedModelServicer
from services.trained_models.unit_of_work import UnitOfWork
from services.training_runs.unit_of_work import UnitOfWork as JobsUnitOfWork
from shared.consumer import consume
from shared.observability.metrics_addresses import TRAINED_MODELS_METRICS_ADDR
from shared.process import Loop
from shared.proto.raven.training.v1 import trained_model_pb2, trained_model_pb2_grpc
from shared.runtime import ServiceApp, Wiring, run_service
from shared.storage import Storage

log = structlog.get_logger(__name__)


class TrainedModelsApp(ServiceApp):
    service_names = (
        trained_model_pb2.DESCRIPTOR.services_by_name["TrainedModelService"].full_name,
    )
    client_name = "raven-trained-models"
    address_setting = "trained_models_addr"
    metrics_default = TRAINED_MODELS_METRICS_ADDR

    async def setup(self, wiring: Wiring) -> list[Loop]:
        def uow_factory() -> UnitOfWork:
            return UnitOfWork(
                wiring.sessions,
                self.subjects,
                read_sessions=wiring.read_sessions,
                wakeup=wiring.wakeup,
            )

        def jobs_uow_factory() -> JobsUnitOfWork:
            return JobsUnitOfWork(
                wiring.sessions,
                self.subjects,
                read_sessions=wiring.read_sessions,
                wakeup=wiring.wakeup,
            )

        storage = Storage.from_settings(self.settings)
        servicer = TrainedModelServicer(
            uow_factory=uow_factory,
            storage=storage,
            publish_policy=PublicationPolicy(
                storage=storage,
                default_channel=self.settings.default_publish_channel,
                min_bbox_map=self.settings.publish_min_bbox_map,
                incumbent_policy=IncumbentPolicy(
                    require=self.settings.publish_require_incumbent,
                    tolerance=self.settings.publish_incumbent_tolerance,
                ),
            ),
            import_policy=ImportPolicy(
                storage=storage,
                verify_timeout_s=self.settings.import_verify_timeout_s,
                max_bytes=self.settings.import_max_bytes,
            ),
            jobs_uow_factory=jobs_uow_factory,
        )
        trained_model_pb2_grpc.add_TrainedModelServiceServicer_to_server(
            servicer, wiring.server.server
        )
        self.metrics.watch_consumer(
            wiring.js,
            consumer="run_succeeded",
            stream=self.subjects.events_stream,
            durable=self.subjects.model_registry_consumer,
        )
        run_succeeded = consume(
            wiring.js,
            stream=self.subjects.events_stream,
            subject=self.subjects.run_lifecycle("succeeded"),
            durable=self.subjects.model_registry_consumer,
            handle=self.metrics.timed("run_succeeded", RunSucceededHandler(uow_factory)),
        )
        return [
            Loop("sweep of deleted models", self._sweep(uow_factory(), storage), ends=True),
            Loop("run succeeded consumer", run_succeeded),
        ]

    async def _sweep(self, uow: UnitOfWork, storage: Storage) -> None:
        """Finishes deletions a crash interrupted between the commit and the files; the
        files stay for the next start when storage cannot be reached now."""
        try:
            removed = await remove_deleted_files(uow, storage)
        except Exception:
            log.exception("removing files of deleted trained models failed")
            return
        if removed:
            log.info("files of deleted trained models removed", models=removed)


def run() -> None:
    run_service(TrainedModelsApp)


if __name__ == "__main__":
    run()
