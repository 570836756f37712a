"""Applies what trainer workers report (the worker events stream) to the runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.training_runs.handlers import WorkerReport, apply_worker_report
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
    def __init__(self, uow_factory: Callable[[], UnitOfWork]) -> None:
        self._uow_factory = uow_factory

    async def __call__(self, msg: Msg) -> None:
        try:
            event = WorkerEvent.FromString(msg.data)
        except DecodeError as error:
            raise Unprocessable(f"not a WorkerEvent: {error}") from error
        await apply_worker_report(self._uow_factory(), to_report(event))
