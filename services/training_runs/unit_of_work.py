"""One transaction per use case: the runs it changed, their history and their
outbox messages are written together, or not at all."""

from __future__ import annotations

from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.training_runs.domain import TrainingRun
from services.training_runs.messages import outbox_messages
from services.training_runs.repository import TrainingRunRepository
from shared import outbox
from shared.messaging import Subjects
from shared.outbox import OutboxMessage


class UnitOfWork:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], subjects: Subjects) -> None:
        self._sessions = sessions
        self.subjects = subjects

    async def __aenter__(self) -> UnitOfWork:
        self.session = self._sessions()
        await self.session.begin()
        self.runs = TrainingRunRepository(self.session)
        self._added: list[TrainingRun] = []
        self._changed: list[TrainingRun] = []
        self._messages: list[OutboxMessage] = []
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Whatever was not committed is rolled back.
        await self.session.close()

    def add(self, run: TrainingRun) -> None:
        self._added.append(run)

    def changed(self, run: TrainingRun) -> None:
        self._changed.append(run)

    def publish(self, message: OutboxMessage) -> None:
        self._messages.append(message)

    async def commit(self) -> None:
        messages = list(self._messages)
        for run in self._added:
            await self.runs.add(run)
        for run in self._changed:
            await self.runs.save(run)
        for run in (*self._added, *self._changed):
            messages.extend(outbox_messages(run, self.subjects))
        await outbox.add(self.session, messages)
        await self.session.commit()
        for run in (*self._added, *self._changed):
            run.new_events.clear()
