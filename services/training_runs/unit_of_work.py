"""The unit of work of TrainingRunService: the runs it loaded or added, their history
and the outbox messages of their new events are written in one transaction, or not
at all."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.training_runs.domain import TrainingRun
from services.training_runs.messages import outbox_messages
from services.training_runs.repository import TrainingRunRepository
from shared.names import evaluation_name, run_name
from shared.outbox import OutboxMessage
from shared.repository import Change, TrackingRepository
from shared.unit_of_work import SqlUnitOfWork


class UnitOfWork(SqlUnitOfWork):
    def enter(self) -> Sequence[TrackingRepository[Any]]:
        self.runs = TrainingRunRepository(self.session, tracking=self.tracking)
        return [self.runs]

    def outbox_messages(self, aggregate: TrainingRun, change: Change) -> list[OutboxMessage]:
        if change is Change.REMOVED:
            return []
        return outbox_messages(aggregate, self.subjects)

    def resource_name(self, aggregate: TrainingRun) -> str:
        """An evaluation job is named as its evaluation, the resource its caller asked for."""
        if aggregate.evaluation is not None:
            return evaluation_name(aggregate.evaluation.trained_model_id, aggregate.id)
        return run_name(aggregate.id)
