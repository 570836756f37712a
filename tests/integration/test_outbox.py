"""The transactional outbox against real Postgres and JetStream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

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


@contextlib.asynccontextmanager
async def _two_relays(engine, js: nats.js.JetStreamContext) -> AsyncIterator[list[OutboxRelay]]:
    """Two relays as two service processes run them: each with an engine of its own."""
    other = create_engine(engine.url.render_as_string(hide_password=False), pool_size=2)
    relays = [
        OutboxRelay(engine=e, js=js, poll_interval_s=0.05, takeover_interval_s=0.1)
        for e in (engine, other)
    ]
    tasks = [asyncio.create_task(relay.run()) for relay in relays]
    try:
        await eventually(lambda: _one_leads(relays))
        yield relays
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await other.dispose()


async def _one_leads(relays: list[OutboxRelay]) -> bool:
    return sum(relay.leading for relay in relays) == 1


async def _commit_one_by_one(engines, subjects: Subjects, run_id: str, numbers: range) -> None:
    """One transaction per event, from each process in turn, as a run's changes commit."""
    for n in numbers:
        engine = engines[n % len(engines)]
        async with session_factory(engine)() as session, session.begin():
            await outbox.add(session, [_message(subjects, run_id, n)])


async def _all_stored(js, subjects: Subjects, run_id: str, count: int) -> list[bytes]:
    async def stored() -> list[bytes]:
        found = await _stored(js, subjects, run_id)
        return found if len(found) >= count else []

    return await eventually(stored, timeout=20)


async def _lock_holder(engine) -> int | None:
    async with engine.connect() as connection:
        held = await connection.execute(
            text(
                # Advisory locks belong to a database: other databases of the server
                # (other test sessions) hold their own.
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND classid = 0 AND objid = :key"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"key": outbox.LEADER_LOCK},
        )
        return held.scalar_one_or_none()


async def test_two_relays_publish_a_runs_events_in_sequence_order_through_one_leader(
    engine, nc, subjects
):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    async with _two_relays(engine, js) as relays:
        engines = [relay._engine for relay in relays]
        await _commit_one_by_one(engines, subjects, run_id, range(120))
        stored = await _all_stored(js, subjects, run_id, 120)
        assert stored == [f"event {n}".encode() for n in range(120)]
        # One relay published everything; the other stood by.
        assert sorted(relay.published > 0 for relay in relays) == [False, True]
        assert await _one_leads(relays)


async def test_the_other_relay_takes_over_when_the_leader_stops(engine, nc, subjects):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    other = create_engine(engine.url.render_as_string(hide_password=False), pool_size=2)
    first = OutboxRelay(engine=engine, js=js, poll_interval_s=0.05, takeover_interval_s=0.1)
    second = OutboxRelay(engine=other, js=js, poll_interval_s=0.05, takeover_interval_s=0.1)
    leader = asyncio.create_task(first.run())
    standby = asyncio.create_task(second.run())
    try:
        await eventually(lambda: _one_leads([first]))
        await _commit_one_by_one([engine], subjects, run_id, range(20))
        await _all_stored(js, subjects, run_id, 20)
        assert not second.leading and second.published == 0
        # The leader's process ends: its connection closes and the lock with it.
        leader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await leader
        await _commit_one_by_one([other], subjects, run_id, range(20, 40))
        stored = await _all_stored(js, subjects, run_id, 40)
        assert stored == [f"event {n}".encode() for n in range(40)]
        assert second.leading and second.published == 20
    finally:
        for task in (leader, standby):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await other.dispose()


async def test_a_relay_leads_again_when_the_leaders_connection_dies(engine, nc, subjects):
    js = nc.jetstream()
    run_id = uuid.uuid4().hex
    async with _two_relays(engine, js) as relays:
        engines = [relay._engine for relay in relays]
        killed = await _lock_holder(engine)
        assert killed is not None
        # Events keep committing while the leader's connection is killed under it.
        writing = asyncio.create_task(_commit_one_by_one(engines, subjects, run_id, range(80)))
        await eventually(lambda: _stored(js, subjects, run_id))
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": killed})
        await writing
        stored = await _all_stored(js, subjects, run_id, 80)
        # In sequence order, each once: the old leader's last batch and its resend by the
        # new leader are one copy (Nats-Msg-Id), and the lead never publishes twice.
        assert stored == [f"event {n}".encode() for n in range(80)]
        holder = await eventually(lambda: _lock_holder(engine))
        assert holder != killed
        await eventually(lambda: _one_leads(relays))
