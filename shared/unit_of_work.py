"""One transaction per use case: the aggregates it changed, their events as outbox
messages and the audit record of the call, written together or not at all.

Repositories track the aggregates they load or add (`shared.repository`, an identity
map per unit of work). Handlers mutate aggregates and call `commit()` once; it writes
each tracked aggregate that changed (only its changed columns, and only if its row
still has the version it was loaded at), turns the new events of each into outbox
rows, adds the pending audit record of the call (`shared.auth.audit.pending_change`),
and commits. Handlers never see the session nor write rows themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import outbox
from shared.auth import audit
from shared.messaging import Subjects
from shared.outbox import OutboxMessage
from shared.repository import Change, TrackingRepository


class SqlUnitOfWork:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        subjects: Subjects,
        *,
        read_sessions: async_sessionmaker[AsyncSession] | None = None,
        wakeup: outbox.Wakeup | None = None,
    ) -> None:
        self._sessions = sessions
        self._read_sessions = read_sessions
        # None: the outbox rows' NOTIFY goes in the transaction (shared.outbox).
        self._wakeup = wakeup
        self._reading = False
        self.subjects = subjects

    def reading(self) -> Self:
        """This unit of work, for the next `async with` block, for reads only: with
        `read_sessions` it runs without a transaction (one round trip per query) and
        refuses to commit."""
        self._reading = self._read_sessions is not None
        return self

    @property
    def tracking(self) -> bool:
        """Whether repositories track what they load (not in a block opened for reading)."""
        return not self._reading

    async def __aenter__(self) -> Self:
        if self._reading:
            assert self._read_sessions is not None
            self.session = self._read_sessions()
        else:
            self.session = self._sessions()
            await self.session.begin()
        self._messages: list[OutboxMessage] = []
        self._repositories = self.enter()
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

    def enter(self) -> Sequence[TrackingRepository[Any]]:
        """Builds the repositories on `self.session`; those whose aggregates commit writes."""
        return ()

    def outbox_messages(self, aggregate: Any, change: Change) -> list[OutboxMessage]:
        """The messages that announce what a commit did to an aggregate."""
        return []

    def resource_name(self, aggregate: Any) -> str:
        """The aggregate's resource name, for the audit record of the call."""
        return ""

    def publish(self, message: OutboxMessage) -> None:
        """A message that is no aggregate's event (a training job), sent with the commit."""
        self._messages.append(message)

    async def commit(self) -> None:
        """Writes everything or nothing. A commit that raises (Conflict, AlreadyExists)
        leaves the transaction as it was before the call, less the messages published
        for it: the use case may go on in this unit of work."""
        if self._reading:
            raise RuntimeError("a unit of work opened for reading cannot commit")
        call = audit.pending_change()
        try:
            async with self.session.begin_nested():
                written: list[tuple[Any, Change]] = []
                for repository in self._repositories:
                    written.extend(await repository.flush())
                messages = list(self._messages)
                for aggregate, change in written:
                    messages.extend(self.outbox_messages(aggregate, change))
                if call is not None:
                    entry = self._audit_entry(call.entry, written)
                    messages.append(await audit.write_row(self.session, entry, self.subjects))
                # One insert for every message of the transaction.
                await outbox.add(self.session, messages, notify=self._wakeup is None)
        except BaseException:
            self._messages.clear()
            raise
        await self.session.commit()
        if self._wakeup is not None and messages:
            self._wakeup.committed()
        if call is not None:
            call.written = True
        self._messages.clear()
        for repository in self._repositories:
            repository.committed()

    def _audit_entry(self, entry: audit.Entry, written: list[tuple[Any, Change]]) -> audit.Entry:
        """The call's record names what it created, else what its request named, else
        what it changed (as the response would: `Create...` answers with the new one)."""
        added = [a for a, change in written if change is Change.ADDED]
        if added:
            return replace(entry, resource=self.resource_name(added[0]))
        if not entry.resource and written:
            return replace(entry, resource=self.resource_name(written[0][0]))
        return entry
