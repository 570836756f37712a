"""What GetTrainingRun and ListTrainingRuns return is stored with every change of a run
(training_runs.proto, services.training_runs.reads): after each kind of change the stored
bytes are the message rebuilt from the row's columns, and a row without a stored message
(written before migration 0010) or with a stale one reads as it did before."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from sqlalchemy import insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from services.training_runs.messages import run_to_proto, stored_message
from services.training_runs.unit_of_work import UnitOfWork
from shared.db.engine import create_engine, session_factory
from shared.db.schema import trained_models, training_runs
from shared.names import TRAINING_RUNS, model_name, parse_name
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
async def engine(settings: Settings, training_runs: object) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url, pool_size=2)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
def uow_factory(engine: AsyncEngine, subjects: object) -> Callable[[], UnitOfWork]:
    sessions = session_factory(engine)
    return lambda: UnitOfWork(sessions, subjects)  # type: ignore[arg-type]


async def get(runs, name: str) -> TrainingRun:
    return await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))


async def stored(engine: AsyncEngine, name: str) -> bytes | None:
    run_id = parse_name(name, TRAINING_RUNS)
    async with engine.connect() as connection:
        query = select(training_runs.c.proto).where(training_runs.c.id == run_id)
        return (await connection.execute(query)).scalar_one()


async def rebuilt(uow_factory: Callable[[], UnitOfWork], name: str) -> bytes:
    """The stored message as the row's columns make it (the reads before migration 0010)."""
    async with uow_factory() as uow:
        run = await uow.runs.require(parse_name(name, TRAINING_RUNS))
    return stored_message(run)


async def assert_stored_is_rebuilt(engine, uow_factory, name: str) -> None:
    kept = await stored(engine, name)
    assert kept is not None
    assert kept == await rebuilt(uow_factory, name)


async def until(runs, name: str, check: Callable[[TrainingRun], bool]) -> TrainingRun:
    async def probe() -> TrainingRun | None:
        run = await get(runs, name)
        return run if check(run) else None

    return await eventually(probe)


async def test_the_stored_message_is_the_rebuilt_one_after_each_kind_of_change(
    runs, js, subjects, dataset_uri, engine, uow_factory
) -> None:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)

    run.display_name = "renamed"
    run.labels["team"] = "vision"
    updated = await runs.UpdateTrainingRun(
        training_run_pb2.UpdateTrainingRunRequest(
            training_run=run, update_mask=FieldMask(paths=["display_name", "labels"])
        )
    )
    assert updated.display_name == "renamed"
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)

    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await until(runs, run.name, lambda r: r.state == TrainingRun.PREPARING)
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)

    await worker.send(
        dataset_prepared=common_pb2.DatasetSummary(
            fingerprint="abc", image_count=16, classes=["dump", "tire"], split_seed=7
        )
    )
    await until(runs, run.name, lambda r: r.dataset.image_count == 16)
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)

    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await until(runs, run.name, lambda r: r.state == TrainingRun.RUNNING)
    await worker.send(
        progress=training_run_pb2.Progress(
            epoch=1, max_epochs=2, iteration=3, max_iterations=8, loss=0.5, losses={"cls": 0.3}
        )
    )
    await until(runs, run.name, lambda r: r.progress.iteration == 3)
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)

    await worker.send(
        evaluation=common_pb2.Evaluation(epoch=1, split="val", metrics={"coco/bbox_mAP": 0.25})
    )
    await until(runs, run.name, lambda r: r.latest_evaluation.epoch == 1)
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)

    await worker.send(
        succeeded=worker_pb2.WorkerEvent.Succeeded(
            artifacts=[
                common_pb2.Artifact(
                    kind="checkpoint", uri="file:///x/checkpoint.pth", size_bytes=3, sha256="ab"
                ),
                common_pb2.Artifact(kind="log", uri="file:///x/train.log", size_bytes=9),
            ],
            facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=1, device="cpu"),
            evaluation=common_pb2.Evaluation(epoch=1, split="val", metrics={"coco/bbox_mAP": 0.25}),
        )
    )
    finished = await until(runs, run.name, lambda r: r.state == TrainingRun.SUCCEEDED)
    assert [a.kind for a in finished.artifacts] == ["checkpoint", "log"]
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)


async def test_a_cancelled_run_stores_its_failure(runs, dataset_uri, engine, uow_factory) -> None:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    cancelled = await runs.CancelTrainingRun(
        training_run_pb2.CancelTrainingRunRequest(name=run.name, reason="not needed")
    )
    assert cancelled.failure.reason == "cancelled"
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)
    assert (await get(runs, run.name)) == cancelled


async def test_a_get_is_the_message_rebuilt_from_the_columns(runs, dataset_uri, uow_factory):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    fetched = await get(runs, run.name)
    assert fetched.queue_position >= 1
    async with uow_factory() as uow:
        expected = run_to_proto(await uow.runs.require(parse_name(run.name, TRAINING_RUNS)))
    expected.queue_position = fetched.queue_position
    assert fetched == expected


async def test_a_run_stored_before_the_migration_reads_as_before_and_is_stored_then(
    runs, dataset_uri, engine, uow_factory
) -> None:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    before = await get(runs, run.name)
    async with engine.begin() as connection:
        # As a row written before migration 0010 is: no stored message.
        await connection.execute(
            update(training_runs)
            .where(training_runs.c.id == parse_name(run.name, TRAINING_RUNS))
            .values(proto=None)
        )

    assert await get(runs, run.name) == before
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)
    assert await get(runs, run.name) == before

    async with engine.begin() as connection:
        await connection.execute(
            update(training_runs)
            .where(training_runs.c.id == parse_name(run.name, TRAINING_RUNS))
            .values(proto=None)
        )
    page = await runs.ListTrainingRuns(training_run_pb2.ListTrainingRunsRequest(page_size=50))
    listed = next(r for r in page.training_runs if r.name == run.name)
    before.ClearField("queue_position")
    assert listed == before
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)


async def test_a_row_changed_by_a_writer_that_stores_no_message_reads_as_changed(
    runs, dataset_uri, engine, uow_factory
) -> None:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    kept = await stored(engine, run.name)
    async with engine.begin() as connection:
        # A writer that knows nothing of the stored message (an older release, a repair).
        await connection.execute(
            text(
                "UPDATE training_runs SET display_name = 'repaired', version = version + 1,"
                " update_time = now() WHERE id = :id"
            ),
            {"id": parse_name(run.name, TRAINING_RUNS)},
        )
    assert await stored(engine, run.name) == kept

    fetched = await get(runs, run.name)
    assert fetched.display_name == "repaired"
    assert fetched.etag != run.etag
    await assert_stored_is_rebuilt(engine, uow_factory, run.name)


async def test_the_model_registered_from_a_run_shows_without_a_change_of_the_run(
    runs, dataset_uri, engine, uow_factory
) -> None:
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    kept = await stored(engine, run.name)
    model_id = uuid.uuid4()
    async with engine.begin() as connection:
        # What the registry (another service) writes; the run's row stays as it is.
        await connection.execute(
            insert(trained_models).values(
                id=model_id,
                display_name="registered",
                training_run_id=parse_name(run.name, TRAINING_RUNS),
                architecture="retinanet_r18_fpn",
                classes=["dump"],
                artifacts=[],
                creator=run.creator,
            )
        )
    assert await stored(engine, run.name) == kept

    fetched = await get(runs, run.name)
    assert fetched.trained_model == model_name(model_id)
    page = await runs.ListTrainingRuns(training_run_pb2.ListTrainingRunsRequest(page_size=50))
    assert next(r for r in page.training_runs if r.name == run.name).trained_model == (
        model_name(model_id)
    )
    async with engine.begin() as connection:
        await connection.execute(trained_models.delete().where(trained_models.c.id == model_id))
    assert (await get(runs, run.name)).trained_model == ""
