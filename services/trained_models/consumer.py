"""Registers the model of every succeeded training run (the `training_run.succeeded`
events); an evaluation job's success registers nothing (its findings are its evaluation's).

The event names the run; the model is made from the run's record (handlers.register_from_run),
which is only a training run's.
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
from shared.proto.raven.training.v1.training_run_pb2 import TrainingRun, TrainingRunStateChanged


class RunSucceededHandler:
    def __init__(self, uow_factory: Callable[[], UnitOfWork]) -> None:
        self._uow_factory = uow_factory

    async def __call__(self, msg: Msg) -> None:
        try:
            run = TrainingRunStateChanged.FromString(msg.data).training_run
            run_id = parse_name(run.name, TRAINING_RUNS)
        except (DecodeError, InvalidArgument) as error:
            raise Unprocessable(f"not a TrainingRun completion: {error}") from error
        if run.kind == TrainingRun.EVALUATION:
            return
        await register_from_run(self._uow_factory(), run_id)
