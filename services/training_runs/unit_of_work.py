"""The unit of work of TrainingRunService: runs, their history and their outbox
messages are written in one transaction, or not at all."""

from __future__ import annotations

from services.training_runs.domain import TrainingRun
from services.training_runs.messages import outbox_messages
from services.training_runs.repository import TrainingRunRepository
from shared.outbox import OutboxMessage
from shared.unit_of_work import SqlUnitOfWork


class UnitOfWork(SqlUnitOfWork):
    def enter(self) -> None:
        self.runs = TrainingRunRepository(self.session)
        self._added: list[TrainingRun] = []
        self._changed: list[TrainingRun] = []

    def add(self, run: TrainingRun) -> None:
        self._added.append(run)

    def changed(self, run: TrainingRun) -> None:
        self._changed.append(run)

    async def flush(self) -> list[OutboxMessage]:
        messages: list[OutboxMessage] = []
        for run in self._added:
            await self.runs.add(run)
        for run in self._changed:
            await self.runs.save(run)
        for run in (*self._added, *self._changed):
            messages.extend(outbox_messages(run, self.subjects))
        return messages

    def after_commit(self) -> None:
        for run in (*self._added, *self._changed):
            run.new_events.clear()
        self._added.clear()
        self._changed.clear()
