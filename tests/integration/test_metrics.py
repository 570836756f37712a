"""Each service's /metrics, scraped over HTTP after driving runs through the real stack,
and the queue position GetTrainingRun reports."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from services.training_runs import handlers
from services.training_runs.unit_of_work import UnitOfWork
from shared.consumer import consume
from shared.db.engine import create_engine, session_factory
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from shared.runtime import ServiceApp
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(90)
RUNS_SERVICE = "raven.training.v1.TrainingRunService"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()


async def scrape(app: ServiceApp) -> Samples:
    assert app.metrics_port, "the service serves no /metrics"
    status, content_type, body = await asyncio.to_thread(_get, app.metrics_port)
    assert status == 200 and content_type.startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(samples: Samples, method: str, code: str) -> float:
    return value(
        samples,
        "raven_grpc_server_handled_total",
        grpc_service=RUNS_SERVICE,
        grpc_method=method,
        grpc_code=code,
    )


def latency_bucket(samples: Samples, method: str, le: str) -> float:
    return value(
        samples,
        "raven_grpc_server_handling_seconds_bucket",
        grpc_service=RUNS_SERVICE,
        grpc_method=method,
        le=le,
    )


async def get(runs, name: str) -> TrainingRun:
    return await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))


async def in_state(runs, name: str, state: int) -> TrainingRun:
    async def probe() -> TrainingRun | None:
        run = await get(runs, name)
        return run if run.state == state else None

    return await eventually(probe)


async def until(app: ServiceApp, check) -> Samples:
    async def probe() -> Samples | None:
        samples = await scrape(app)
        return samples if check(samples) else None

    return await eventually(probe)


async def test_rpcs_are_counted_by_method_and_status_with_latencies(
    training_runs, runs, dataset_uri
) -> None:
    before = await scrape(training_runs)
    await runs.CreateTrainingRun(create_request(dataset_uri))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await runs.CreateTrainingRun(create_request(dataset_uri, architecture="no_such_net"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    after = await scrape(training_runs)

    assert rpc(after, "CreateTrainingRun", "OK") == rpc(before, "CreateTrainingRun", "OK") + 1
    assert (
        rpc(after, "CreateTrainingRun", "INVALID_ARGUMENT")
        == rpc(before, "CreateTrainingRun", "INVALID_ARGUMENT") + 1
    )
    # Both calls are in the histogram: the +Inf bucket and the count hold them, and the
    # buckets are cumulative.
    assert latency_bucket(after, "CreateTrainingRun", "+Inf") == (
        latency_bucket(before, "CreateTrainingRun", "+Inf") + 2
    )
    count = ("raven_grpc_server_handling_seconds_count",)
    labels = {"grpc_service": RUNS_SERVICE, "grpc_method": "CreateTrainingRun"}
    assert value(after, *count, **labels) == value(before, *count, **labels) + 2
    assert latency_bucket(after, "CreateTrainingRun", "0.001") <= latency_bucket(
        after, "CreateTrainingRun", "60.0"
    )


async def test_open_watch_streams_are_counted(training_runs, runs, dataset_uri) -> None:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    labels = {"grpc_service": RUNS_SERVICE, "grpc_method": "WatchTrainingRun"}
    before = value(await scrape(training_runs), "raven_grpc_server_open_streams", **labels)
    watch = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
    await watch.read()
    await until(
        training_runs,
        lambda s: value(s, "raven_grpc_server_open_streams", **labels) == before + 1,
    )
    watch.cancel()
    await until(
        training_runs, lambda s: value(s, "raven_grpc_server_open_streams", **labels) == before
    )


async def test_runs_are_counted_by_state(training_runs, runs, js, subjects, dataset_uri) -> None:
    def runs_in(samples: Samples, state: str) -> float:
        return value(samples, "raven_training_runs", state=state, kind="training")

    before = await scrape(training_runs)
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    queued = await scrape(training_runs)
    assert runs_in(queued, "QUEUED") == runs_in(before, "QUEUED") + 1
    assert runs_in(queued, "SUCCEEDED") == runs_in(before, "SUCCEEDED")

    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await in_state(runs, run.name, TrainingRun.RUNNING)
    running = await scrape(training_runs)
    assert runs_in(running, "QUEUED") == runs_in(queued, "QUEUED") - 1
    assert runs_in(running, "RUNNING") == runs_in(queued, "RUNNING") + 1
    # The worker events were consumed and timed.
    handled = value(
        running, "raven_consumer_handling_seconds_count", consumer="worker_events", outcome="ok"
    )
    assert handled >= 2
    assert (
        value(running, "raven_jetstream_consumer_pending_messages", consumer="worker_events") >= 0
    )


async def test_the_outbox_backlog_and_its_oldest_row(
    training_runs, trained_models, settings: Settings, subjects
) -> None:
    engine = create_engine(settings.database_url, pool_size=2)
    try:
        async with engine.connect() as holder:
            row_id = await _held_outbox_row(engine, holder, subjects.audit_recorded)
            for app in (training_runs, trained_models):
                samples = await scrape(app)
                assert value(samples, "raven_outbox_backlog_messages") >= 1
                assert value(samples, "raven_outbox_oldest_message_age_seconds") >= 3600
            await holder.rollback()
        # Released, the relay publishes the row and the backlog's oldest row is recent.
        await until(
            training_runs,
            lambda s: value(s, "raven_outbox_oldest_message_age_seconds") < 3600,
        )
        async with engine.connect() as connection:
            left = await connection.scalar(
                text("SELECT count(*) FROM outbox WHERE id = :id"), {"id": row_id}
            )
        assert left == 0
    finally:
        await engine.dispose()


async def _held_outbox_row(engine, holder, subject: str) -> int:
    """An outbox row an hour old, locked by `holder` so the relay (which skips locked rows)
    leaves it in the backlog. Inserted without the relay's wake-up; inserted again if the
    relay's poll took it before the lock did."""
    for _ in range(10):
        async with engine.begin() as connection:
            row_id = await connection.scalar(
                text(
                    "INSERT INTO outbox (subject, msg_id, payload, create_time) "
                    "VALUES (:subject, :msg_id, '', now() - interval '1 hour') RETURNING id"
                ),
                {"subject": subject, "msg_id": uuid.uuid4().hex},
            )
        locked = await holder.scalar(
            text("SELECT id FROM outbox WHERE id = :id FOR UPDATE"), {"id": row_id}
        )
        if locked is not None:
            return int(row_id)
        await holder.rollback()
    raise AssertionError("the relay published every test row before it could be locked")


async def test_job_queue_depth_rises_with_a_queued_job_and_falls_when_consumed(
    training_runs, runs, js, subjects, settings: Settings, dataset_uri
) -> None:
    def pending(samples: Samples) -> float:
        return value(samples, "raven_jetstream_consumer_pending_messages", consumer="job_queue")

    before = pending(await scrape(training_runs))
    await runs.CreateTrainingRun(create_request(dataset_uri))
    queued = await until(training_runs, lambda s: pending(s) == before + 1)

    taken: list[str] = []
    stop = asyncio.Event()

    async def take(msg) -> None:
        taken.append(msg.subject)
        stop.set()

    # A worker's consumer of the job queue (its settings: trainer_worker.consumer).
    await asyncio.wait_for(
        consume(
            js,
            stream=subjects.jobs_stream,
            subject=subjects.jobs,
            durable=subjects.trainer_consumer,
            handle=take,
            batch=1,
            concurrency=1,
            ack_wait_s=settings.job_ack_wait_s,
            max_deliver=settings.job_max_deliver,
            ordering_key=None,
            sync_ack=True,
            stop=stop,
        ),
        timeout=30,
    )
    assert taken
    consumed = await until(training_runs, lambda s: pending(s) < pending(queued))
    # Now read from the durable consumer's info (the worker created it): a new job counts.
    await runs.CreateTrainingRun(create_request(dataset_uri))
    await until(training_runs, lambda s: pending(s) == pending(consumed) + 1)


async def test_queued_runs_know_their_place_in_the_queue(runs, js, subjects, dataset_uri) -> None:
    first = await runs.CreateTrainingRun(create_request(dataset_uri))
    second = await runs.CreateTrainingRun(create_request(dataset_uri))
    ahead = await _queued_before(runs, first)
    assert (await get(runs, first.name)).queue_position == ahead + 1
    assert (await get(runs, second.name)).queue_position == ahead + 2
    # Outside a Get (a list, the create answer) the position is not computed.
    assert first.queue_position == 0

    worker = WorkerDriver(js, subjects, first)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    started = await in_state(runs, first.name, TrainingRun.PREPARING)
    assert started.queue_position == 0
    assert (await get(runs, second.name)).queue_position == ahead + 1


async def _queued_before(runs, run: TrainingRun) -> int:
    """QUEUED runs (every kind) created before `run`, as ListTrainingRuns shows them."""
    count, token = 0, ""
    while True:
        page = await runs.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(
                states=[TrainingRun.QUEUED],
                kinds=[TrainingRun.TRAINING, TrainingRun.EVALUATION],
                order_by="create_time",
                page_size=100,
                page_token=token,
            )
        )
        for listed in page.training_runs:
            key = (listed.create_time.ToDatetime(), listed.name)
            if key < (run.create_time.ToDatetime(), run.name) and listed.name != run.name:
                count += 1
        token = page.next_page_token
        if not token:
            return count


async def test_metrics_answer_only_get_of_metrics(training_runs) -> None:
    status, _, _ = await asyncio.to_thread(_get, training_runs.metrics_port, "/nothing")
    assert status == 404


async def test_lost_worker_recoveries_are_counted(
    training_runs, runs, js, subjects, settings: Settings, dataset_uri
) -> None:
    def requeued(samples: Samples) -> float:
        return value(samples, "raven_lost_worker_recoveries_total", outcome="requeued")

    before = requeued(await scrape(training_runs))
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await in_state(runs, run.name, TrainingRun.RUNNING)

    engine = create_engine(settings.database_url, pool_size=2)
    sessions = session_factory(engine)
    # The service's recovery loop with a short timeout, reporting to the service's metrics.
    recovery = asyncio.create_task(
        handlers.recover_lost_runs_forever(
            lambda: UnitOfWork(sessions, subjects),
            timeout_s=0.5,
            max_attempts=settings.max_attempts,
            on_recovered=training_runs.run_metrics.recovered,
        )
    )
    try:
        await in_state(runs, run.name, TrainingRun.QUEUED)
        await until(training_runs, lambda s: requeued(s) >= before + 1)
    finally:
        recovery.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await recovery
        await engine.dispose()
