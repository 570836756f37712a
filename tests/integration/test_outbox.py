"""The transactional outbox against real Postgres and JetStream."""

from __future__ import annotations

import uuid

import nats
import pytest
from sqlalchemy import text

from shared import outbox
from shared.db.engine import create_engine, session_factory
from shared.db.migrate import upgrade
from shared.infra import Infrastructure, create_database, drop_database
from shared.messaging import Subjects
from shared.outbox import OutboxMessage, OutboxRelay, pending_count

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
