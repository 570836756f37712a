"""TrainingRunService over real gRPC, Postgres and JetStream.

Worker reports are published on the real worker events stream exactly as a
trainer worker publishes them; the real worker is exercised end to end in tests/e2e.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import grpc
import nats
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from shared.proto.raven.training.v1 import (
    common_pb2,
    trained_model_pb2,
    training_run_pb2,
    worker_pb2,
)
from tests.pki import ADMIN
from tests.support import WorkerDriver, create_request, eventually, violations

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(60)


async def test_create_validates_every_field_at_once(runs, dataset_uri):
    request = create_request(dataset_uri, epochs=0, batch_size=0, frozen_stages=7)
    request.training_run.display_name = ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(caught.value)
    assert set(found) == {
        "training_run.display_name",
        "training_run.spec.epochs",
        "training_run.spec.batch_size",
        "training_run.spec.frozen_stages",
    }
    assert "between 1 and 500" in found["training_run.spec.epochs"]


async def test_create_reports_a_missing_dataset_and_an_unknown_architecture(runs):
    request = create_request("datasets/nowhere/annotations.json", architecture="yolo_v99")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request)
    found = violations(caught.value)
    assert "no annotation file" in found["training_run.spec.dataset_uri"]
    assert "unknown architecture" in found["training_run.spec.architecture"]


async def test_create_validates_and_records_the_test_fraction(runs, dataset_uri):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(
            create_request(dataset_uri, val_fraction=0.5, test_fraction=0.4)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(caught.value)
    assert set(found) == {"training_run.spec.test_fraction"}
    assert "at most 0.8" in found["training_run.spec.test_fraction"]

    run = await runs.CreateTrainingRun(create_request(dataset_uri, test_fraction=0.25))
    assert run.spec.HasField("test_fraction") and run.spec.test_fraction == 0.25
    # Unset: no test split, and that default is recorded like the others.
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    assert run.spec.HasField("test_fraction") and run.spec.test_fraction == 0.0


async def test_unknown_base_model_is_not_found(runs, dataset_uri):
    request = create_request(dataset_uri, architecture="")
    request.training_run.base_model = f"trainedModels/{uuid.uuid4()}"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_fills_and_records_the_spec(runs, dataset_uri):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    assert run.state == TrainingRun.QUEUED
    assert run.name.startswith("trainingRuns/")
    assert run.spec.epochs == 2 and run.spec.batch_size == 4
    # Defaults are recorded, so the run can be reproduced.
    assert run.spec.HasField("learning_rate") and run.spec.learning_rate > 0
    assert run.spec.HasField("seed") and run.spec.HasField("image_size")
    assert run.attempt == 1 and run.creator == ADMIN
    fetched = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    # Only a Get tells a QUEUED run its place in the queue (tests/integration/test_metrics.py).
    assert fetched.queue_position >= 1
    fetched.ClearField("queue_position")
    assert fetched == run


async def test_create_is_idempotent_on_request_id(runs, dataset_uri):
    request = create_request(dataset_uri)
    first = await runs.CreateTrainingRun(request)
    again = await runs.CreateTrainingRun(request)
    assert again.name == first.name
    request.training_run.spec.epochs = 3
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_a_repeated_create_answers_with_the_first_run_whatever_its_checks_say_now(
    runs, settings
):
    path = Path(settings.artifact_root) / "datasets" / uuid.uuid4().hex / "annotations.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    request = create_request(str(path.relative_to(settings.artifact_root)))
    first = await runs.CreateTrainingRun(request)
    path.unlink()

    again = await runs.CreateTrainingRun(request)
    assert again.name == first.name
    # A new request with that body is refused: the dataset is gone.
    request.request_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_concurrent_identical_creates_make_one_run(runs, dataset_uri):
    request = create_request(dataset_uri)
    results = await asyncio.gather(
        *(runs.CreateTrainingRun(request) for _ in range(5)), return_exceptions=True
    )
    names = {r.name for r in results if isinstance(r, TrainingRun)}
    assert len(names) == 1, results


async def test_a_created_run_queues_one_training_job(runs, dataset_uri, js, subjects):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    run_id = run.name.split("/")[1]

    async def queued_job() -> bytes | None:
        try:
            return (await js.get_last_msg(subjects.jobs_stream, subjects.job(run_id))).data
        except nats.js.errors.NotFoundError:
            return None

    job = worker_pb2.TrainingJob.FromString(await eventually(queued_job))
    assert job.training_run == run.name and job.attempt == 1
    assert job.spec == run.spec


async def test_list_pages_with_keyset_tokens(runs, settings):
    path = Path(settings.artifact_root) / "datasets" / "paging" / "annotations.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    uri = "datasets/paging/annotations.json"
    created = [(await runs.CreateTrainingRun(create_request(uri))).name for _ in range(5)]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await runs.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(page_size=2, page_token=token, dataset_uri=uri)
        )
        seen.extend(r.name for r in page.training_runs)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(created)), "newest first, every run exactly once"

    oldest_first = await runs.ListTrainingRuns(
        training_run_pb2.ListTrainingRunsRequest(dataset_uri=uri, order_by="create_time")
    )
    assert [r.name for r in oldest_first.training_runs] == created

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(page_size=2, page_token="garbage")
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_update_is_guarded_by_etag(runs, dataset_uri):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    renamed = await runs.UpdateTrainingRun(
        training_run_pb2.UpdateTrainingRunRequest(
            training_run=TrainingRun(name=run.name, display_name="renamed", etag=run.etag),
            update_mask=FieldMask(paths=["display_name"]),
        )
    )
    assert renamed.display_name == "renamed" and renamed.etag != run.etag
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.UpdateTrainingRun(
            training_run_pb2.UpdateTrainingRunRequest(
                training_run=TrainingRun(name=run.name, display_name="stale", etag=run.etag),
                update_mask=FieldMask(paths=["display_name"]),
            )
        )
    assert caught.value.code() == grpc.StatusCode.ABORTED


async def test_cancel_a_queued_run_and_refuse_to_cancel_a_finished_one(runs, dataset_uri):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    cancel = training_run_pb2.CancelTrainingRunRequest(name=run.name, reason="not needed")
    cancelled = await runs.CancelTrainingRun(cancel)
    assert cancelled.state == TrainingRun.CANCELLED
    again = await runs.CancelTrainingRun(cancel)
    assert again.state == TrainingRun.CANCELLED

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name="trainingRuns/x"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_worker_reports_drive_the_run_and_watch_follows_live(
    runs, models, dataset_uri, js, subjects
):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    watched: list[training_run_pb2.TrainingRunEvent] = []

    async def watch() -> None:
        stream = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
        async for event in stream:
            watched.append(event)

    watcher = asyncio.create_task(watch())
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(
        dataset_prepared=common_pb2.DatasetSummary(
            fingerprint="abc", image_count=16, classes=["dump", "tire"], split_seed=7
        )
    )
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    for iteration in (1, 2, 3, 4):
        await worker.send(
            progress=training_run_pb2.Progress(
                epoch=1 + iteration // 3,
                max_epochs=2,
                iteration=iteration,
                max_iterations=4,
                loss=1.0 / iteration,
            )
        )
    await worker.send(
        evaluation=common_pb2.Evaluation(epoch=2, split="val", metrics={"coco/bbox_mAP": 0.25})
    )
    await worker.send(
        succeeded=worker_pb2.WorkerEvent.Succeeded(
            artifacts=[
                common_pb2.Artifact(
                    kind="checkpoint", uri="file:///x/checkpoint.pth", size_bytes=3, sha256="ab"
                )
            ],
            facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=2, device="cpu"),
            evaluation=common_pb2.Evaluation(epoch=2, split="val", metrics={"coco/bbox_mAP": 0.25}),
        )
    )
    await asyncio.wait_for(watcher, timeout=15)

    sequences = [e.sequence for e in watched]
    assert sequences == list(range(1, len(watched) + 1)), "ordered, no gaps, no repeats"
    states = [
        e.state_changed.to_state for e in watched if e.WhichOneof("payload") == "state_changed"
    ]
    assert states == [
        TrainingRun.QUEUED,
        TrainingRun.PREPARING,
        TrainingRun.RUNNING,
        TrainingRun.SUCCEEDED,
    ]
    iterations = [e.progress.iteration for e in watched if e.WhichOneof("payload") == "progress"]
    assert iterations == [1, 2, 3, 4]

    # The registry registers the result exactly once and the run links to it.
    finished = await eventually(lambda: _with_model(runs, run.name), timeout=10)
    assert finished.state == TrainingRun.SUCCEEDED
    model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=finished.trained_model)
    )
    assert model.training_run == run.name and model.base_model == ""
    assert list(model.classes) == ["dump", "tire"]
    assert model.evaluation.metrics["coco/bbox_mAP"] == pytest.approx(0.25)

    # A watcher that reconnects after the end gets only what it missed: nothing.
    replay = [
        e
        async for e in runs.WatchTrainingRun(
            training_run_pb2.WatchTrainingRunRequest(name=run.name, after_sequence=sequences[-2])
        )
    ]
    assert [e.sequence for e in replay] == [sequences[-1]]


async def _with_model(runs, name: str) -> TrainingRun | None:
    run = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))
    return run if run.trained_model else None


async def test_a_redelivered_report_is_applied_once_and_a_stale_attempt_is_ignored(
    runs, dataset_uri, js, subjects
):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    event_id = await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(event_id, preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(
        attempt=7, failed=training_run_pb2.Failure(reason="late", message="stale worker")
    )
    marker = await worker.send(
        notice=training_run_pb2.TrainingRunEvent.Notice(code="marker", message="m")
    )

    async def history() -> list[training_run_pb2.TrainingRunEvent] | None:
        page = await runs.ListTrainingRunEvents(
            training_run_pb2.ListTrainingRunEventsRequest(name=run.name)
        )
        events = list(page.events)
        return events if any(e.notice.code == "marker" for e in events) else None

    events = await eventually(history)
    assert marker
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds == ["state_changed", "state_changed", "notice"]
    assert events[1].state_changed.to_state == TrainingRun.PREPARING
    current = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert current.state == TrainingRun.PREPARING


async def test_a_failed_run_keeps_its_reason(runs, dataset_uri, js, subjects):
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(
        failed=training_run_pb2.Failure(
            reason="dataset_invalid", message="annotation 3: box outside image 1"
        )
    )

    async def failed() -> TrainingRun | None:
        current = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        return current if current.state == TrainingRun.FAILED else None

    current = await eventually(failed)
    assert current.failure.reason == "dataset_invalid"
    assert "box outside image" in current.failure.message
    assert current.HasField("end_time")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await runs.DeleteTrainingRun(training_run_pb2.DeleteTrainingRunRequest(name=run.name))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_architecture_catalog_is_discoverable(runs):
    catalog = await runs.ListArchitectures(training_run_pb2.ListArchitecturesRequest())
    keys = {a.key for a in catalog.architectures}
    assert {"retinanet_r18_fpn", "faster_rcnn_r50_fpn", "retinanet_r101_fpn"} <= keys
    assert catalog.defaults.epochs == 12 and catalog.defaults.HasField("batch_size")
    by_key = {a.key: a for a in catalog.architectures}
    retinanet, rtmdet = by_key["retinanet_r18_fpn"], by_key["rtmdet_tiny"]
    # From random weights nothing stays frozen; a fine-tune keeps the first stage as learnt.
    assert retinanet.from_scratch.frozen_stages == -1 and retinanet.fine_tune.frozen_stages == 1
    assert retinanet.from_scratch.optimizer == training_run_pb2.TrainingSpec.SGD
    assert rtmdet.from_scratch.optimizer == training_run_pb2.TrainingSpec.ADAMW
    assert rtmdet.family == "rtmdet" and rtmdet.backbone_depth == 0
    assert rtmdet.fine_tune.learning_rate < rtmdet.from_scratch.learning_rate


async def test_a_root_run_gets_the_from_scratch_recipe(runs, dataset_uri):
    # Only what the recipe does not decide is set: no optimizer, rate or frozen stages.
    scratch = await runs.CreateTrainingRun(
        create_request(dataset_uri, architecture="rtmdet_tiny", batch_size=8)
    )
    assert scratch.spec.frozen_stages == -1
    assert scratch.spec.optimizer == training_run_pb2.TrainingSpec.ADAMW
    assert scratch.spec.learning_rate == pytest.approx(0.004)


async def test_a_base_model_that_lost_its_files_is_not_found(
    runs, dataset_uri, js, subjects, settings
):
    folder = Path(settings.artifact_root) / "models" / uuid.uuid4().hex
    folder.mkdir(parents=True)
    artifacts = []
    for kind, name in (("checkpoint", "checkpoint.pth"), ("config", "config.py")):
        (folder / name).write_bytes(b"x")
        artifacts.append(
            common_pb2.Artifact(kind=kind, uri=f"file://{folder / name}", size_bytes=1)
        )
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await worker.send(succeeded=worker_pb2.WorkerEvent.Succeeded(artifacts=artifacts))
    model = await eventually(lambda: _with_model(runs, run.name))

    fine_tune = create_request(dataset_uri, architecture="")
    fine_tune.training_run.base_model = model.trained_model
    assert (await runs.CreateTrainingRun(fine_tune)).base_model == model.trained_model

    (folder / "checkpoint.pth").unlink()
    fine_tune.request_id = str(uuid.uuid4())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runs.CreateTrainingRun(fine_tune)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "lost its checkpoint" in caught.value.details()
