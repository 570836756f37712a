"""The unit of work against real Postgres: what a use case changed is written with its
events, and only that; races end in a domain error that writes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.trained_models import handlers as model_handlers
from services.trained_models.domain import Origin, TrainedModel
from services.trained_models.unit_of_work import UnitOfWork as ModelsUnitOfWork
from services.training_runs import handlers
from services.training_runs.domain import RunState, TrainingRun
from services.training_runs.unit_of_work import UnitOfWork
from shared import outbox
from shared.db.engine import create_engine, session_factory
from shared.db.migrate import upgrade
from shared.db.schema import OUTBOX_CHANNEL
from shared.errors import AlreadyExists, Conflict
from shared.infra import Infrastructure, create_database, drop_database
from shared.messaging import Subjects
from shared.outbox import OutboxMessage, Wakeup
from shared.payloads import Progress
from shared.reports import Heartbeat

pytestmark = pytest.mark.timeout(60)

SPEC = {"architecture": "retinanet_r18_fpn", "dataset_uri": "datasets/a/annotations.json"}
# The columns a heartbeat must leave alone: the run's JSON documents.
JSON_COLUMNS = (
    "labels, spec, progress, latest_evaluation, best_evaluation, test_evaluation, dataset,"
    " artifacts, facts, epoch_metrics"
)


@pytest.fixture(scope="module")
async def engine(infrastructure: Infrastructure) -> AsyncIterator[AsyncEngine]:
    """A database of its own: no relay takes the outbox rows these tests look at."""
    name = f"raven_uow_{uuid.uuid4().hex[:10]}"
    engine = create_engine(create_database(infrastructure.database_url, name), pool_size=4)
    await upgrade(engine)
    yield engine
    await engine.dispose()
    drop_database(infrastructure.database_url, name)


@pytest.fixture(scope="module")
def uow(engine: AsyncEngine, subjects: Subjects) -> Callable[[], UnitOfWork]:
    sessions = session_factory(engine)
    return lambda: UnitOfWork(sessions, subjects)


@pytest.fixture(scope="module")
def models_uow(engine: AsyncEngine, subjects: Subjects) -> Callable[[], ModelsUnitOfWork]:
    sessions = session_factory(engine)
    return lambda: ModelsUnitOfWork(sessions, subjects)


def new_run(*, request_id: uuid.UUID | None = None, creator: str = "tests") -> TrainingRun:
    return TrainingRun.create(
        display_name="tracked",
        labels={},
        spec=SPEC,
        base_model_id=None,
        creator=creator,
        request_id=request_id,
        request_hash="hash",
        now=datetime.now(UTC),
    )


async def stored(uow: Callable[[], UnitOfWork], run: TrainingRun) -> TrainingRun:
    unit = uow()
    async with unit:
        unit.runs.add(run)
        await unit.commit()
    return run


async def scalar(engine: AsyncEngine, sql: str, **params: object) -> object:
    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).scalar_one()


async def outbox_ids(engine: AsyncEngine, like: str) -> list[str]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT msg_id FROM outbox WHERE msg_id LIKE :p ORDER BY id"), {"p": like}
        )
        return [r.msg_id for r in rows]


async def test_a_loaded_run_that_changed_is_written_with_its_events(uow, engine):
    run = await stored(uow, new_run())
    unit = uow()
    async with unit:
        loaded = await unit.runs.get(run.id, for_update=True)
        assert loaded is not None
        loaded.request_cancel(reason="enough", actor="tests", now=datetime.now(UTC))
        # Nothing names the run to the unit of work: it saw it load.
        await unit.commit()

    state = await scalar(engine, "SELECT state FROM training_runs WHERE id = :id", id=run.id)
    assert state == RunState.CANCELLED.value
    events = await scalar(
        engine, "SELECT count(*) FROM training_run_events WHERE run_id = :id", id=run.id
    )
    assert events == 2  # queued, cancelled
    assert await outbox_ids(engine, f"%{run.id}.2") == [
        f"run_event.{run.id}.2",
        f"run_state.{run.id}.2",
        f"training_run.cancelled.{run.id}.2",
    ]


async def test_a_run_loaded_twice_is_one_object_and_an_unchanged_one_is_not_written(uow, engine):
    run = await stored(uow, new_run())
    before = await scalar(engine, "SELECT xmin::text FROM training_runs WHERE id = :id", id=run.id)
    unit = uow()
    async with unit:
        first = await unit.runs.get(run.id)
        assert first is not None
        assert await unit.runs.get(run.id, for_update=True) is first
        await unit.commit()
    # No UPDATE ran: the row version is the one the insert wrote.
    after = await scalar(engine, "SELECT xmin::text FROM training_runs WHERE id = :id", id=run.id)
    assert after == before


async def test_a_stale_version_is_a_conflict_and_writes_nothing(uow, engine):
    run = await stored(uow, new_run())
    slow, fast = uow(), uow()
    async with slow:
        stale = await slow.runs.get(run.id)
        assert stale is not None
        async with fast:
            current = await fast.runs.get(run.id)
            assert current is not None
            current.rename(display_name="renamed", labels=None, now=datetime.now(UTC))
            await fast.commit()
        stale.request_cancel(reason="too late", actor="tests", now=datetime.now(UTC))
        with pytest.raises(Conflict):
            await slow.commit()

    row = await scalar(
        engine, "SELECT display_name || ' ' || state FROM training_runs WHERE id = :id", id=run.id
    )
    assert row == "renamed QUEUED"
    events = await scalar(
        engine, "SELECT count(*) FROM training_run_events WHERE run_id = :id", id=run.id
    )
    assert events == 1
    assert await outbox_ids(engine, f"training_run.cancelled.{run.id}.%") == []


async def test_a_duplicate_insert_is_already_exists_and_the_unit_of_work_goes_on(uow, engine):
    request_id = uuid.uuid4()
    first = await stored(uow, new_run(request_id=request_id))
    again = new_run(request_id=request_id)
    unit = uow()
    async with unit:
        unit.runs.add(again)
        with pytest.raises(AlreadyExists):
            await unit.commit()
        # The same transaction answers, and commits what the use case does next.
        existing = await unit.runs.get_by_request("tests", request_id)
        assert existing is not None and existing.id == first.id
        existing.rename(display_name="the first", labels=None, now=datetime.now(UTC))
        await unit.commit()

    name = await scalar(
        engine, "SELECT display_name FROM training_runs WHERE id = :id", id=first.id
    )
    assert name == "the first"
    assert await outbox_ids(engine, f"%{again.id}%") == []
    count = await scalar(engine, "SELECT count(*) FROM training_runs WHERE id = :id", id=again.id)
    assert count == 0


def heartbeat_report(
    run: TrainingRun, event_id: str, *, attempt: int, worker_id: str, time: datetime
) -> handlers.WorkerReport:
    return handlers.WorkerReport(
        event_id=event_id,
        run_id=run.id,
        attempt=attempt,
        worker_id=worker_id,
        time=time,
        payload=Heartbeat(),
    )


async def test_a_heartbeat_names_no_json_column(uow, engine):
    run = await stored(uow, new_run())
    claim = await handlers.claim_job(uow(), run.id, attempt=1, worker_id="w1", max_attempts=3)
    assert claim.granted
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE json_writes (run_id uuid)"))
        await connection.execute(
            text(
                "CREATE FUNCTION log_json_write() RETURNS trigger AS $$ BEGIN"
                " INSERT INTO json_writes VALUES (NEW.id); RETURN NEW; END $$ LANGUAGE plpgsql"
            )
        )
        # Fires for an UPDATE that sets any of these columns, changed or not.
        await connection.execute(
            text(
                f"CREATE TRIGGER json_write AFTER UPDATE OF {JSON_COLUMNS} ON training_runs"
                " FOR EACH ROW EXECUTE FUNCTION log_json_write()"
            )
        )
    try:
        beat = datetime.now(UTC) + timedelta(seconds=5)
        report = heartbeat_report(run, "beat-1", attempt=1, worker_id="w1", time=beat)
        assert await handlers.apply_worker_report(uow(), report)
        heartbeat = await scalar(
            engine, "SELECT heartbeat_time FROM training_runs WHERE id = :id", id=run.id
        )
        assert heartbeat == beat
        assert await scalar(engine, "SELECT count(*) FROM json_writes") == 0
        # A stale attempt's heartbeat changes nothing.
        stale = heartbeat_report(run, "beat-2", attempt=2, worker_id="w0", time=beat)
        assert not await handlers.apply_worker_report(uow(), stale)
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("DROP TRIGGER json_write ON training_runs"))
            await connection.execute(text("DROP FUNCTION log_json_write()"))
            await connection.execute(text("DROP TABLE json_writes"))


async def test_a_change_writes_only_its_columns_and_keeps_a_concurrent_one(uow, engine):
    run = await stored(uow, new_run())
    await handlers.claim_job(uow(), run.id, attempt=1, worker_id="w1", max_attempts=3)
    beating, reporting = uow(), uow()
    async with beating:
        alive = await beating.runs.get(run.id)
        assert alive is not None
        alive.heartbeat(now=datetime.now(UTC))
        # Progress does not change the version: only the columns written tell them apart.
        async with reporting:
            busy = await reporting.runs.get(run.id)
            assert busy is not None
            busy.report_progress(Progress(epoch=1, iteration=3), actor="w1", now=datetime.now(UTC))
            await reporting.commit()
        await beating.commit()

    progress = await scalar(engine, "SELECT progress FROM training_runs WHERE id = :id", id=run.id)
    assert progress == {"epoch": 1, "iteration": "3"}


def new_model(*, request_id: uuid.UUID | None = None) -> TrainedModel:
    now = datetime.now(UTC)
    return TrainedModel(
        id=uuid.uuid4(),
        display_name="imported",
        architecture="retinanet_r18_fpn",
        classes=["a"],
        artifacts=[],
        creator="tests",
        origin=Origin.IMPORT,
        request_id=request_id,
        create_time=now,
        update_time=now,
    )


async def test_a_model_is_announced_as_added_then_as_changed(models_uow, engine):
    request_id = uuid.uuid4()
    model = new_model(request_id=request_id)
    unit = models_uow()
    async with unit:
        unit.models.add(model)
        await unit.commit()
    edit = model_handlers.Edit(
        display_name="", description="described", labels={}, fields=frozenset({"description"})
    )
    edited = await model_handlers.update_model(models_uow(), model.id, edit)
    assert edited.version == 2
    assert await outbox_ids(engine, f"trained_model.%.{model.id}%") == [
        f"trained_model.created.{model.id}",
        f"trained_model.updated.{model.id}.2",
    ]

    # The same request_id again: the commit says so, and the unit of work still reads.
    async with unit:
        unit.models.add(new_model(request_id=request_id))
        with pytest.raises(AlreadyExists):
            await unit.commit()
        found = await unit.models.get_by_request("tests", request_id)
        assert found is not None and found.description == "described"


async def test_a_stale_model_is_a_conflict(models_uow, engine):
    model = new_model()
    unit = models_uow()
    async with unit:
        unit.models.add(model)
        await unit.commit()
    slow = models_uow()
    async with slow:
        stale = await slow.models.get(model.id)
        assert stale is not None
        async with engine.begin() as connection:
            await connection.execute(
                text("UPDATE trained_models SET version = version + 1 WHERE id = :id"),
                {"id": model.id},
            )
        stale.edit(now=datetime.now(UTC), description="lost")
        with pytest.raises(Conflict):
            await slow.commit()
    assert await outbox_ids(engine, f"trained_model.updated.{model.id}%") == []


async def test_with_a_wakeup_the_relay_is_notified_after_the_commit_not_within_it(
    engine: AsyncEngine, subjects: Subjects
) -> None:
    """A NOTIFY in the writing transaction would make its commit wait for every other
    notifying commit: with a Wakeup the transaction sends none, and one comes after it."""
    payloads: asyncio.Queue[str] = asyncio.Queue()
    async with engine.connect() as listening:
        raw = await listening.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        await driver.add_listener(OUTBOX_CHANNEL, lambda *args: payloads.put_nowait(args[3]))

        async def notify(payload: str) -> None:
            async with engine.begin() as connection:
                await connection.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": OUTBOX_CHANNEL, "payload": payload},
                )

        message = OutboxMessage(subject=subjects.audit_recorded, payload=b"x", msg_id="wakeup-1")
        async with session_factory(engine)() as session, session.begin():
            await outbox.add(session, [message], notify=False)
        await notify("after")
        # Notifications arrive in commit order: the write's own would have come first.
        assert await asyncio.wait_for(payloads.get(), 10) == "after"

        wakeup = Wakeup(engine)
        uow = UnitOfWork(session_factory(engine), subjects, wakeup=wakeup)
        async with uow:
            uow.publish(replace(message, msg_id="wakeup-2"))
            await uow.commit()
        await wakeup.close()
        assert await asyncio.wait_for(payloads.get(), 10) == ""
