"""Registers the model of every succeeded run (the `training_run.succeeded` events)."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.message import DecodeError
from nats.aio.msg import Msg

from services.trained_models.handlers import register_from_run
from services.trained_models.messages import model_from_run
from services.trained_models.unit_of_work import UnitOfWork
from shared.consumer import Unprocessable
from shared.errors import InvalidArgument
from shared.proto.raven.training.v1.training_run_pb2 import TrainingRun, TrainingRunStateChanged


class RunSucceededHandler:
    def __init__(self, uow_factory: Callable[[], UnitOfWork]) -> None:
        self._uow_factory = uow_factory

    async def __call__(self, msg: Msg) -> None:
        try:
            run = TrainingRunStateChanged.FromString(msg.data).training_run
            model = model_from_run(run)
        except (DecodeError, InvalidArgument) as error:
            raise Unprocessable(f"not a succeeded TrainingRun: {error}") from error
        if run.state != TrainingRun.SUCCEEDED:
            raise Unprocessable(f"{run.name} is {TrainingRun.State.Name(run.state)}, not SUCCEEDED")
        await register_from_run(self._uow_factory(), model)
