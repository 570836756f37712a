"""One transaction per use case, with the outbox messages it produces.

Handlers never commit on their own: they call `commit()` once, which writes
the aggregates (through the subclass's `flush`), the outbox rows, and commits.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import outbox
from shared.messaging import Subjects
from shared.outbox import OutboxMessage


class SqlUnitOfWork:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], subjects: Subjects) -> None:
        self._sessions = sessions
        self.subjects = subjects

    async def __aenter__(self) -> Self:
        self.session = self._sessions()
        await self.session.begin()
        self._messages: list[OutboxMessage] = []
        self.enter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Whatever was not committed is rolled back.
        await self.session.close()

    def enter(self) -> None:
        """Builds the repositories on `self.session`."""

    async def flush(self) -> list[OutboxMessage]:
        """Writes pending aggregates; returns the messages they produced."""
        return []

    def after_commit(self) -> None:
        """Forgets what was just written."""

    def publish(self, message: OutboxMessage) -> None:
        self._messages.append(message)

    async def commit(self) -> None:
        messages = [*self._messages, *await self.flush()]
        await outbox.add(self.session, messages)
        await self.session.commit()
        self._messages.clear()
        self.after_commit()
