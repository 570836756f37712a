"""Evaluations through the API with the real worker: EvaluateTrainedModel queues the job,
`python -m trainer_worker` runs it, the services record what it found, and its pictures
download by name."""

from __future__ import annotations

import asyncio
import hashlib
import io

import pytest
from PIL import Image

from shared.proto.raven.training.v1 import (
    trained_model_pb2,
    training_run_pb2,
    training_run_pb2_grpc,
)
from shared.settings import Settings
from tests.training import local_dataset, model_of, run_request, watch_to_the_end, worker_fixture

TrainingRun = training_run_pb2.TrainingRun
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

worker = worker_fixture("evaluation-api-worker")


@pytest.fixture(scope="module")
async def trained(runs_channel, trained_models, worker, settings: Settings) -> TrainingRun:
    """A small detector's run (the registry runs too, so that its model is registered)."""
    runs = training_run_pb2_grpc.TrainingRunServiceStub(runs_channel)
    uri = local_dataset(settings, "evaluation-api", images=32, size=128, seed=11)
    run = await runs.CreateTrainingRun(
        run_request(
            "evaluation api",
            uri,
            architecture="rtmdet_tiny",
            epochs=4,
            batch_size=2,
            image_size=128,
            seed=0,
        )
    )
    await asyncio.wait_for(watch_to_the_end(runs, run.name), 420)
    finished = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
    assert finished.state == TrainingRun.SUCCEEDED, finished.failure
    return finished


async def evaluated(runs, models, **request) -> trained_model_pb2.ModelEvaluation:
    started = await models.EvaluateTrainedModel(
        trained_model_pb2.EvaluateTrainedModelRequest(**request)
    )
    await asyncio.wait_for(watch_to_the_end(runs, started.job), 300)
    return await models.GetModelEvaluation(
        trained_model_pb2.GetModelEvaluationRequest(name=started.name)
    )


async def download(models, parent: str, artifact: str) -> tuple[str, bytes]:
    header, data = "", b""
    stream = models.DownloadArtifact(
        trained_model_pb2.DownloadArtifactRequest(parent=parent, artifact=artifact)
    )
    async for part in stream:
        if part.WhichOneof("part") == "artifact":
            header = part.artifact.sha256
        else:
            data += part.chunk
    return header, data


async def test_held_out_images_of_another_size_are_evaluated_and_their_pictures_download(
    runs, models, trained: TrainingRun, settings: Settings
) -> None:
    model = await model_of(runs, trained.name)
    held_out = local_dataset(settings, "evaluation-api-held-out", images=12, size=160, seed=15)

    evaluation = await evaluated(runs, models, trained_model=model, dataset_uri=held_out, samples=2)

    assert evaluation.state == TrainingRun.SUCCEEDED, evaluation.failure
    assert (evaluation.split, evaluation.image_count) == ("all", 12)
    assert evaluation.evaluation.metrics["coco/bbox_mAP_50"] >= 0
    assert set(evaluation.evaluation.per_class_ap) == {"dump", "tire"}
    review = evaluation.review
    assert len(review.images_fingerprint) == 64
    assert [s.rank for s in review.samples] == ["worst", "worst", "best", "best"]
    names = {a.name: a for a in evaluation.artifacts}
    for sample in review.samples:
        sha256, data = await download(models, evaluation.name, sample.artifact)
        assert sha256 == names[sample.artifact].sha256 == hashlib.sha256(data).hexdigest()
        with Image.open(io.BytesIO(data)) as picture:
            assert picture.size == (160, 160)
    _, detections = await download(models, evaluation.name, "detections.json")
    assert detections.startswith(b"[")


async def test_the_runs_own_val_split_scores_as_the_models_validation(
    runs, models, trained: TrainingRun
) -> None:
    model = await models.GetTrainedModel(
        trained_model_pb2.GetTrainedModelRequest(name=await model_of(runs, trained.name))
    )

    evaluation = await evaluated(
        runs, models, trained_model=model.name, split_of=trained.name, split="val", samples=0
    )

    assert evaluation.state == TrainingRun.SUCCEEDED, evaluation.failure
    validation = model.val_evaluation
    assert evaluation.image_count == validation.image_count > 0
    assert evaluation.dataset_fingerprint == model.dataset_fingerprint
    for name in ("coco/bbox_mAP", "coco/bbox_mAP_50"):
        assert evaluation.evaluation.metrics[name] == pytest.approx(
            validation.metrics[name], abs=0.01
        ), name
