"""The rules of a run's life that involve time, races and other processes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import nats
import pytest
from sqlalchemy import insert

from services.training_runs import handlers
from services.training_runs.unit_of_work import UnitOfWork
from shared.db.engine import create_engine, session_factory
from shared.db.schema import training_runs
from shared.metrics import best_epoch
from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import (
    common_pb2,
    training_run_pb2,
    worker_pb2,
)
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually
from trainer_worker import events
from trainer_worker.outcomes import EpochRecord, TrainingSucceeded

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
async def uow_factory(settings: Settings, subjects, training_runs):
    engine = create_engine(settings.database_url, pool_size=4)
    sessions = session_factory(engine)
    yield lambda: UnitOfWork(sessions, subjects)
    await engine.dispose()


async def get(runs, name: str) -> TrainingRun:
    return await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))


async def in_state(runs, name: str, state: int) -> TrainingRun:
    async def probe() -> TrainingRun | None:
        run = await get(runs, name)
        return run if run.state == state else None

    return await eventually(probe)


async def running(runs, js, subjects, dataset_uri) -> tuple[TrainingRun, WorkerDriver]:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    return await in_state(runs, run.name, TrainingRun.RUNNING), worker


async def history(runs, name: str) -> list[training_run_pb2.TrainingRunEvent]:
    page = await runs.ListTrainingRunEvents(
        training_run_pb2.ListTrainingRunEventsRequest(name=name, page_size=1000)
    )
    return list(page.events)


def states(events) -> list[int]:
    return [e.state_changed.to_state for e in events if e.WhichOneof("payload") == "state_changed"]


async def test_a_silent_worker_gets_its_run_requeued_then_failed(
    runs, js, subjects, dataset_uri, uow_factory
):
    run, worker = await running(runs, js, subjects, dataset_uri)
    run_id = parse_name(run.name, TRAINING_RUNS)
    later = datetime.now(UTC) + timedelta(minutes=10)

    # No heartbeat for 10 minutes: another attempt, with a new job message.
    changed = await handlers.recover_lost_runs(
        uow_factory(), timeout_s=120, max_attempts=2, clock=lambda: later
    )
    assert run_id in {r.id for r in changed}
    requeued = await get(runs, run.name)
    assert requeued.state == TrainingRun.QUEUED and requeued.attempt == 2

    async def second_job() -> worker_pb2.TrainingJob | None:
        msg = await js.get_last_msg(subjects.jobs_stream, subjects.job(str(run_id)))
        job = worker_pb2.TrainingJob.FromString(msg.data)
        return job if job.attempt == 2 else None

    assert (await eventually(second_job)).training_run == run.name

    # The worker of attempt 1 comes back late: fenced off.
    await worker.send(failed=training_run_pb2.Failure(reason="late", message="attempt 1"))
    worker.attempt = 2
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await in_state(runs, run.name, TrainingRun.PREPARING)

    # Silent again, with no attempt left: FAILED, never stuck.
    await handlers.recover_lost_runs(
        uow_factory(), timeout_s=120, max_attempts=2, clock=lambda: later + timedelta(hours=1)
    )
    failed = await get(runs, run.name)
    assert failed.state == TrainingRun.FAILED
    assert failed.failure.reason == "worker_lost"
    assert "attempt 2 of 2" in failed.failure.message
    events = await history(runs, run.name)
    assert states(events) == [
        TrainingRun.QUEUED,
        TrainingRun.PREPARING,
        TrainingRun.RUNNING,
        TrainingRun.QUEUED,
        TrainingRun.PREPARING,
        TrainingRun.FAILED,
    ]
    assert events[-1].actor == "system"


async def test_a_heart_beating_worker_keeps_its_run(runs, js, subjects, dataset_uri, uow_factory):
    run, worker = await running(runs, js, subjects, dataset_uri)
    await worker.send(heartbeat=worker_pb2.WorkerEvent.Heartbeat())
    changed = await handlers.recover_lost_runs(
        uow_factory(), timeout_s=120, max_attempts=3, clock=lambda: datetime.now(UTC)
    )
    assert parse_name(run.name, TRAINING_RUNS) not in {r.id for r in changed}
    assert (await get(runs, run.name)).state == TrainingRun.RUNNING


async def test_concurrent_cancels_make_one_transition(runs, js, subjects, dataset_uri):
    run, _ = await running(runs, js, subjects, dataset_uri)
    cancel = training_run_pb2.CancelTrainingRunRequest(name=run.name, reason="stop")
    results = await asyncio.gather(*(runs.CancelTrainingRun(cancel) for _ in range(5)))
    assert {r.state for r in results} == {TrainingRun.CANCELLING}
    assert states(await history(runs, run.name)).count(TrainingRun.CANCELLING) == 1


async def test_a_cancel_racing_the_workers_completion_has_one_outcome(
    runs, js, subjects, dataset_uri
):
    run, worker = await running(runs, js, subjects, dataset_uri)
    cancel = runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))
    done = worker.send(
        succeeded=worker_pb2.WorkerEvent.Succeeded(
            artifacts=[common_pb2.Artifact(kind="checkpoint", uri="file:///c.pth", sha256="00")]
        )
    )
    outcome = await asyncio.gather(cancel, done, return_exceptions=True)
    finished = await in_state(runs, run.name, TrainingRun.SUCCEEDED)
    events = await history(runs, run.name)
    if isinstance(outcome[0], grpc.aio.AioRpcError):
        # The result was in first: a finished run cannot be cancelled.
        assert outcome[0].code() == grpc.StatusCode.FAILED_PRECONDITION
        assert TrainingRun.CANCELLING not in states(events)
    else:
        # The cancel was in first; the job had already finished and keeps its result.
        assert states(events)[-2:] == [TrainingRun.CANCELLING, TrainingRun.SUCCEEDED]
    assert states(events)[-1] == finished.state
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def test_cancelling_an_active_run_ends_cancelled_when_the_worker_stops(
    runs, js, subjects, dataset_uri
):
    run, worker = await running(runs, js, subjects, dataset_uri)
    await worker.send(
        progress=training_run_pb2.Progress(epoch=1, iteration=3, max_iterations=8, loss=0.5)
    )
    await in_state(runs, run.name, TrainingRun.RUNNING)
    cancelling = await runs.CancelTrainingRun(
        training_run_pb2.CancelTrainingRunRequest(name=run.name, reason="wrong dataset")
    )
    assert cancelling.state == TrainingRun.CANCELLING
    await worker.send(cancelled=worker_pb2.WorkerEvent.Cancelled())
    cancelled = await in_state(runs, run.name, TrainingRun.CANCELLED)
    assert cancelled.progress.iteration == 3, "partial progress is kept"
    assert cancelled.failure.message == "wrong dataset"


async def test_watch_resumes_after_a_disconnect_without_gap_or_duplicate(
    runs, js, subjects, dataset_uri
):
    run, worker = await running(runs, js, subjects, dataset_uri)
    first: list[training_run_pb2.TrainingRunEvent] = []
    stream = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
    async for event in stream:
        first.append(event)
        if len(first) == 3:
            break
    stream.cancel()  # the client goes away mid-run

    for iteration in range(1, 6):
        await worker.send(
            progress=training_run_pb2.Progress(epoch=1, iteration=iteration, max_iterations=5)
        )
    await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="oom"))

    resumed = [
        event
        async for event in runs.WatchTrainingRun(
            training_run_pb2.WatchTrainingRunRequest(
                name=run.name, after_sequence=first[-1].sequence
            )
        )
    ]
    sequences = [e.sequence for e in first + resumed]
    assert sequences == list(range(1, len(sequences) + 1))
    assert resumed[-1].state_changed.to_state == TrainingRun.FAILED


async def test_many_watchers_of_one_run_see_the_same_history(runs, js, subjects, dataset_uri):
    run, worker = await running(runs, js, subjects, dataset_uri)

    async def watch() -> list[int]:
        stream = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
        return [e.sequence async for e in stream]

    watchers = [asyncio.create_task(watch()) for _ in range(50)]
    await asyncio.sleep(0.2)
    for iteration in range(1, 11):
        await worker.send(progress=training_run_pb2.Progress(epoch=1, iteration=iteration))
    await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))
    seen = await asyncio.wait_for(asyncio.gather(*watchers), 30)
    expected = list(range(1, len(seen[0]) + 1))
    assert len(expected) == 3 + 10 + 1
    assert all(s == expected for s in seen)


async def test_metrics_are_kept_per_epoch_as_they_arrive(runs, js, subjects, dataset_uri):
    run, worker = await running(runs, js, subjects, dataset_uri)
    for epoch, value in ((1, 0.1), (2, 0.3), (3, 0.3)):
        await worker.send(
            progress=training_run_pb2.Progress(
                epoch=epoch,
                iteration=epoch * 10,
                loss=1 / epoch,
                losses={"loss_cls": 0.5},
                learning_rate=0.01,
            )
        )
        await worker.send(
            evaluation=common_pb2.Evaluation(
                epoch=epoch, split="val", metrics={"coco/bbox_mAP": value, "coco/bbox_mAP_l": -1.0}
            )
        )

    async def three_epochs() -> training_run_pb2.TrainingRunMetrics | None:
        metrics = await runs.GetTrainingRunMetrics(
            training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
        )
        return metrics if len(metrics.epochs) == 3 and metrics.epochs[2].val else None

    metrics = await eventually(three_epochs)
    assert [e.epoch for e in metrics.epochs] == [1, 2, 3]
    # mmengine's names, the same as once the run has finished (docs/metrics.md).
    assert metrics.epochs[0].train == {
        "loss": pytest.approx(1.0),
        "loss_cls": pytest.approx(0.5),
        "lr": pytest.approx(0.01),
    }
    assert metrics.epochs[1].val["coco/bbox_mAP_l"] == -1.0
    assert metrics.best_epoch == 2, "highest mAP, earliest on ties"


async def test_without_a_map_the_last_validated_epoch_is_best_everywhere(
    runs, js, subjects, dataset_uri
):
    run, worker = await running(runs, js, subjects, dataset_uri)

    async def metrics() -> training_run_pb2.TrainingRunMetrics:
        return await runs.GetTrainingRunMetrics(
            training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
        )

    async def noticed(code: str) -> bool:
        return any(e.notice.code == code for e in await history(runs, run.name))

    await worker.send(notice=training_run_pb2.TrainingRunEvent.Notice(code="started", message=""))
    await eventually(lambda: noticed("started"))
    assert (await metrics()).best_epoch == 0, "no validation yet"
    # An untrained model has no detections: the evaluator reports no mAP at all.
    for epoch in (1, 2):
        await worker.send(
            progress=training_run_pb2.Progress(epoch=epoch, iteration=epoch * 4, loss=1.0)
        )
        await worker.send(
            evaluation=common_pb2.Evaluation(
                epoch=epoch, split="val", metrics={"coco/bbox_mAP_l": -1.0}, image_count=5
            )
        )
    await worker.send(progress=training_run_pb2.Progress(epoch=3, iteration=9, loss=1.0))
    await worker.send(notice=training_run_pb2.TrainingRunEvent.Notice(code="done", message=""))
    await eventually(lambda: noticed("done"))
    live = await metrics()
    # Epoch 3 trains, unvalidated: the training child keeps epoch 2's checkpoint.
    assert live.best_epoch == 2 and [e.epoch for e in live.epochs] == [1, 2, 3]

    # The worker's own Succeeded event for a run like it (trainer_worker.events).
    outcome = TrainingSucceeded(
        artifacts=(),
        best_epoch=best_epoch({1: {}, 2: {"coco/bbox_mAP_l": -1.0}}, last_epoch=2) or 0,
        best_metrics={"coco/bbox_mAP_l": -1.0},
        epochs=(EpochRecord(epoch=1, train={"loss": 1.0}), EpochRecord(epoch=2)),
        epochs_trained=2,
        duration_s=3.0,
        parameter_count=10,
        device="cpu",
        val_image_count=5,
    )
    await worker.send(succeeded=events.succeeded(outcome))
    finished = await in_state(runs, run.name, TrainingRun.SUCCEEDED)
    final = await metrics()
    assert final.best_epoch == finished.facts.best_epoch == finished.best_evaluation.epoch == 2
    assert finished.latest_evaluation.epoch == 2
    assert finished.best_evaluation.image_count == finished.latest_evaluation.image_count == 5


async def test_a_test_evaluation_is_kept_apart_from_the_epochs(runs, js, subjects, dataset_uri):
    run, worker = await running(runs, js, subjects, dataset_uri)
    for epoch, value in ((1, 0.3), (2, 0.1)):
        await worker.send(
            evaluation=common_pb2.Evaluation(
                epoch=epoch, split="val", metrics={"coco/bbox_mAP": value}
            )
        )
    # The best epoch's checkpoint on the test split, after training: epoch 1, a higher mAP.
    test = common_pb2.Evaluation(epoch=1, split="test", metrics={"coco/bbox_mAP": 0.9})
    test.image_count = 3
    await worker.send(evaluation=test)

    async def tested() -> TrainingRun | None:
        fetched = await get(runs, run.name)
        return fetched if fetched.HasField("test_evaluation") else None

    fetched = await eventually(tested)
    assert fetched.test_evaluation == test
    assert (fetched.latest_evaluation.split, fetched.latest_evaluation.epoch) == ("val", 2)
    metrics = await runs.GetTrainingRunMetrics(
        training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
    )
    assert [(e.epoch, e.val["coco/bbox_mAP"]) for e in metrics.epochs] == [
        (1, pytest.approx(0.3)),
        (2, pytest.approx(0.1)),
    ]
    assert metrics.best_epoch == 1
    evaluations = [e.evaluation for e in await history(runs, run.name) if e.HasField("evaluation")]
    assert [(e.split, e.epoch) for e in evaluations] == [("val", 1), ("val", 2), ("test", 1)]

    best = common_pb2.Evaluation(epoch=1, split="val", metrics={"coco/bbox_mAP": 0.3})
    succeeded = worker_pb2.WorkerEvent.Succeeded(
        facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=1), evaluation=best
    )
    succeeded.test_evaluation.CopyFrom(test)
    await worker.send(succeeded=succeeded)
    finished = await in_state(runs, run.name, TrainingRun.SUCCEEDED)
    assert (finished.best_evaluation, finished.test_evaluation) == (best, test)


async def test_retry_creates_a_linked_run_of_the_same_spec(runs, js, subjects, dataset_uri):
    run, worker = await running(runs, js, subjects, dataset_uri)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.RetryTrainingRun(training_run_pb2.RetryTrainingRunRequest(name=run.name))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    await worker.send(failed=training_run_pb2.Failure(reason="training_crashed", message="x"))
    failed = await in_state(runs, run.name, TrainingRun.FAILED)
    request = training_run_pb2.RetryTrainingRunRequest(name=run.name, request_id=str(uuid.uuid4()))
    retry = await runs.RetryTrainingRun(request)
    assert retry.state == TrainingRun.QUEUED and retry.retry_of == run.name
    assert retry.spec == failed.spec, "the same recorded spec, seed included"
    assert (await runs.RetryTrainingRun(request)).name == retry.name


async def test_a_retry_of_a_deterministic_run_is_deterministic_with_its_seed(runs, dataset_uri):
    run = await runs.CreateTrainingRun(create_request(dataset_uri, deterministic=True, seed=11))
    assert (run.spec.deterministic, run.spec.seed) == (True, 11)
    await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))
    retry = await runs.RetryTrainingRun(
        training_run_pb2.RetryTrainingRunRequest(name=run.name, request_id=str(uuid.uuid4()))
    )
    assert retry.spec.HasField("deterministic") and retry.spec.HasField("seed")
    assert (retry.spec.deterministic, retry.spec.seed) == (True, 11)
    assert retry.spec == run.spec
    # Unset, it is recorded as false: what the run trained with is on the run.
    plain = await runs.CreateTrainingRun(create_request(dataset_uri))
    assert plain.spec.HasField("deterministic") and plain.spec.deterministic is False


async def test_every_state_change_is_published_on_its_lifecycle_subject(
    runs, js, subjects, dataset_uri
):
    sub = await js.subscribe(
        f"{subjects.namespace}.training.v1.training_run.*",
        stream=subjects.events_stream,
        ordered_consumer=True,
        deliver_policy=nats.js.api.DeliverPolicy.NEW,
    )
    run, worker = await running(runs, js, subjects, dataset_uri)
    await worker.send(failed=training_run_pb2.Failure(reason="dataset_invalid", message="x"))
    seen: dict[str, training_run_pb2.TrainingRunStateChanged] = {}
    while "failed" not in seen:
        msg = await sub.next_msg(timeout=10)
        changed = training_run_pb2.TrainingRunStateChanged.FromString(msg.data)
        if changed.training_run.name == run.name:
            seen[msg.subject.rsplit(".", 1)[1]] = changed
    await sub.unsubscribe()
    assert list(seen) == ["queued", "preparing", "running", "failed"]
    failed = seen["failed"]
    assert failed.training_run.failure.reason == "dataset_invalid"
    assert failed.event_id == f"{run.name.split('/')[1]}.{failed.event.sequence}"


async def test_paging_through_a_thousand_runs_returns_each_exactly_once(runs, settings):
    dataset = f"datasets/paging-{uuid.uuid4().hex[:6]}/annotations.json"
    now = datetime.now(UTC)
    rows = [
        {
            "id": uuid.uuid4(),
            "display_name": f"run {i}",
            "state": "SUCCEEDED",
            "spec": {"dataset_uri": dataset, "architecture": "retinanet_r18_fpn"},
            "architecture": "retinanet_r18_fpn",
            "dataset_uri": dataset,
            "creator": "bulk",
            # Many runs share a create time: the id breaks the tie.
            "create_time": now - timedelta(seconds=i // 10),
        }
        for i in range(1000)
    ]
    engine = create_engine(settings.database_url, pool_size=1)
    async with engine.begin() as connection:
        await connection.execute(insert(training_runs), rows)
    await engine.dispose()

    seen: list[str] = []
    token = ""
    while True:
        page = await runs.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(
                dataset_uri=dataset, page_size=97, page_token=token
            )
        )
        seen.extend(r.name for r in page.training_runs)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 1000 and len(set(seen)) == 1000
    assert set(seen) == {f"trainingRuns/{r['id']}" for r in rows}


async def test_a_crashed_run_lists_its_log_with_the_failure(runs, js, subjects, dataset_uri):
    run, worker = await running(runs, js, subjects, dataset_uri)
    log = common_pb2.Artifact(
        kind="log", uri="s3://raven/runs/x/attempt-1/train.log", size_bytes=12, sha256="ab" * 32
    )
    failure = training_run_pb2.Failure(
        reason="training_crashed", message="TypeError: bad option", artifacts=[log]
    )
    await worker.send(failed=failure)

    failed = await in_state(runs, run.name, TrainingRun.FAILED)
    assert failed.failure.message == "TypeError: bad option"
    assert list(failed.failure.artifacts) == [log]
    assert list(failed.artifacts) == [log], "the run's artifacts name its log too"
