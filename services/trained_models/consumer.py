"""Registers the model of every succeeded run (the `training_run.succeeded` events).

The event names the run; the model is made from the run's record (handlers.register_from_run).
"""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.trained_models.handlers import register_from_run
from services.trained_models.unit_of_work import UnitOfWork
from shared.consumer import Unprocessable
from shared.errors import InvalidArgument
from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1.training_run_pb2 import TrainingRunStateChanged


class RunSucceededHandler:
    def __init__(self, uow_factory: Callable[[], UnitOfWork]) -> None:
        self._uow_factory = uow_factory

    async def __call__(self, msg: Msg) -> None:
        try:
            name = TrainingRunStateChanged.FromString(msg.data).training_run.name
            run_id = parse_name(name, TRAINING_RUNS)
        except (DecodeError, InvalidArgument) as error:
            raise Unprocessable(f"not a TrainingRun completion: {error}") from error
        await register_from_run(self._uow_factory(), run_id)
