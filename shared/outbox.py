"""Transactional outbox: messages are written with the change they announce and
published to JetStream afterwards, so none is lost to a crash between the two.

`add` runs inside the caller's transaction. `OutboxRelay` publishes committed
rows in id order with `Nats-Msg-Id` = the row's msg_id (JetStream drops a
duplicate within its window, e.g. after a crash between publish and delete),
then deletes them. Several relays may run: `SKIP LOCKED` hands each row to one.
The relay wakes on a NOTIFY sent by the committing transaction and polls slowly
as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from nats.js import JetStreamContext
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from shared.db.schema import OUTBOX_CHANNEL, outbox

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    subject: str
    payload: bytes
    # Deduplication key: the same logical message always gets the same msg_id.
    msg_id: str


async def add(session: AsyncSession, messages: Sequence[OutboxMessage]) -> None:
    """Writes messages in the session's transaction; they are published after it commits."""
    if not messages:
        return
    await session.execute(
        insert(outbox),
        [{"subject": m.subject, "payload": m.payload, "msg_id": m.msg_id} for m in messages],
    )
    await session.execute(select(func.pg_notify(OUTBOX_CHANNEL, "")))


class OutboxRelay:
    def __init__(
        self,
        *,
        engine: AsyncEngine,
        js: JetStreamContext,
        batch_size: int = 256,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._engine = engine
        self._js = js
        self._batch_size = batch_size
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Publishes until cancelled."""
        async with self._listening():
            while True:
                try:
                    published = await self.publish_pending()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("outbox publish failed; retrying")
                    await asyncio.sleep(self._poll_interval_s)
                    continue
                if published == self._batch_size:
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)
                self._wake.clear()

    async def publish_pending(self) -> int:
        """Publishes one batch of committed rows; returns how many."""
        async with self._engine.begin() as connection:
            rows = (
                await connection.execute(
                    select(outbox.c.id, outbox.c.subject, outbox.c.payload, outbox.c.msg_id)
                    .order_by(outbox.c.id)
                    .limit(self._batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            # Pipelined: one round trip for the batch instead of one per message.
            acks = [
                self._js.publish(row.subject, row.payload, headers={"Nats-Msg-Id": row.msg_id})
                for row in rows
            ]
            await asyncio.gather(*acks)
            await connection.execute(delete(outbox).where(outbox.c.id.in_([r.id for r in rows])))
        return len(rows)

    @contextlib.asynccontextmanager
    async def _listening(self) -> Any:
        async with self._engine.connect() as connection:
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


async def pending_count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text("SELECT count(*) FROM outbox"))).scalar_one())
