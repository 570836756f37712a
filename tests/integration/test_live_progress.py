"""Progress at fleet scale (docs/events.md, "Progress and durable facts"): progress reports
reach live watchers without a database round trip, and are recorded many runs to a
transaction, while every durable fact keeps its sequence without gaps."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest
from sqlalchemy import select, text

from services.training_runs import handlers
from services.training_runs.consumer import to_report
from services.training_runs.progress import ProgressRecorder
from services.training_runs.unit_of_work import UnitOfWork
from shared.db.engine import create_engine, session_factory
from shared.db.schema import training_run_events
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually

TrainingRun = training_run_pb2.TrainingRun
Event = training_run_pb2.TrainingRunEvent
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
async def engine(settings: Settings, training_runs):
    engine = create_engine(settings.database_url, pool_size=4)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
def uow_factory(engine, subjects):
    sessions = session_factory(engine)
    return lambda: UnitOfWork(sessions, subjects)


async def running(runs, js, subjects, dataset_uri) -> tuple[TrainingRun, WorkerDriver]:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))

    async def is_running() -> TrainingRun | None:
        got = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        return got if got.state == TrainingRun.RUNNING else None

    return await eventually(is_running), worker


def progress(iteration: int) -> training_run_pb2.Progress:
    return training_run_pb2.Progress(epoch=1, iteration=iteration, max_iterations=100, loss=1.0)


class Stream:
    """A WatchTrainingRun call read in the background, its events as they arrive."""

    def __init__(self, call: grpc.aio.UnaryStreamCall) -> None:
        self.call = call
        self.events: list[Event] = []
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for event in self.call:
            async with self._arrived:
                self.events.append(event)
                self._arrived.notify_all()

    async def until(self, found, timeout: float = 20.0) -> Event:  # noqa: ASYNC109
        """The first event that `found` accepts, waiting for it."""
        async with asyncio.timeout(timeout), self._arrived:
            while True:
                match = next((e for e in self.events if found(e)), None)
                if match is not None:
                    return match
                await self._arrived.wait()

    async def to_the_end(self) -> list[Event]:
        await asyncio.wait_for(self._reader, 30)
        return self.events


@pytest.fixture
async def watch(runs) -> AsyncIterator:
    streams: list[Stream] = []

    def open_stream(name: str, *, live: bool) -> Stream:
        request = training_run_pb2.WatchTrainingRunRequest(name=name, live_progress=live)
        stream = Stream(runs.WatchTrainingRun(request))
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.call.cancel()


def reached(state: int):
    return lambda e: e.HasField("state_changed") and e.state_changed.to_state == state


async def watching(stream: Stream) -> None:
    """Until the watcher has replayed the history up to RUNNING: it follows the run now."""
    await stream.until(reached(TrainingRun.RUNNING))


def is_live_progress(iteration: int):
    return lambda e: e.live and e.progress.iteration == iteration


async def test_live_progress_arrives_while_its_recording_is_held_up(
    runs, js, subjects, dataset_uri, engine
):
    """The run's row is locked by another transaction, so no report of it can be
    recorded: a live watcher still gets the progress, a plain one gets nothing yet;
    once the lock goes, the entry follows for both, in sequence."""
    run, worker = await running(runs, js, subjects, dataset_uri)
    live = Stream(
        runs.WatchTrainingRun(
            training_run_pb2.WatchTrainingRunRequest(name=run.name, live_progress=True)
        )
    )
    watch_stream = Stream(
        runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
    )
    try:
        await watching(live)
        await watching(watch_stream)
        last_entry = live.events[-1].sequence

        async with engine.connect() as blocker:
            await blocker.execute(
                text("SELECT id FROM training_runs WHERE id = :id FOR UPDATE"),
                {"id": uuid.UUID(run.name.split("/")[1])},
            )
            await worker.send(progress=progress(7))
            ahead = await live.until(is_live_progress(7))
            # Not an entry: it carries the sequence of the last entry sent before it.
            assert ahead.sequence == last_entry
            assert ahead.attempt == run.attempt
            assert ahead.actor == "worker:test-worker"
            assert ahead.HasField("time")
            assert ahead.progress.max_iterations == 100
            got = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
            assert got.progress.iteration != 7, "recorded through a locked row?"
            assert not any(e.HasField("progress") for e in watch_stream.events)
            await blocker.rollback()

        def entry(e: Event) -> bool:
            return not e.live and e.progress.iteration == 7

        recorded = await live.until(entry)
        assert recorded.sequence == last_entry + 1
        assert (await watch_stream.until(entry)).sequence == last_entry + 1
        await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))
        seen = await live.to_the_end()
        plain = await watch_stream.to_the_end()
    finally:
        live.call.cancel()
        watch_stream.call.cancel()

    entries = [e for e in seen if not e.live]
    assert [e.sequence for e in entries] == list(range(1, len(entries) + 1))
    assert list(plain) == entries
    assert not any(e.live for e in plain)
    assert seen.index(ahead) < seen.index(recorded)


async def test_a_stale_attempt_or_an_old_iteration_sends_no_live_progress(
    runs, js, subjects, dataset_uri, watch
):
    run, worker = await running(runs, js, subjects, dataset_uri)
    stream = watch(run.name, live=True)
    await watching(stream)
    await worker.send(progress=progress(10))
    await stream.until(is_live_progress(10))
    # One publisher, one connection: NATS keeps their order, so the last one arriving
    # live means the ones before it were considered and held back.
    await worker.send(progress=progress(20), attempt=run.attempt + 1)  # not this attempt's
    await worker.send(progress=progress(5))  # older than what was sent
    await worker.send(progress=progress(10))  # the same again
    await worker.send(progress=progress(11))
    await stream.until(is_live_progress(11))
    await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))
    events = await stream.to_the_end()
    assert [e.progress.iteration for e in events if e.live] == [10, 11]
    # The durable path refused the same reports: only 10 and 11 were recorded.
    assert [e.progress.iteration for e in events if not e.live and e.HasField("progress")] == [
        10,
        11,
    ]


async def test_progress_of_many_runs_is_recorded_in_one_transaction(
    runs, js, subjects, dataset_uri, engine, uow_factory
):
    """While a batch waits on a locked run, the reports of 29 other runs queue up behind
    it and are recorded together, each once, with the next sequence of its run."""
    started = [await running(runs, js, subjects, dataset_uri) for _ in range(30)]
    reports = [
        to_report(
            worker_pb2.WorkerEvent(
                event_id=uuid.uuid4().hex,
                training_run=run.name,
                attempt=run.attempt,
                worker_id="test-worker",
                progress=progress(50 + i),
            )
        )
        for i, (run, _) in enumerate(started)
    ]
    batches: list[int] = []
    recorder = ProgressRecorder(
        lambda batch: handlers.apply_progress_reports(uow_factory(), batch),
        on_batch=batches.append,
    )
    first_id = reports[0].run_id
    async with engine.connect() as blocker:
        await blocker.execute(
            text("SELECT id FROM training_runs WHERE id = :id FOR UPDATE"), {"id": first_id}
        )
        first = asyncio.create_task(recorder.record(reports[0]))

        async def waits_on_the_lock() -> bool:
            async with engine.connect() as probe:
                waiting = await probe.scalar(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE wait_event_type = 'Lock' AND query LIKE '%training_runs%'"
                    )
                )
            return bool(waiting)

        await eventually(waits_on_the_lock)
        rest = [asyncio.create_task(recorder.record(r)) for r in reports[1:]]
        await asyncio.sleep(0)
        assert not any(task.done() for task in [first, *rest])
        await blocker.rollback()
    applied = await asyncio.wait_for(asyncio.gather(first, *rest), 30)
    assert applied == [True] * 30
    assert batches == [1, 29]

    for i, (run, _) in enumerate(started):
        got = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        assert got.progress.iteration == 50 + i
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                select(training_run_events.c.run_id, training_run_events.c.sequence)
                .where(training_run_events.c.run_id.in_([r.run_id for r in reports]))
                .order_by(training_run_events.c.run_id, training_run_events.c.sequence)
            )
        ).all()
    by_run: dict[uuid.UUID, list[int]] = {}
    for run_id, sequence in rows:
        by_run.setdefault(run_id, []).append(sequence)
    # created, preparing, running, then the progress entry: no gap, nothing twice.
    assert all(sequences == [1, 2, 3, 4] for sequences in by_run.values()), by_run
    assert len(by_run) == 30

    # The same reports again (a redelivery) change nothing.
    assert await recorder.record(reports[5]) is False
    for _, worker in started:  # no run left for the lost-worker recovery of other tests
        await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))


async def test_a_burst_from_a_fleet_is_recorded_and_watched_to_its_latest_progress(
    runs, js, subjects, dataset_uri, watch
):
    """Forty runs, five ticks each, published as fast as the workers can: each run ends
    with its latest progress recorded, and each live watcher got every entry in order."""
    started = [await running(runs, js, subjects, dataset_uri) for _ in range(40)]
    streams = [watch(run.name, live=True) for run, _ in started]
    for stream in streams:
        await watching(stream)

    async def ticks(worker: WorkerDriver) -> None:
        for iteration in range(1, 6):
            await worker.send(progress=progress(iteration))
        await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))

    await asyncio.gather(*(ticks(worker) for _, worker in started))
    for stream, (run, _) in zip(streams, started, strict=True):
        events = await stream.to_the_end()
        entries = [e for e in events if not e.live]
        assert [e.sequence for e in entries] == list(range(1, len(entries) + 1))
        assert [e.progress.iteration for e in entries if e.HasField("progress")] == [1, 2, 3, 4, 5]
        live = [e.progress.iteration for e in events if e.live]
        assert live == sorted(set(live))
        got = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        assert got.progress.iteration == 5
        assert got.state == TrainingRun.FAILED
