"""Composition root of TrainingRunService."""

from __future__ import annotations

from services.training_runs import handlers
from services.training_runs.claims import ClaimResponder
from services.training_runs.consumer import WorkerEventHandler
from services.training_runs.metrics import RunMetrics
from services.training_runs.reads import RunReads
from services.training_runs.servicer import TrainingRunServicer
from services.training_runs.unit_of_work import UnitOfWork
from services.training_runs.watch import EventHub
from shared.consumer import consume
from shared.process import Loop
from shared.proto.raven.training.v1 import training_run_pb2, training_run_pb2_grpc
from shared.runtime import ServiceApp, Wiring, run_service
from shared.storage import Storage

# Worker reports handled at once (of different runs: one run's wait for each other).
_WORKER_EVENTS_IN_FLIGHT = 2048


class TrainingRunsApp(ServiceApp):
    service_names = (training_run_pb2.DESCRIPTOR.services_by_name["TrainingRunService"].full_name,)
    client_name = "raven-training-runs"
    address_setting = "training_runs_addr"

    async def setup(self, wiring: Wiring) -> list[Loop]:
        def uow_factory() -> UnitOfWork:
            return UnitOfWork(
                wiring.sessions,
                self.subjects,
                read_sessions=wiring.read_sessions,
                wakeup=wiring.wakeup,
            )

        self.run_metrics = run_metrics = RunMetrics(self.metrics)
        run_metrics.count_runs(wiring.read_sessions)
        self.metrics.watch_consumer(
            wiring.js,
            consumer="job_queue",
            stream=self.subjects.jobs_stream,
            durable=self.subjects.trainer_consumer,
            work_queue=True,
        )
        self.metrics.watch_consumer(
            wiring.js,
            consumer="worker_events",
            stream=self.subjects.worker_events_stream,
            durable=self.subjects.worker_events_consumer,
        )
        self.hub = EventHub()
        await self.hub.start(wiring.nc, self.subjects)
        # A queue group: one replica answers each claim.
        self._claims = await wiring.nc.subscribe(
            self.subjects.claims,
            queue="training-runs",
            cb=ClaimResponder(uow_factory, max_attempts=self.settings.max_attempts).handle,
        )
        training_run_pb2_grpc.add_TrainingRunServiceServicer_to_server(
            TrainingRunServicer(
                uow_factory=uow_factory,
                reads=RunReads(wiring.engine, uow_factory),
                hub=self.hub,
                storage=Storage.from_settings(self.settings),
            ),
            wiring.server.server,
        )
        recovery = handlers.recover_lost_runs_forever(
            uow_factory,
            timeout_s=self.settings.worker_lost_timeout_s,
            max_attempts=self.settings.max_attempts,
            on_recovered=run_metrics.recovered,
        )
        worker_events = consume(
            wiring.js,
            stream=self.subjects.worker_events_stream,
            subject=self.subjects.worker_events,
            durable=self.subjects.worker_events_consumer,
            handle=self.metrics.timed(
                "worker_events",
                WorkerEventHandler(uow_factory, on_batch=run_metrics.progress_batch),
            ),
            # The subject ends with the run id: each run's reports stay in order.
            ordering_key=lambda msg: msg.subject,
            # Room for a report of every run of a large fleet at once: progress reports
            # wait together for the batch that records them.
            batch=256,
            concurrency=_WORKER_EVENTS_IN_FLIGHT,
        )
        return [
            Loop("recovery of lost runs", recovery),
            Loop("worker events consumer", worker_events),
        ]

    async def teardown(self) -> None:
        await self._claims.unsubscribe()
        await self.hub.stop()


def run() -> None:
    run_service(TrainingRunsApp)


if __name__ == "__main__":
    run()
