"""Transactional outbox: messages are written with the change they announce and
published to JetStream afterwards, so none is lost to a crash between the two.

`add` runs inside the caller's transaction. `OutboxRelay` publishes committed
rows in id order with `Nats-Msg-Id` = the row's msg_id (JetStream drops a
duplicate within its window, e.g. after a crash between publish and delete),
then deletes them. Every service process runs a relay, but one leads: the relay
that holds a session-level advisory lock (`LEADER_LOCK`) on its own connection
publishes, and runs its batches on that connection, so it stops publishing as
soon as the connection (and with it the lock) is gone. The others try to take
the lock every `takeover_interval_s`. One publisher means rows leave in id
(commit) order; during a takeover the old leader's last batch may still be in
flight while the new leader sends it again: each copy goes out in order and
JetStream keeps the first of each msg_id, so the order holds. The leader wakes on
a NOTIFY, and polls slowly as a safety net. A unit of work with a `Wakeup` sends it
after its commit, shared with the commits around it: a NOTIFY inside a transaction
makes its commit wait for every other notifying commit (Postgres serializes them on
one lock), which caps the writes of the whole fleet. Without one, `add` sends it in
the writing transaction.

A row that can never be published (larger than the server's max payload, or refused
by JetStream for itself, or failing MAX_FAILURES times while other rows of its batch
went out) is moved to `outbox_dead_letters` in the same transaction that deletes the
published rows of its batch, logged and counted: no single message holds back the
others. A row whose publish failed along with the whole batch (NATS unreachable) stays
and is published again, however long the outage.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from nats import errors as nats_errors
from nats.js import JetStreamContext
from nats.js import errors as js_errors
from opentelemetry.trace import SpanKind
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from shared.db.schema import OUTBOX_CHANNEL, outbox, outbox_dead_letters
from shared.observability import tracing

log = structlog.get_logger(__name__)

# What a publish adds to the payload on the wire besides the Nats-Msg-Id value: the
# header block's framing and name. The server counts headers against its max payload.
_HEADER_OVERHEAD = 64
# How much of an error's text a dead letter keeps.
_ERROR_CHARS = 500
# The advisory lock whose holder is the one relay that publishes ("ravn").
LEADER_LOCK = 0x7261766E
# A row whose publish failed this often while others of its batch were published fails
# for itself: it is set aside rather than retried forever at the head of every batch.
MAX_FAILURES = 5


class Unpublishable(Exception):
    """A row that no retry can publish."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    subject: str
    payload: bytes
    # Deduplication key: the same logical message always gets the same msg_id.
    msg_id: str


async def add(
    session: AsyncSession, messages: Sequence[OutboxMessage], *, notify: bool = True
) -> None:
    """Writes messages in the session's transaction; they are published after it commits,
    in the trace of the current span. `notify` False: the caller wakes the relay after
    the commit (`Wakeup`)."""
    if not messages:
        return
    traceparent = tracing.traceparent()
    rows = [
        {"subject": m.subject, "payload": m.payload, "msg_id": m.msg_id, "traceparent": traceparent}
        for m in messages
    ]
    statement = insert(outbox).values(rows)
    if notify:
        # The relay's wake-up rides on the insert: Postgres delivers identical
        # notifications of a transaction once, at its commit.
        statement = statement.returning(func.pg_notify(OUTBOX_CHANNEL, ""))
    await session.execute(statement)


class Wakeup:
    """Wakes the leading relay, wherever it runs, after commits that added rows: one
    NOTIFY on a connection of its own for all the commits since the last one went out.
    A wake-up lost to a crash is made up for by the relay's poll."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._wanted = False
        self._sending: asyncio.Task[None] | None = None

    def committed(self) -> None:
        """Rows were committed: the relay is told soon, once for all such commits."""
        self._wanted = True
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send(), name="outbox wakeup")

    async def _send(self) -> None:
        while self._wanted:
            self._wanted = False
            try:
                async with self._engine.connect() as connection:
                    # On the driver's connection: a statement of its own, no transaction.
                    raw = await connection.get_raw_connection()
                    await raw.driver_connection.execute(  # type: ignore[union-attr]
                        "SELECT pg_notify($1, '')", OUTBOX_CHANNEL
                    )
            except Exception:
                log.warning("outbox wakeup not sent; the relay's poll will find the rows")
                return

    async def close(self) -> None:
        """Sends what is pending."""
        if self._sending is not None:
            await self._sending


class OutboxRelay:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        js: JetStreamContext,
        batch_size: int = 256,
        poll_interval_s: float = 1.0,
        max_payload: int | None = None,
        takeover_interval_s: float = 2.0,
    ) -> None:
        self._engine = engine
        self._js = js
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        # The server's limit (`nc.max_payload`); None: only the client's own check applies.
        self._max_payload = max_payload
        self._takeover_interval_s = takeover_interval_s
        self._wake = asyncio.Event()
        # Whether this relay holds the leader lock now.
        self.leading = False
        # Rows this relay has published and set aside since it started.
        self.published = 0
        self.dead_lettered = 0

    async def run(self) -> None:
        """Publishes while this relay leads, stands by while another one does; until cancelled."""
        while True:
            try:
                async with self._engine.connect() as connection:
                    if await _take_lead(connection):
                        try:
                            await self._lead(connection)
                        finally:
                            self.leading = False
                            # Closing the connection releases the lock at once, whatever state
                            # the connection is in; the pool opens a new one when needed.
                            await connection.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay lost its database connection; trying again")
            await asyncio.sleep(self._takeover_interval_s)

    async def _lead(self, connection: AsyncConnection) -> None:
        """Relays on `connection`, which holds the lock; returns when it is lost."""
        self.leading = True
        log.info("outbox relay leads")
        async with self._listening(connection):
            while True:
                try:
                    published = await self._publish_batch(connection)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    if not await _holds_lead(connection):
                        log.warning("outbox relay lost the lead with its database connection")
                        return
                    log.exception("outbox publish failed; retrying")
                    await asyncio.sleep(self._poll_interval_s)
                    continue
                if published == self._batch_size:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)
                self._wake.clear()

    async def publish_pending(self) -> int:
        """Publishes one batch of committed rows; returns how many left the outbox
        (published or set aside). Raises when a row failed for a passing reason, after
        the rest of its batch was settled. Takes no lead: for a single relay (tests, a
        drain of a backlog)."""
        async with self._engine.connect() as connection:
            return await self._publish_batch(connection)

    async def _publish_batch(self, connection: AsyncConnection) -> int:
        async with connection.begin():
            rows = (
                await connection.execute(
                    select(
                        outbox.c.id,
                        outbox.c.subject,
                        outbox.c.payload,
                        outbox.c.msg_id,
                        outbox.c.create_time,
                        outbox.c.failures,
                        outbox.c.traceparent,
                    )
                    .order_by(outbox.c.id)
                    .limit(self._batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # Pipelined: one round trip for the batch instead of one per message.
            results = await asyncio.gather(
                *(self._publish(row) for row in rows), return_exceptions=True
            )
            done: list[int] = []
            dead: list[tuple[Any, str]] = []
            retry: list[tuple[Any, BaseException]] = []
            for row, result in zip(rows, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if result is None:
                    done.append(row.id)
                elif isinstance(result, Unpublishable):
                    dead.append((row, str(result)))
                else:
                    retry.append((row, result))
            if done and retry:
                # Others went out: these failed for themselves.
                repeated = [(r, e) for r, e in retry if r.failures + 1 >= MAX_FAILURES]
                dead += [
                    (r, f"failed {MAX_FAILURES} times: {type(e).__name__}: {e}")
                    for r, e in repeated
                ]
                retry = [(r, e) for r, e in retry if r.failures + 1 < MAX_FAILURES]
                if retry:
                    await connection.execute(
                        update(outbox)
                        .where(outbox.c.id.in_([r.id for r, _ in retry]))
                        .values(failures=outbox.c.failures + 1)
                    )
            if dead:
                await self._set_aside(connection, dead)
            settled = done + [row.id for row, _ in dead]
            if settled:
                await connection.execute(delete(outbox).where(outbox.c.id.in_(settled)))
        self.published += len(done)
        if retry:
            row, error = retry[0]
            raise RuntimeError(
                f"{len(retry)} of {len(rows)} outbox rows were not published "
                f"(first: {row.subject} {row.msg_id}: {type(error).__name__}: {error})"
            )
        return len(settled)

    async def _publish(self, row: Any) -> None:
        headers = {"Nats-Msg-Id": row.msg_id}
        if not row.traceparent:
            # Written outside any trace: no trace to continue.
            await self._publish_with(row, headers)
            return
        # A PRODUCER span in the trace of the transaction that wrote the row: the consumer
        # of the message continues from it (its traceparent is in the headers).
        with tracing.span(
            f"publish {row.subject}",
            kind=SpanKind.PRODUCER,
            parent={tracing.TRACEPARENT: row.traceparent},
            attributes={"messaging.system": "nats", "messaging.destination.name": row.subject},
        ):
            await self._publish_with(row, tracing.inject(headers))

    async def _publish_with(self, row: Any, headers: dict[str, str]) -> None:
        size = len(row.payload)
        extra = sum(len(k) + len(v) + 4 for k, v in headers.items())
        if self._max_payload is not None and size + extra + _HEADER_OVERHEAD > self._max_payload:
            raise Unpublishable(
                f"{size} bytes with headers exceed the server's max payload of "
                f"{self._max_payload} bytes"
            )
        try:
            await self._js.publish(row.subject, row.payload, headers=headers)
        except nats_errors.MaxPayloadError as error:
            raise Unpublishable(f"{size} bytes exceed the max payload: {error}") from error
        except js_errors.BadRequestError as error:
            # JetStream refused this message (e.g. over the stream's max message size).
            raise Unpublishable(f"refused by JetStream: {error}") from error

    async def _set_aside(self, connection: AsyncConnection, dead: list[tuple[Any, str]]) -> None:
        await connection.execute(
            insert(outbox_dead_letters),
            [
                {
                    "id": row.id,
                    "subject": row.subject,
                    "msg_id": row.msg_id,
                    "payload": row.payload,
                    "size_bytes": len(row.payload),
                    "error": reason[:_ERROR_CHARS],
                    "create_time": row.create_time,
                }
                for row, reason in dead
            ],
        )
        self.dead_lettered += len(dead)
        for row, reason in dead:
            log.error(
                "outbox row cannot be published; moved to outbox_dead_letters",
                outbox_id=row.id,
                subject=row.subject,
                msg_id=row.msg_id[:_ERROR_CHARS],
                size_bytes=len(row.payload),
                reason=reason[:_ERROR_CHARS],
                dead_lettered=self.dead_lettered,
            )

    @contextlib.asynccontextmanager
    async def _listening(self, connection: AsyncConnection) -> Any:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None

        def wake(*_: object) -> None:
            self._wake.set()

        await driver.add_listener(OUTBOX_CHANNEL, wake)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                await driver.remove_listener(OUTBOX_CHANNEL, wake)


async def _take_lead(connection: AsyncConnection) -> bool:
    """Whether `connection` now holds the leader lock (session-level: it outlives the
    transaction, and ends with the connection)."""
    taken = (await connection.execute(select(func.pg_try_advisory_lock(LEADER_LOCK)))).scalar_one()
    await connection.commit()
    return bool(taken)


async def _holds_lead(connection: AsyncConnection) -> bool:
    """Whether `connection` still holds the leader lock. An invalidated connection would
    reconnect on its next use, without the lock: it is lost."""
    if connection.invalidated:
        return False
    try:
        held = await connection.execute(
            text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND pid = pg_backend_pid() AND classid = 0 AND objid = :key"
            ),
            {"key": LEADER_LOCK},
        )
        count = held.scalar_one()
        await connection.commit()
    except asyncio.CancelledError:
        raise
    except Exception:
        return False
    return bool(count)


async def pending_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one())


async def dead_letter_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(
            (
                await connection.execute(text("SELECT count(*) FROM outbox_dead_letters"))
            ).scalar_one()
        )
