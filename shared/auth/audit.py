"""The audit trail: one append-only row per state-changing call and per refused call,
written with its `audit.recorded` event through the outbox (same transaction).

A state-changing call's row is written by the unit of work that commits the change, in
the same transaction (`expect_change` / `pending_change`): a change that fails to commit
leaves no row claiming success, a committed one always has its row. A call that commits
nothing (refused, failed, or with nothing to change) is recorded on its own
(`AuditLog.record`)."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared import outbox
from shared.db.schema import audit_records
from shared.messaging import Subjects
from shared.pagination import Cursor
from shared.proto.raven.training.v1 import audit_pb2

log = structlog.get_logger(__name__)

UNAUTHENTICATED_IDENTITY = "unauthenticated"
AUDIT_RECORDS = "auditRecords/"
# Every field of a record is at most this many characters: a refused call may carry a
# name of megabytes, and its record and event must stay small.
FIELD_CHARS = 256
_ELLIPSIS = "\u2026"


@dataclass(frozen=True, slots=True, kw_only=True)
class Entry:
    identity: str
    on_behalf_of: str = ""
    proxy: str = ""
    rpc: str
    resource: str = ""
    outcome: str
    detail: str = ""
    peer: str = ""


@dataclass(frozen=True, slots=True)
class AuditFilter:
    identity: str = ""
    rpc: str = ""
    outcome: str = ""
    resource: str = ""


@dataclass(slots=True)
class PendingChange:
    """The record of a state-changing call in progress, until a commit writes it."""

    # Its outcome is OK: written only with a change that commits.
    entry: Entry
    written: bool = False
    # Set when the call is over: a commit after it (a task it left behind) writes none.
    closed: bool = False

    def close(self) -> bool:
        """Ends the call; True when its record was written with a commit."""
        self.closed = True
        return self.written


_pending: ContextVar[PendingChange | None] = ContextVar("raven_audit_pending", default=None)


def expect_change(entry: Entry) -> PendingChange:
    """Makes `entry` the record the next commit of this call (this task) writes."""
    pending = PendingChange(entry)
    _pending.set(pending)
    return pending


def pending_change() -> PendingChange | None:
    """The record a commit in this call must write; None outside a state-changing call
    or once written."""
    pending = _pending.get()
    if pending is None or pending.written or pending.closed:
        return None
    return pending


async def write(session: AsyncSession, entry: Entry, subjects: Subjects) -> None:
    """Writes the row and its event in the session's transaction."""
    await outbox.add(session, [await write_row(session, entry, subjects)])


async def write_row(
    session: AsyncSession, entry: Entry, subjects: Subjects
) -> outbox.OutboxMessage:
    """Writes the row in the session's transaction; returns its event, for the caller to
    add to the outbox with the others of the transaction."""
    row = (
        await session.execute(
            insert(audit_records)
            .values(**_values(entry))
            .returning(audit_records.c.id, audit_records.c.time)
        )
    ).one()
    message = to_proto(entry, row.id, row.time)
    return outbox.OutboxMessage(
        subject=subjects.audit_recorded,
        payload=message.SerializeToString(),
        msg_id=f"audit-{row.id}",
    )


class AuditLog:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], subjects: Subjects) -> None:
        self._sessions = sessions
        self._subjects = subjects

    async def record(self, entry: Entry) -> None:
        """Writes the row and its event on their own, for a call that committed nothing.
        Failing to audit is logged, never raised: the call it describes has already
        happened (or been refused)."""
        try:
            async with self._sessions() as session, session.begin():
                await write(session, entry, self._subjects)
        except Exception:
            log.exception("audit record not written", **_values(entry))

    async def list(
        self, filter_: AuditFilter, *, limit: int, after: Cursor | None
    ) -> Sequence[audit_pb2.AuditRecord]:
        query = select(audit_records).order_by(audit_records.c.id.desc()).limit(limit)
        for column in ("identity", "rpc", "outcome", "resource"):
            value = getattr(filter_, column)
            if value:
                query = query.where(audit_records.c[column] == value)
        if after is not None:
            query = query.where(audit_records.c.id < int(after.value))
        async with self._sessions() as session:
            rows = (await session.execute(query)).mappings().all()
        return [
            to_proto(
                Entry(**{k: v for k, v in row.items() if k not in ("id", "time")}),
                row["id"],
                row["time"],
            )
            for row in rows
        ]


def bounded(value: str, limit: int = FIELD_CHARS) -> str:
    """`value` as a record field: NUL (which Postgres text cannot hold) shown as U+FFFD,
    and cut to its first `limit` characters, the last one an ellipsis, when longer."""
    value = value.replace("\x00", "\ufffd")
    if len(value) > limit:
        return value[: limit - 1] + _ELLIPSIS
    return value


def _values(entry: Entry) -> dict[str, str]:
    return {
        "identity": bounded(entry.identity),
        "on_behalf_of": bounded(entry.on_behalf_of),
        "proxy": bounded(entry.proxy),
        "rpc": bounded(entry.rpc),
        "resource": bounded(entry.resource),
        "outcome": bounded(entry.outcome),
        "detail": bounded(entry.detail),
        "peer": bounded(entry.peer),
    }


def to_proto(entry: Entry, record_id: int, time: datetime) -> audit_pb2.AuditRecord:
    record = audit_pb2.AuditRecord(name=f"{AUDIT_RECORDS}{record_id}")
    for key, value in _values(entry).items():
        setattr(record, key, value)
    record.time.FromDatetime(time)
    return record
