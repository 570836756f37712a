"""The transactional outbox against real Postgres and JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import nats
import pytest
from sqlalchemy import text

from shared import outbox
from shared.db.engine import create_engine, session_factory
from shared.db.migrate import upgrade
from shared.infra import Infrastructure, create_database, drop_database
from shared.messaging import Subjects
from shared.outbox import OutboxMessage, OutboxRelay, dead_letter_count, pending_count
from tests.support import eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def engine(infrastructure: Infrastructure):
    """A database of its own: no service's relay publishes these rows behind the test's back."""
    name = f"raven_outbox_{uuid.uuid4().hex[:10]}"
    engine = create_engine(create_database(infrastructure.database_url, name), pool_size=2)
    await upgrade(engine)
    yield engine
    await engine.dispose()
    drop_database(infrastructure.database_url, name)


def _message(subjects: Subjects, run_id: str, n: int) -> OutboxMessage:
    return OutboxMessage(
        subject=subjects.run_event(run_id),
        payload=f"event {n}".encode(),
        msg_id=f"test.{run_id}.{n}",
    )


async def _stored(js: nats.js.JetStreamContext, subjects: Subjects, run_id: str) -> list[bytes]:
    info = await js.stream_info(subjects.events_stream, subjects_filter=subjects.run_event(run_id))
    count = (info.state.subjects or {}).get(subjects.run_event(run_id), 0)
    if not count:
        return []
    sub = await js.subscribe(subjects.run_event(run_id), ordered_consumer=True)
    data = [(await sub.next_msg(timeout=2)).data for _ in range(count)]
    await sub.unsubscribe()
    return data


async def test_rows_committed_before_a_crash_are_published_by_the_next_relay(engine, nc, subjects):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    # The process commits and dies before any relay runs: only the rows remain.
    async with session_factory(engine)() as session, session.begin():
        await outbox.add(session, [_message(subjects, run_id, n) for n in range(3)])

    # A relay that was not running at commit time (a restarted process) publishes them.
    relay = OutboxRelay(engine=engine, js=js)
    while await relay.publish_pending():
        pass
    assert await _stored(js, subjects, run_id) == [b"event 0", b"event 1", b"event 2"]
    async with engine.connect() as connection:
        left = await connection.execute(
            text("SELECT count(*) FROM outbox WHERE msg_id LIKE :p"), {"p": f"test.{run_id}.%"}
        )
        assert left.scalar_one() == 0


async def test_a_republished_row_is_stored_once(engine, nc, subjects):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    message = _message(subjects, run_id, 0)
    # The relay published, then died before deleting the row...
    await js.publish(message.subject, message.payload, headers={"Nats-Msg-Id": message.msg_id})
    async with session_factory(engine)() as session, session.begin():
        await outbox.add(session, [message])
    # ...so the next relay publishes it again: JetStream keeps one copy.
    relay = OutboxRelay(engine=engine, js=js)
    while await relay.publish_pending():
        pass
    assert await _stored(js, subjects, run_id) == [b"event 0"]


async def test_a_rolled_back_transaction_publishes_nothing(engine, nc, subjects):
    run_id = uuid.uuid4().hex
    before = await pending_count(engine)
    async with session_factory(engine)() as session:
        async with session.begin():
            await outbox.add(session, [_message(subjects, run_id, 0)])
            await session.rollback()
    assert await pending_count(engine) == before


async def _dead_letters(engine, run_id: str) -> list[dict[str, object]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT msg_id, size_bytes, error FROM outbox_dead_letters "
                "WHERE msg_id LIKE :p ORDER BY id"
            ),
            {"p": f"test.{run_id}.%"},
        )
        return [dict(r) for r in rows.mappings()]


@pytest.mark.parametrize("checked_by", ["relay", "client"])
async def test_a_row_over_the_max_payload_is_set_aside_and_the_others_are_published(
    engine, nc, subjects, checked_by
):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    limit = nc.max_payload
    # Written as any process writes rows, however it came to be this large.
    oversized = OutboxMessage(
        subject=subjects.run_event(run_id), payload=b"x" * (limit + 1), msg_id=f"test.{run_id}.big"
    )
    async with session_factory(engine)() as session, session.begin():
        await outbox.add(session, [_message(subjects, run_id, 0), oversized])
    # With the server's limit the relay sees it first; without, the NATS client refuses it.
    relay = OutboxRelay(
        engine=engine,
        js=js,
        poll_interval_s=0.05,
        max_payload=limit if checked_by == "relay" else None,
    )
    task = asyncio.create_task(relay.run())
    try:
        # A row committed after the poisoned one still goes out.
        async with session_factory(engine)() as session, session.begin():
            await outbox.add(session, [_message(subjects, run_id, 1)])

        async def published() -> list[bytes]:
            stored = await _stored(js, subjects, run_id)
            return stored if len(stored) == 2 else []

        assert await eventually(published, timeout=10) == [b"event 0", b"event 1"]
        [dead] = await eventually(lambda: _dead_letters(engine, run_id))
        assert dead["msg_id"] == oversized.msg_id and dead["size_bytes"] == limit + 1
        assert "max payload" in str(dead["error"])
        assert relay.dead_lettered == 1
        assert await _left(engine, run_id) == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await dead_letter_count(engine) >= 1


async def _left(engine, run_id: str) -> int:
    async with engine.connect() as connection:
        left = await connection.execute(
            text("SELECT count(*) FROM outbox WHERE msg_id LIKE :p"), {"p": f"test.{run_id}.%"}
        )
        return int(left.scalar_one())


async def test_a_row_that_keeps_failing_while_others_publish_is_set_aside(engine, nc, subjects):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    # No stream takes this subject: its publish fails each time, the others' do not.
    stray = OutboxMessage(
        subject=f"nowhere.{run_id}", payload=b"lost", msg_id=f"test.{run_id}.stray"
    )
    async with session_factory(engine)() as session, session.begin():
        await outbox.add(session, [stray])
    relay = OutboxRelay(engine=engine, js=js)
    for n in range(outbox.MAX_FAILURES):
        async with session_factory(engine)() as session, session.begin():
            await outbox.add(session, [_message(subjects, run_id, n)])
        if n < outbox.MAX_FAILURES - 1:
            with pytest.raises(RuntimeError, match="1 of 2 outbox rows were not published"):
                await relay.publish_pending()
        else:
            assert await relay.publish_pending() == 2
    assert await _stored(js, subjects, run_id) == [
        f"event {n}".encode() for n in range(outbox.MAX_FAILURES)
    ]
    [dead] = await _dead_letters(engine, run_id)
    assert dead["msg_id"] == stray.msg_id and "failed 5 times" in str(dead["error"])
    assert await _left(engine, run_id) == 0
