"""The job of a model evaluation as the TrainingRun domain sees it: its kind and words, its
findings recorded with its success, no retry as training, and its job message."""

from __future__ import annotations

import uuid

import pytest

from services.training_runs.domain import EvaluationRecord, RunKind, RunState, TrainingRun
from services.training_runs.messages import job_message, run_to_proto
from services.training_runs.repository import BaseModel
from shared.errors import FailedPrecondition
from shared.messaging import Subjects
from shared.payloads import Artifact, DatasetSummary, Evaluation, TrainingFacts
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from shared.reports import Succeeded, report_from_json
from tests.runs import NOW, queued

MODEL = uuid.UUID(int=7)


def evaluation_job() -> TrainingRun:
    return TrainingRun.create(
        display_name="evaluation of m",
        labels={},
        spec={"architecture": "retinanet_r18_fpn", "dataset_uri": "d.json", "seed": 3},
        base_model_id=None,
        creator="user",
        request_id=None,
        request_hash=None,
        now=NOW,
        evaluation=EvaluationRecord(
            trained_model_id=MODEL,
            dataset_uri="d.json",
            image_root="",
            split="test",
            split_of_id=None,
            score_threshold=0.3,
            iou_threshold=0.6,
            samples=2,
            creator="user",
            create_time=NOW,
        ),
    )


def running_job() -> TrainingRun:
    job = evaluation_job()
    job.start_preparing(worker_id="w", actor="worker:w", now=NOW)
    job.record_dataset(DatasetSummary(fingerprint="fp", image_count=5), actor="worker:w", now=NOW)
    job.start_running(device="cpu", actor="worker:w", now=NOW)
    return job


def test_a_job_with_an_evaluation_is_of_kind_evaluation_and_says_so():
    job = running_job()
    assert job.kind is RunKind.EVALUATION and queued().kind is RunKind.TRAINING
    messages = [e.payload.message for e in job.new_events if hasattr(e.payload, "message")]
    assert messages[0] == "queued for evaluation" and messages[-1] == "evaluating on cpu"
    proto = run_to_proto(job)
    assert proto.kind == training_run_pb2.TrainingRun.EVALUATION
    assert proto.model_evaluation == f"trainedModels/{MODEL}/evaluations/{job.id}"
    assert run_to_proto(queued()).kind == training_run_pb2.TrainingRun.TRAINING


def test_success_records_the_findings_on_the_evaluation():
    job = running_job()
    review = {"images_fingerprint": "img-fp", "score_threshold": 0.3}
    artifacts = [Artifact(kind="sample", uri="file:///s.png", name="worst-1.png", sha256="ab")]
    evaluation = Evaluation(metrics={"coco/bbox_mAP": 0.5}, split="test", image_count=4)
    job.succeed_evaluation(
        artifacts=artifacts, evaluation=evaluation, review=review, actor="worker:w", now=NOW
    )
    assert job.state is RunState.SUCCEEDED
    found = job.evaluation
    assert found is not None
    assert (found.dataset_fingerprint, found.images_fingerprint, found.image_count) == (
        "fp",
        "img-fp",
        4,
    )
    assert found.evaluation == evaluation and found.review == review
    assert found.artifacts == artifacts and found.artifacts[0].name == "worst-1.png"


def test_an_evaluation_job_neither_succeeds_as_training_nor_is_retried():
    job = running_job()
    with pytest.raises(FailedPrecondition):
        job.succeed(
            artifacts=(),
            facts=TrainingFacts(),
            best_evaluation=None,
            epoch_metrics=(),
            actor="w",
            now=NOW,
        )
    assert job.state is RunState.RUNNING
    job.request_cancel(reason="", actor="user", now=NOW)
    job.cancelled(actor="worker:w", now=NOW)
    with pytest.raises(FailedPrecondition):
        job.retried(creator="user", request_id=None, request_hash=None, now=NOW)


def test_success_after_the_evaluation_went_with_its_model_fails_the_job():
    job = running_job()
    job.evaluation = None
    job.succeed_evaluation(artifacts=(), evaluation=None, review=None, actor="w", now=NOW)
    assert job.state is RunState.FAILED and job.failure and job.failure.reason == "model_deleted"


def test_the_job_message_carries_the_evaluation_and_the_model_apart_from_base_model():
    job = evaluation_job()
    model = BaseModel(
        id=MODEL,
        architecture="retinanet_r18_fpn",
        classes=["dump"],
        artifacts=[{"kind": "checkpoint", "uri": "file:///c.pth", "sha256": "cd"}],
    )
    message = job_message(job, model, Subjects(namespace="t"))
    sent = worker_pb2.TrainingJob.FromString(message.payload)
    assert not sent.HasField("base_model")
    assert sent.evaluation.name == f"trainedModels/{MODEL}/evaluations/{job.id}"
    assert sent.evaluation.model.checkpoint.sha256 == "cd"
    assert list(sent.evaluation.model.classes) == ["dump"]
    assert (sent.evaluation.split, sent.evaluation.samples) == ("test", 2)
    assert sent.evaluation.score_threshold == pytest.approx(0.3)
    assert sent.evaluation.iou_threshold == pytest.approx(0.6)
    assert sent.spec.seed == 3


def test_a_succeeded_report_keeps_its_review_and_artifact_names():
    data = {
        "artifacts": [{"kind": "plot", "uri": "file:///p.png", "name": "pr-curves.png"}],
        "review": {"images_fingerprint": "x"},
    }
    report = report_from_json(Succeeded.kind, data)
    assert isinstance(report, Succeeded)
    assert report.review == {"images_fingerprint": "x"}
    assert report.artifacts[0].name == "pr-curves.png"
    assert report.to_json()["review"] == {"images_fingerprint": "x"}
    assert report.to_json()["artifacts"][0]["name"] == "pr-curves.png"
