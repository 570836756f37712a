"""Model evaluations through the public gRPC API on real Postgres, JetStream and servers:
EvaluateTrainedModel queues a job of kind EVALUATION on the training queue; the job is
driven with WorkerEvents as a trainer worker sends them; its success writes the findings
onto the evaluation and registers no model.

The trained model evaluated is made the same way: a training run driven to SUCCEEDED,
its files written under the session's artifact root.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import grpc
import nats
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from shared.db.schema import model_evaluations, training_runs
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import (
    common_pb2,
    trained_model_pb2,
    trained_model_pb2_grpc,
    training_run_pb2,
    training_run_pb2_grpc,
    worker_pb2,
)
from shared.settings import Settings
from tests import pki as test_pki
from tests.cli import raven
from tests.pki import sa
from tests.support import WorkerDriver, create_request, eventually, violations

TrainingRun = training_run_pb2.TrainingRun
pb = trained_model_pb2
Review = common_pb2.DetectionReview
pytestmark = pytest.mark.timeout(90)


def _artifact(kind: str, path: Path, name: str = "") -> common_pb2.Artifact:
    data = path.read_bytes()
    return common_pb2.Artifact(
        kind=kind,
        uri=path.as_uri(),
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        name=name,
    )


class Lab:
    """Trained models made by driven runs, and their evaluations' jobs driven likewise."""

    def __init__(self, runs, models, js, subjects: Subjects, settings: Settings, dataset_uri):
        self.runs, self.models, self.js, self.subjects = runs, models, js, subjects
        self.root = Path(settings.artifact_root)
        self.settings = settings
        self.dataset_uri = dataset_uri

    async def trained_run(self, *, test_images: int = 2, **spec: object) -> TrainingRun:
        """A SUCCEEDED training run with a test split of `test_images` images."""
        run = await self.runs.CreateTrainingRun(create_request(self.dataset_uri, **spec))
        worker = WorkerDriver(self.js, self.subjects, run)
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(
            dataset_prepared=common_pb2.DatasetSummary(
                fingerprint=f"fp-{run.name[-8:]}",
                image_count=16,
                classes=["dump", "tire"],
                train_image_count=16 - 4 - test_images,
                val_image_count=4,
                test_image_count=test_images,
            )
        )
        await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
        folder = self.root / "models" / run.name.split("/")[1]
        folder.mkdir(parents=True)
        (folder / "config.py").write_text("model = dict(type='RetinaNet')\n")
        (folder / "checkpoint.pth").write_bytes(uuid.uuid4().bytes * 1000)
        await worker.send(
            succeeded=worker_pb2.WorkerEvent.Succeeded(
                artifacts=[
                    _artifact("config", folder / "config.py"),
                    _artifact("checkpoint", folder / "checkpoint.pth"),
                ],
                facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=2, device="cpu"),
                evaluation=common_pb2.Evaluation(
                    epoch=2, split="val", metrics={"coco/bbox_mAP": 0.25}, image_count=4
                ),
            )
        )
        return await eventually(lambda: self._with_model(run.name), timeout=15)

    async def _with_model(self, name: str) -> TrainingRun | None:
        run = await self.runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))
        return run if run.trained_model else None

    async def registry_idle(self) -> bool:
        """The model registry consumed every run completion published so far."""
        info = await self.js.consumer_info(
            self.subjects.events_stream, self.subjects.model_registry_consumer
        )
        return info.num_pending == 0 and info.num_ack_pending == 0

    async def model(self) -> pb.TrainedModel:
        run = await self.trained_run()
        return await self.models.GetTrainedModel(pb.GetTrainedModelRequest(name=run.trained_model))

    async def evaluate(self, model: pb.TrainedModel, **fields: object) -> pb.ModelEvaluation:
        request = pb.EvaluateTrainedModelRequest(
            trained_model=model.name, request_id=str(uuid.uuid4()), **fields
        )
        if "split_of" not in fields and "dataset_uri" not in fields:
            request.dataset_uri = self.dataset_uri
        return await self.models.EvaluateTrainedModel(request)

    async def job_of(self, evaluation: pb.ModelEvaluation) -> TrainingRun:
        return await self.runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=evaluation.job)
        )

    async def get(self, evaluation: pb.ModelEvaluation) -> pb.ModelEvaluation:
        return await self.models.GetModelEvaluation(
            pb.GetModelEvaluationRequest(name=evaluation.name)
        )

    async def queued_job(self, run_name: str) -> worker_pb2.TrainingJob:
        run_id = run_name.split("/")[1]

        async def last() -> bytes | None:
            try:
                msg = await self.js.get_last_msg(
                    self.subjects.jobs_stream, self.subjects.job(run_id)
                )
            except nats.js.errors.NotFoundError:
                return None
            return msg.data

        return worker_pb2.TrainingJob.FromString(await eventually(last))

    async def run_to_success(
        self, evaluation: pb.ModelEvaluation, *, fingerprint: str = "fp-eval"
    ) -> tuple[WorkerDriver, worker_pb2.WorkerEvent.Succeeded]:
        worker = WorkerDriver(self.js, self.subjects, await self.job_of(evaluation))
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(
            dataset_prepared=common_pb2.DatasetSummary(
                fingerprint=fingerprint, image_count=6, classes=["dump", "tire"]
            )
        )
        await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
        succeeded = _findings(self.root / "evaluations" / evaluation.job.split("/")[1])
        await worker.send("evaluation-succeeded-" + evaluation.job[-8:], succeeded=succeeded)
        return worker, succeeded


def _findings(folder: Path) -> worker_pb2.WorkerEvent.Succeeded:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text('{"metrics": {}}')
    (folder / "worst-1.png").write_bytes(b"\x89PNG worst")
    (folder / "pr-curves.png").write_bytes(b"\x89PNG curves")
    review = Review(
        pr_curves=[
            Review.PrCurve(class_name="dump", iou="0.50", recall=[0.0, 0.5], precision=[1, 0.5]),
            Review.PrCurve(class_name="dump", iou="0.50:0.95", recall=[0.0], precision=[0.25]),
        ],
        confusion_matrix=Review.ConfusionMatrix(
            labels=["dump", "tire", "background"], counts=[3, 0, 1, 0, 2, 0, 1, 1, 0]
        ),
        class_counts=[
            Review.ClassCounts(class_name="dump", true_positives=3, false_positives=1),
            Review.ClassCounts(class_name="tire", true_positives=2, false_negatives=1),
        ],
        score_threshold=0.5,
        iou_threshold=0.5,
        samples=[
            Review.Sample(
                rank="worst",
                image_id=7,
                file_name="img7.jpg",
                false_positives=2,
                artifact="worst-1.png",
            )
        ],
        images_fingerprint="images-fp-1",
    )
    return worker_pb2.WorkerEvent.Succeeded(
        artifacts=[
            _artifact("evaluation", folder / "evaluation.json", "evaluation.json"),
            _artifact("sample", folder / "worst-1.png", "worst-1.png"),
            _artifact("plot", folder / "pr-curves.png", "pr-curves.png"),
        ],
        evaluation=common_pb2.Evaluation(
            split="all",
            metrics={"coco/bbox_mAP": 0.4, "coco/bbox_mAP_50": 0.7},
            per_class_ap={"dump": 0.5, "tire": 0.3},
            image_count=6,
        ),
        review=review,
    )


@pytest.fixture
def lab(runs, models, js, subjects, settings, dataset_uri) -> Lab:
    return Lab(runs, models, js, subjects, settings, dataset_uri)


@pytest.fixture(scope="module")
async def model(
    runs_channel, models_channel, nc, subjects, settings, dataset_uri
) -> pb.TrainedModel:
    """One trained model for the tests that do not need one of their own."""
    lab = Lab(
        training_run_pb2_grpc.TrainingRunServiceStub(runs_channel),
        trained_model_pb2_grpc.TrainedModelServiceStub(models_channel),
        nc.jetstream(),
        subjects,
        settings,
        dataset_uri,
    )
    return await lab.model()


async def _refused(call, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    return caught.value


# Starting an evaluation.


async def test_an_evaluation_is_a_queued_job_of_its_own_kind(lab, model):
    evaluation = await lab.evaluate(model)
    model_id = model.name.split("/")[1]
    job_id = evaluation.job.removeprefix("trainingRuns/")
    assert evaluation.name == f"trainedModels/{model_id}/evaluations/{job_id}"
    assert evaluation.state == TrainingRun.QUEUED
    assert (evaluation.split, evaluation.split_of) == ("all", "")
    assert (evaluation.score_threshold, evaluation.iou_threshold) == (0.5, 0.5)
    assert evaluation.dataset_uri == lab.dataset_uri
    assert evaluation.creator and evaluation.HasField("create_time")
    assert not evaluation.HasField("evaluation") and not evaluation.artifacts

    job = await lab.job_of(evaluation)
    assert job.kind == TrainingRun.EVALUATION and job.model_evaluation == evaluation.name
    assert job.spec.architecture == model.architecture and job.spec.dataset_uri == lab.dataset_uri
    assert not job.base_model, "the evaluated model is not a base model of a training"

    queued = await lab.queued_job(evaluation.job)
    checkpoint = next(a for a in model.artifacts if a.kind == "checkpoint")
    assert queued.training_run == evaluation.job and queued.attempt == 1
    assert queued.evaluation.name == evaluation.name
    assert queued.evaluation.model.name == model.name
    assert queued.evaluation.model.checkpoint.sha256 == checkpoint.sha256
    assert list(queued.evaluation.model.classes) == list(model.classes)
    assert queued.evaluation.split == "all"
    assert (queued.evaluation.score_threshold, queued.evaluation.iou_threshold) == (0.5, 0.5)
    assert queued.evaluation.samples == 3
    assert not queued.HasField("base_model")
    assert queued.spec == job.spec


async def test_the_thresholds_samples_and_device_asked_for_are_kept(lab, model):
    evaluation = await lab.evaluate(
        model,
        score_threshold=0.0,
        iou_threshold=0.75,
        samples=0,
        device=training_run_pb2.TrainingSpec.CPU,
        split="val",
    )
    assert (evaluation.score_threshold, evaluation.iou_threshold) == (0.0, 0.75)
    queued = await lab.queued_job(evaluation.job)
    assert queued.evaluation.samples == 0 and queued.evaluation.split == "val"
    assert queued.spec.device == training_run_pb2.TrainingSpec.CPU


async def test_an_evaluation_of_a_runs_split_draws_it_as_the_run_did(lab, model):
    run = await lab.trained_run(seed=1234, test_fraction=0.2, image_size=256)
    evaluation = await lab.evaluate(model, split_of=run.name)
    assert (evaluation.split, evaluation.split_of) == ("test", run.name)
    assert evaluation.dataset_uri == run.spec.dataset_uri
    job = await lab.job_of(evaluation)
    assert job.spec.seed == 1234 and job.spec.test_fraction == pytest.approx(0.2)
    assert job.spec.val_fraction == run.spec.val_fraction and job.spec.image_size == 256

    val = await lab.evaluate(model, split_of=run.name, split="val")
    assert val.split == "val"


async def test_a_split_the_run_does_not_have_is_a_failed_precondition(lab, model):
    run = await lab.trained_run(test_images=0)
    error = await _refused(
        lab.models.EvaluateTrainedModel,
        pb.EvaluateTrainedModelRequest(trained_model=model.name, split_of=run.name),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no test split" in (error.details() or "")


async def test_every_bad_field_is_named_at_once(lab, model):
    error = await _refused(
        lab.models.EvaluateTrainedModel,
        pb.EvaluateTrainedModelRequest(
            trained_model=model.name,
            split="holdout",
            score_threshold=1.5,
            iou_threshold=0.0,
            samples=11,
            request_id="not-a-uuid",
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    found = violations(error)
    assert set(found) == {
        "split",
        "score_threshold",
        "iou_threshold",
        "samples",
        "request_id",
        "dataset_uri",
    }, found
    assert "split_of" in found["dataset_uri"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"trained_model": "trainedModels/nope"}, "trained_model"),
        ({"trained_model": "trainingRuns/" + str(uuid.UUID(int=1))}, "trained_model"),
        ({"split_of": "trainedModels/" + str(uuid.UUID(int=1))}, "split_of"),
        ({"dataset_uri": "datasets/missing/annotations.json"}, "dataset_uri"),
        ({"dataset_uri": "ftp://host/annotations.json"}, "dataset_uri"),
        ({"dataset_uri": "../../etc/passwd"}, "dataset_uri"),
        ({"score_threshold": float("nan")}, "score_threshold"),
        ({"samples": -1}, "samples"),
        ({"image_root": "ftp://host/images"}, "image_root"),
        ({"dataset_uri": "datasets/a\x00b.json"}, "dataset_uri"),
        ({"dataset_uri": "datasets/" + "n" * 3000 + ".json"}, "dataset_uri"),
        ({"split": "x" * 5000}, "split"),
        ({"request_id": "r" * 100}, "request_id"),
        ({"device": 99}, "device"),
    ],
)
async def test_hostile_fields_are_invalid_arguments_naming_them(lab, model, fields, field):
    request = pb.EvaluateTrainedModelRequest(trained_model=model.name, dataset_uri=lab.dataset_uri)
    for key, value in fields.items():
        setattr(request, key, value)
    error = await _refused(lab.models.EvaluateTrainedModel, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    found = violations(error)
    assert field in found, found
    assert str(lab.root) not in (error.details() or "") + " ".join(found.values())


async def test_unknown_models_and_runs_are_not_found(lab, model):
    missing = "trainedModels/" + str(uuid.uuid4())
    error = await _refused(
        lab.models.EvaluateTrainedModel,
        pb.EvaluateTrainedModelRequest(trained_model=missing, dataset_uri=lab.dataset_uri),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await _refused(
        lab.models.EvaluateTrainedModel,
        pb.EvaluateTrainedModelRequest(
            trained_model=model.name, split_of="trainingRuns/" + str(uuid.uuid4())
        ),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_split_of_an_evaluation_job_is_a_failed_precondition(lab, model):
    evaluation = await lab.evaluate(model)
    error = await _refused(
        lab.models.EvaluateTrainedModel,
        pb.EvaluateTrainedModelRequest(trained_model=model.name, split_of=evaluation.job),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_repeated_request_id_returns_the_first_evaluation(lab, model):
    request = pb.EvaluateTrainedModelRequest(
        trained_model=model.name, dataset_uri=lab.dataset_uri, request_id=str(uuid.uuid4())
    )
    first = await lab.models.EvaluateTrainedModel(request)
    again = await lab.models.EvaluateTrainedModel(request)
    assert again.name == first.name
    request.score_threshold = 0.9
    error = await _refused(lab.models.EvaluateTrainedModel, request)
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS


# The job's life.


async def test_success_writes_the_findings_and_registers_no_model(lab, model, settings):
    evaluation = await lab.evaluate(model)
    worker, succeeded = await lab.run_to_success(evaluation, fingerprint="fp-findings")

    async def done() -> pb.ModelEvaluation | None:
        found = await lab.get(evaluation)
        return found if found.state == TrainingRun.SUCCEEDED else None

    found = await eventually(done)
    assert found.evaluation == succeeded.evaluation
    assert found.review == succeeded.review
    assert list(found.artifacts) == list(succeeded.artifacts)
    assert [a.name for a in found.artifacts] == ["evaluation.json", "worst-1.png", "pr-curves.png"]
    assert (found.dataset_fingerprint, found.image_count) == ("fp-findings", 6)
    assert found.HasField("end_time") and not found.HasField("failure")

    engine = create_async_engine(settings.database_url)
    try:
        async with engine.connect() as connection:
            row = (
                await connection.execute(
                    select(model_evaluations, training_runs.c.state)
                    .join(training_runs, training_runs.c.id == model_evaluations.c.id)
                    .where(model_evaluations.c.id == uuid.UUID(evaluation.job.split("/")[1]))
                )
            ).one()
    finally:
        await engine.dispose()
    assert row.state == "SUCCEEDED"
    assert (row.images_fingerprint, row.dataset_fingerprint) == ("images-fp-1", "fp-findings")

    # A redelivered success is applied once; the job never becomes a model.
    await worker.send("evaluation-succeeded-" + evaluation.job[-8:], succeeded=succeeded)
    history = await lab.runs.ListTrainingRunEvents(
        training_run_pb2.ListTrainingRunEventsRequest(name=evaluation.job)
    )
    ends = [e for e in history.events if e.state_changed.to_state == TrainingRun.SUCCEEDED]
    assert len(ends) == 1 and ends[0].state_changed.message == "evaluation finished"
    await eventually(lab.registry_idle, timeout=15)
    job = await lab.job_of(evaluation)
    assert not job.trained_model
    listed = await lab.models.ListTrainedModels(pb.ListTrainedModelsRequest(training_run=job.name))
    assert not listed.trained_models


async def test_a_failed_job_fails_its_evaluation_with_the_reason(lab, model):
    evaluation = await lab.evaluate(model)
    worker = WorkerDriver(lab.js, lab.subjects, await lab.job_of(evaluation))
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(
        failed=training_run_pb2.Failure(
            reason="checkpoint_invalid", message="the checkpoint is not the model's"
        )
    )

    async def failed() -> pb.ModelEvaluation | None:
        found = await lab.get(evaluation)
        return found if found.state == TrainingRun.FAILED else None

    found = await eventually(failed)
    assert found.failure.reason == "checkpoint_invalid"
    assert not found.HasField("evaluation")


async def test_cancel_a_queued_evaluation_at_once_and_a_running_one_by_its_worker(lab, model):
    queued = await lab.evaluate(model)
    cancel = pb.CancelModelEvaluationRequest(name=queued.name, reason="wrong dataset")
    cancelled = await lab.models.CancelModelEvaluation(cancel)
    assert cancelled.state == TrainingRun.CANCELLED
    assert cancelled.failure.reason == "cancelled" and cancelled.failure.message == "wrong dataset"
    again = await lab.models.CancelModelEvaluation(cancel)
    assert again.state == TrainingRun.CANCELLED

    running = await lab.evaluate(model)
    worker = WorkerDriver(lab.js, lab.subjects, await lab.job_of(running))
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))

    async def state_is(state: int) -> pb.ModelEvaluation | None:
        found = await lab.get(running)
        return found if found.state == state else None

    await eventually(lambda: state_is(TrainingRun.RUNNING))
    cancelling = await lab.models.CancelModelEvaluation(
        pb.CancelModelEvaluationRequest(name=running.name)
    )
    assert cancelling.state == TrainingRun.CANCELLING
    await worker.send(cancelled=worker_pb2.WorkerEvent.Cancelled())
    assert (await eventually(lambda: state_is(TrainingRun.CANCELLED))).failure.reason == "cancelled"


async def test_a_finished_evaluation_cannot_be_cancelled(lab, model):
    evaluation = await lab.evaluate(model)
    await lab.run_to_success(evaluation)

    async def done() -> pb.ModelEvaluation | None:
        found = await lab.get(evaluation)
        return found if found.state == TrainingRun.SUCCEEDED else None

    await eventually(done)
    error = await _refused(
        lab.models.CancelModelEvaluation, pb.CancelModelEvaluationRequest(name=evaluation.name)
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_evaluation_job_is_not_retried_as_a_training_run(lab, model):
    evaluation = await lab.evaluate(model)
    await lab.models.CancelModelEvaluation(pb.CancelModelEvaluationRequest(name=evaluation.name))
    error = await _refused(
        lab.runs.RetryTrainingRun,
        training_run_pb2.RetryTrainingRunRequest(name=evaluation.job),
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


# Reading evaluations.


async def test_get_names_an_evaluation_of_its_own_model_only(lab, model):
    evaluation = await lab.evaluate(model)
    other = await lab.model()
    model_id, job_id = evaluation.name.split("/")[1], evaluation.name.split("/")[3]
    wrong = evaluation.name.replace(model_id, other.name.split("/")[1])
    for name in (wrong, f"trainedModels/{model_id}/evaluations/{uuid.uuid4()}"):
        error = await _refused(
            lab.models.GetModelEvaluation, pb.GetModelEvaluationRequest(name=name)
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND, name
    # A training run's id is no evaluation's.
    run_id = (await lab.runs.CreateTrainingRun(create_request(lab.dataset_uri))).name.split("/")[1]
    error = await _refused(
        lab.models.GetModelEvaluation,
        pb.GetModelEvaluationRequest(name=f"trainedModels/{model_id}/evaluations/{run_id}"),
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    for name in ("", f"trainedModels/{model_id}", f"trainedModels/{model_id}/runs/{job_id}"):
        error = await _refused(
            lab.models.GetModelEvaluation, pb.GetModelEvaluationRequest(name=name)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "name" in violations(error)


async def test_list_filters_and_pages_newest_first(lab):
    model = await lab.model()
    made = [await lab.evaluate(model) for _ in range(3)]
    succeeded = await lab.evaluate(model, split="val")
    await lab.run_to_success(succeeded, fingerprint="fp-listed")

    async def listed(**fields: object) -> list[str]:
        names, token = [], ""
        while True:
            page = await lab.models.ListModelEvaluations(
                pb.ListModelEvaluationsRequest(page_size=2, page_token=token, **fields)
            )
            assert len(page.evaluations) <= 2
            names += [e.name for e in page.evaluations]
            token = page.next_page_token
            if not token:
                return names

    every = [e.name for e in reversed([*made, succeeded])]
    assert await listed(trained_model=model.name) == every

    async def succeeded_listed() -> list[str] | None:
        found = await listed(trained_model=model.name, states=[TrainingRun.SUCCEEDED], split="val")
        return found or None

    assert await eventually(succeeded_listed) == [succeeded.name]
    assert await listed(trained_model=model.name, dataset_fingerprint="fp-listed") == [
        succeeded.name
    ]
    assert await listed(trained_model=model.name, split="all", states=[TrainingRun.QUEUED]) == [
        e.name for e in reversed(made)
    ]
    everywhere = await listed(trained_model="trainedModels/-")
    assert set(every) <= set(everywhere) and len(everywhere) == len(set(everywhere))

    # Evaluation jobs are listed as training runs only when asked for.
    runs = await lab.runs.ListTrainingRuns(training_run_pb2.ListTrainingRunsRequest(page_size=1000))
    assert all(r.kind != TrainingRun.EVALUATION for r in runs.training_runs)
    jobs = await lab.runs.ListTrainingRuns(
        training_run_pb2.ListTrainingRunsRequest(page_size=1000, kinds=[TrainingRun.EVALUATION])
    )
    assert {e.job for e in made} <= {r.name for r in jobs.training_runs}
    assert all(r.kind == TrainingRun.EVALUATION for r in jobs.training_runs)
    both = await lab.runs.ListTrainingRuns(
        training_run_pb2.ListTrainingRunsRequest(
            page_size=1000, kinds=[TrainingRun.TRAINING, TrainingRun.EVALUATION]
        )
    )
    assert {r.kind for r in both.training_runs} == {TrainingRun.TRAINING, TrainingRun.EVALUATION}


async def test_list_refuses_a_bad_filter_and_a_token_of_another_query(lab, model):
    for fields, field in (
        ({"trained_model": ""}, "trained_model"),
        ({"trained_model": "trainedModels/x"}, "trained_model"),
        ({"trained_model": model.name, "split": "holdout"}, "split"),
        ({"trained_model": model.name, "page_size": -1}, "page_size"),
    ):
        error = await _refused(
            lab.models.ListModelEvaluations, pb.ListModelEvaluationsRequest(**fields)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert field in violations(error), fields
    for _ in range(2):
        await lab.evaluate(model)
    page = await lab.models.ListModelEvaluations(
        pb.ListModelEvaluationsRequest(trained_model=model.name, page_size=1)
    )
    assert page.next_page_token
    error = await _refused(
        lab.models.ListModelEvaluations,
        pb.ListModelEvaluationsRequest(
            trained_model="trainedModels/-", page_size=1, page_token=page.next_page_token
        ),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    missing = "trainedModels/" + str(uuid.uuid4())
    error = await _refused(
        lab.models.ListModelEvaluations, pb.ListModelEvaluationsRequest(trained_model=missing)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


# Callers that may read only their own models.

OWN = sa("evaluations-own")


async def test_a_caller_limited_to_its_own_models_sees_their_evaluations_only(
    lab, model, pki, training_runs, trained_models
):
    theirs = await lab.evaluate(model)
    their_run = await lab.job_of(theirs)
    pki.write_policy(
        [
            *test_pki.BASE_GRANTS,
            (
                OWN,
                [
                    "training_runs.read.own",
                    "training_runs.create",
                    "trained_models.read.own",
                    "trained_models.evaluate",
                ],
            ),
        ]
    )
    try:
        async with (
            pki.channel(training_runs.port, OWN) as runs_channel,
            pki.channel(trained_models.port, OWN) as models_channel,
        ):
            mine = Lab(
                training_run_pb2_grpc.TrainingRunServiceStub(runs_channel),
                trained_model_pb2_grpc.TrainedModelServiceStub(models_channel),
                lab.js,
                lab.subjects,
                lab.settings,
                lab.dataset_uri,
            )
            own_model = await mine.model()
            own_evaluation = await mine.evaluate(own_model)
            assert own_evaluation.creator == OWN

            refusals = [
                (
                    mine.models.EvaluateTrainedModel,
                    pb.EvaluateTrainedModelRequest(
                        trained_model=model.name, dataset_uri=lab.dataset_uri
                    ),
                ),
                (
                    mine.models.EvaluateTrainedModel,
                    pb.EvaluateTrainedModelRequest(
                        trained_model=own_model.name, split_of=model.training_run
                    ),
                ),
                (mine.models.GetModelEvaluation, pb.GetModelEvaluationRequest(name=theirs.name)),
                (
                    mine.models.CancelModelEvaluation,
                    pb.CancelModelEvaluationRequest(name=theirs.name),
                ),
                (
                    mine.models.ListModelEvaluations,
                    pb.ListModelEvaluationsRequest(trained_model=model.name),
                ),
                (
                    mine.runs.GetTrainingRun,
                    training_run_pb2.GetTrainingRunRequest(name=their_run.name),
                ),
            ]
            for call, request in refusals:
                error = await _refused(call, request)
                assert error.code() == grpc.StatusCode.NOT_FOUND, (request, error.details())

            listed = await mine.models.ListModelEvaluations(
                pb.ListModelEvaluationsRequest(trained_model="trainedModels/-", page_size=1000)
            )
            assert [e.name for e in listed.evaluations] == [own_evaluation.name]
    finally:
        pki.write_policy(test_pki.BASE_GRANTS)
    # Theirs was left as it was.
    assert (await lab.get(theirs)).state == TrainingRun.QUEUED


async def test_a_model_deleted_while_evaluated_fails_the_job_and_takes_its_evaluation(lab):
    model = await lab.model()
    evaluation = await lab.evaluate(model)
    worker = WorkerDriver(lab.js, lab.subjects, await lab.job_of(evaluation))
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await lab.models.DeleteTrainedModel(pb.DeleteTrainedModelRequest(name=model.name))
    error = await _refused(
        lab.models.GetModelEvaluation, pb.GetModelEvaluationRequest(name=evaluation.name)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND

    await worker.send(succeeded=_findings(lab.root / "evaluations" / "orphan"))

    async def failed() -> TrainingRun | None:
        job = await lab.job_of(evaluation)
        return job if job.state == TrainingRun.FAILED else None

    job = await eventually(failed)
    assert job.failure.reason == "model_deleted" and not job.model_evaluation


async def test_the_cli_starts_lists_and_shows_evaluations(
    lab, model, pki, training_runs, trained_models
):
    started = await raven(
        pki,
        training_runs,
        trained_models,
        "models",
        "evaluate",
        model.name,
        "--dataset",
        str(lab.root / lab.dataset_uri),
        "--split",
        "val",
        "--samples",
        "1",
    )
    assert started.exit_code == 0, started.output
    listed = await lab.models.ListModelEvaluations(
        pb.ListModelEvaluationsRequest(trained_model=model.name, page_size=1)
    )
    newest = listed.evaluations[0]
    assert newest.split == "val" and newest.name.split("/")[-1] in started.output
    assert (await lab.queued_job(newest.job)).evaluation.samples == 1
    shown = await raven(pki, training_runs, trained_models, "models", "evaluations", model.name)
    assert shown.exit_code == 0 and newest.name.split("/")[-1][:8] in shown.output, shown.output
    refused = await raven(
        pki,
        training_runs,
        trained_models,
        "models",
        "evaluate",
        model.name,
        "--split-of",
        "trainingRuns/" + str(uuid.uuid4()),
    )
    assert refused.exit_code == 1 and "NOT_FOUND" in refused.output, refused.output


async def test_an_evaluations_progress_is_watched_and_resumed_as_a_runs(lab, model):
    evaluation = await lab.evaluate(model)
    await lab.run_to_success(evaluation)

    async def watched(after: int) -> list[training_run_pb2.TrainingRunEvent]:
        request = training_run_pb2.WatchTrainingRunRequest(
            name=evaluation.job, after_sequence=after
        )
        return [e async for e in lab.runs.WatchTrainingRun(request, timeout=20)]

    every = await watched(0)
    assert [e.sequence for e in every] == list(range(1, len(every) + 1))
    assert every[0].state_changed.message == "queued for evaluation"
    assert every[-1].state_changed.to_state == TrainingRun.SUCCEEDED
    assert any(e.WhichOneof("payload") == "dataset_prepared" for e in every)
    resumed = await watched(2)
    assert [e.sequence for e in resumed] == [e.sequence for e in every[2:]]


async def test_concurrent_identical_requests_start_one_evaluation(lab, model):
    request = pb.EvaluateTrainedModelRequest(
        trained_model=model.name, dataset_uri=lab.dataset_uri, request_id=str(uuid.uuid4())
    )
    results = await asyncio.gather(
        *(lab.models.EvaluateTrainedModel(request) for _ in range(8)), return_exceptions=True
    )
    assert all(isinstance(r, pb.ModelEvaluation) for r in results), results
    assert len({r.name for r in results}) == 1
    listed = await lab.models.ListModelEvaluations(
        pb.ListModelEvaluationsRequest(trained_model=model.name, page_size=1000)
    )
    assert sum(e.name == results[0].name for e in listed.evaluations) == 1
