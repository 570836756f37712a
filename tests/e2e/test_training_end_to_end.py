"""The whole system: both gRPC services, a trainer worker process, real MMDetection
training on CPU (RetinaNet R18, 128 px, 16 images), a root model and a model
fine-tuned from it."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from shared.proto.raven.training.v1 import (
    trained_model_pb2,
    training_run_pb2,
)
from shared.settings import Settings
from tests.training import (
    local_dataset,
    model_of,
    payloads,
    run_request,
    watch_to_the_end,
    worker_fixture,
)

TrainingRun = training_run_pb2.TrainingRun
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


worker = worker_fixture("e2e-worker")


@pytest.fixture(scope="module")
def dataset_uri(settings: Settings) -> str:
    return local_dataset(settings, "e2e", images=16, size=128)


def request(
    name: str, dataset_uri: str, *, architecture: str = "", base_model: str = "", epochs: int = 2
) -> training_run_pb2.CreateTrainingRunRequest:
    return run_request(
        name,
        dataset_uri,
        base_model=base_model,
        architecture=architecture,
        epochs=epochs,
        image_size=128,
        seed=3,
    )


async def test_an_unreadable_dataset_fails_the_run_and_the_worker_goes_on(
    runs, worker, settings: Settings
):
    broken = Path(settings.artifact_root) / "datasets" / "broken" / "annotations.json"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text('{"images": [')
    run = await runs.CreateTrainingRun(
        request("broken", "datasets/broken/annotations.json", architecture="retinanet_r18_fpn")
    )
    events = await asyncio.wait_for(watch_to_the_end(runs, run.name), 60)
    last = payloads(events, "state_changed")[-1]
    assert last.to_state == TrainingRun.FAILED
    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.failure.reason.startswith("dataset_"), finished.failure
    assert "annotations.json" in finished.failure.message
    assert worker.returncode is None, "the worker survives a bad job"


async def test_train_a_root_model_then_fine_tune_it(runs, models, worker, dataset_uri):
    # A root model: an architecture from the catalog, randomly initialised.
    root_run = await runs.CreateTrainingRun(
        request("root", dataset_uri, architecture="retinanet_r18_fpn")
    )
    events = await asyncio.wait_for(watch_to_the_end(runs, root_run.name), 180)

    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    states = [s.to_state for s in payloads(events, "state_changed")]
    assert states == [
        TrainingRun.QUEUED,
        TrainingRun.PREPARING,
        TrainingRun.RUNNING,
        TrainingRun.SUCCEEDED,
    ]
    (dataset,) = payloads(events, "dataset_prepared")
    assert list(dataset.classes) == ["dump", "tire"] and dataset.image_count == 16
    assert dataset.split_seed == 3 and len(dataset.fingerprint) == 64
    progress = payloads(events, "progress")
    assert progress, "progress is streamed while training"
    iterations = [p.iteration for p in progress]
    assert iterations == sorted(set(iterations)), "progress only moves forward"
    assert progress[-1].max_iterations == progress[-1].iteration
    assert {e.epoch for e in payloads(events, "evaluation")} == {1, 2}

    root_model_name = await model_of(runs, root_run.name)
    root_model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=root_model_name)
    )
    assert root_model.base_model == "" and root_model.training_run == root_run.name
    assert list(root_model.classes) == ["dump", "tire"]
    checkpoint = next(a for a in root_model.artifacts if a.kind == "checkpoint")
    assert checkpoint.size_bytes > 0 and len(checkpoint.sha256) == 64

    # The lineage the mission is about: base model -> fine-tuned model.
    tuned_run = await runs.CreateTrainingRun(
        request("fine-tuned", dataset_uri, base_model=root_model_name, epochs=1)
    )
    assert tuned_run.spec.architecture == "retinanet_r18_fpn", "inherited from the base model"
    events = await asyncio.wait_for(watch_to_the_end(runs, tuned_run.name), 180)
    assert payloads(events, "state_changed")[-1].to_state == TrainingRun.SUCCEEDED

    tuned_model_name = await model_of(runs, tuned_run.name)
    tuned_model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=tuned_model_name)
    )
    assert tuned_model.base_model == root_model_name
    assert tuned_model.dataset_fingerprint == root_model.dataset_fingerprint

    lineage = await models.GetTrainedModelLineage(
        trained_model_pb2.GetTrainedModelLineageRequest(name=tuned_model_name)
    )
    assert [n.trained_model for n in lineage.ancestors] == [tuned_model_name, root_model_name]
    children = await models.ListTrainedModels(
        trained_model_pb2.ListTrainedModelsRequest(base_model=root_model_name)
    )
    assert [m.name for m in children.trained_models] == [tuned_model_name]


async def test_a_test_split_is_evaluated_once_with_the_best_checkpoint(
    runs, models, worker, dataset_uri
):
    tested = request("tested", dataset_uri, architecture="retinanet_r18_fpn", epochs=1)
    tested.training_run.spec.test_fraction = 0.25
    run = await runs.CreateTrainingRun(tested)
    events = await asyncio.wait_for(watch_to_the_end(runs, run.name), 180)
    assert payloads(events, "state_changed")[-1].to_state == TrainingRun.SUCCEEDED

    (dataset,) = payloads(events, "dataset_prepared")
    # 16 images: a fifth (3) for val, a quarter (4) for test.
    assert (dataset.train_image_count, dataset.val_image_count, dataset.test_image_count) == (
        9,
        3,
        4,
    )
    assert dataset.split_source == "seed"
    assert [(e.split, e.epoch, e.image_count) for e in payloads(events, "evaluation")] == [
        ("val", 1, 3),
        ("test", 1, 4),
    ]

    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.facts.best_epoch == 1
    assert (finished.test_evaluation.split, finished.test_evaluation.epoch) == ("test", 1)
    assert finished.test_evaluation.image_count == 4
    assert (finished.best_evaluation.split, finished.best_evaluation.epoch) == ("val", 1)
    metrics = await runs.GetTrainingRunMetrics(
        training_run_pb2.GetTrainingRunMetricsRequest(name=run.name)
    )
    assert [e.epoch for e in metrics.epochs] == [1], "the test evaluation is no epoch"

    model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=await model_of(runs, run.name))
    )
    assert model.evaluation == finished.test_evaluation
    assert model.val_evaluation == finished.best_evaluation
    files = {a.kind: Path(a.uri.removeprefix("file://")) for a in model.artifacts}
    split = json.loads(files["split"].read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (9, 3, 4)
    recorded = json.loads(files["metrics"].read_text())
    assert (recorded["test"]["epoch"], recorded["test"]["image_count"]) == (1, 4)
    # The test loop ran on the weights of the best epoch's checkpoint, after the last validation.
    log = files["log"].read_text()
    loaded = log.rindex("Loads checkpoint by local backend from path: ")
    assert log[loaded:].split("\n", 1)[0].endswith("/epoch_1.pth")
    assert log.rindex("Epoch(val)") < loaded < log.rindex("Epoch(test)")

    # The run's report, its page and its plots, carried onto its model, pictures the
    # kept weights' predictions on the test split: 4 images, the 3 worst and the best.
    report_kinds = ("report", "plot")
    reported = sorted((a.kind, a.name) for a in finished.artifacts if a.kind in report_kinds)
    assert reported == [
        ("plot", "plot-learning-rate.png"),
        ("plot", "plot-loss.png"),
        ("plot", "plot-val-map.png"),
        ("report", "report.html"),
    ]
    assert [a for a in model.artifacts if a.kind in report_kinds] == [
        a for a in finished.artifacts if a.kind in report_kinds
    ]
    for artifact in (a for a in model.artifacts if a.kind in report_kinds):
        stored = Path(artifact.uri.removeprefix("file://"))
        content = await asyncio.to_thread(stored.read_bytes)
        assert artifact.size_bytes == len(content)
        assert artifact.sha256 == hashlib.sha256(content).hexdigest()
    page = files["report"].read_text(encoding="utf-8")
    assert "Predictions on the test split" in page
    assert "test split, 4 images, epoch 1" in page
    assert page.count('src="data:image/png;base64,') == 3 + 4
    assert "http://" not in page and "https://" not in page and "file:" not in page


async def test_cancelling_a_training_run_stops_it_and_keeps_its_progress(runs, worker, dataset_uri):
    run = await runs.CreateTrainingRun(
        request("to cancel", dataset_uri, architecture="retinanet_r18_fpn", epochs=50)
    )
    events: list[training_run_pb2.TrainingRunEvent] = []
    cancelled_at: int | None = None
    stream = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
    async with asyncio.timeout(180):
        async for event in stream:
            events.append(event)
            if cancelled_at is None and event.WhichOneof("payload") == "progress":
                cancelled_at = event.progress.iteration
                await runs.CancelTrainingRun(
                    training_run_pb2.CancelTrainingRunRequest(name=run.name, reason="e2e")
                )
    states = [s.to_state for s in payloads(events, "state_changed")]
    assert states[-2:] == [TrainingRun.CANCELLING, TrainingRun.CANCELLED]
    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.progress.iteration >= (cancelled_at or 0) > 0, "partial progress is kept"
    assert finished.progress.iteration < finished.progress.max_iterations, "it stopped early"
    assert finished.trained_model == ""
