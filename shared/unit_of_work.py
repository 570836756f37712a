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
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        subjects: Subjects,
        *,
        read_sessions: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        self._sessions = sessions
        self._read_sessions = read_sessions
        self._reading = False
        self.subjects = subjects

    def reading(self) -> Self:
        """This unit of work, for the next `async with` block, for reads only: with
        `read_sessions` it runs without a transaction (one round trip per query) and
        refuses to commit."""
        self._reading = self._read_sessions is not None
        return self

    async def __aenter__(self) -> Self:
        if self._reading:
            assert self._read_sessions is not None
            self.session = self._read_sessions()
        else:
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
        self._reading = False

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
        if self._reading:
            raise RuntimeError("a unit of work opened for reading cannot commit")
        messages = [*self._messages, *await self.flush()]
        await outbox.add(self.session, messages)
        await self.session.commit()
        self._messages.clear()
        self.after_commit()
