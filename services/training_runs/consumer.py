"""Applies what trainer workers report (the worker events stream) to the runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.training_runs.handlers import (
    WorkerReport,
    apply_progress_reports,
    apply_worker_report,
)
from services.training_runs.progress import ProgressRecorder
from services.training_runs.unit_of_work import UnitOfWork
from shared.consumer import Unprocessable
from shared.errors import InvalidArgument
from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1.worker_pb2 import WorkerEvent
from shared.proto_json import to_dict
from shared.reports import ReportKind, report_from_json


def to_report(event: WorkerEvent) -> WorkerReport:
    field = event.WhichOneof("payload")
    if field is None or not event.event_id:
        raise Unprocessable(f"worker event without payload or id: {event.event_id!r}")
    try:
        kind = ReportKind(field)
    except ValueError as error:
        raise Unprocessable(f"worker event of an unknown kind: {field!r}") from error
    try:
        run_id = parse_name(event.training_run, TRAINING_RUNS)
    except InvalidArgument as error:
        raise Unprocessable(error.message) from error
    return WorkerReport(
        event_id=event.event_id,
        run_id=run_id,
        attempt=event.attempt,
        worker_id=event.worker_id,
        time=event.time.ToDatetime(tzinfo=UTC) if event.HasField("time") else datetime.now(UTC),
        payload=report_from_json(kind, to_dict(getattr(event, field))),
    )


class WorkerEventHandler:
    """Applies each report in a transaction of its own, but progress, the one frequent
    report, in batches of many runs' ticks (services.training_runs.progress)."""

    def __init__(
        self,
        uow_factory: Callable[[], UnitOfWork],
        *,
        max_batch: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._uow_factory = uow_factory
        self.progress = ProgressRecorder(
            lambda reports: apply_progress_reports(uow_factory(), reports),
            max_batch=max_batch,
            on_batch=on_batch,
        )

    async def __call__(self, msg: Msg) -> None:
        try:
            event = WorkerEvent.FromString(msg.data)
        except DecodeError as error:
            raise Unprocessable(f"not a WorkerEvent: {error}") from error
        report = to_report(event)
        if report.kind is ReportKind.PROGRESS:
            await self.progress.record(report)
        else:
            await apply_worker_report(self._uow_factory(), report)
