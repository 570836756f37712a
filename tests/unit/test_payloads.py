"""The typed payloads keep the proto JSON shape they are stored in, and the worker's
report kinds are the WorkerEvent payload fields."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import Message

from services.training_runs.domain import EventKind, RunState, StateChange
from services.training_runs.domain.events import payload_from_json
from shared.payloads import (
    Artifact,
    DatasetSummary,
    EpochMetrics,
    Evaluation,
    Notice,
    Progress,
    TrainingFacts,
)
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.proto_json import to_dict
from shared.reports import ReportKind, Succeeded, report_from_json


def _duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    duration = Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration


MESSAGES: list[tuple[type[Any], Message]] = [
    (
        Artifact,
        common_pb2.Artifact(kind="checkpoint", uri="file:///a.pth", size_bytes=12, sha256="ab"),
    ),
    (Artifact, common_pb2.Artifact(kind="log")),
    (
        DatasetSummary,
        common_pb2.DatasetSummary(
            fingerprint="f",
            image_count=10,
            annotation_count=30,
            classes=["cat", "dog"],
            instances_per_class={"cat": 20, "dog": 10},
            train_image_count=8,
            val_image_count=1,
            test_image_count=1,
            split_seed=1234567890123,
            split_source="seed",
        ),
    ),
    (
        Evaluation,
        common_pb2.Evaluation(
            metrics={"coco/bbox_mAP": 0.25, "coco/bbox_mAP_50": 0.5},
            epoch=3,
            split="val",
            per_class_ap={"cat": 0.3},
            iou_thresholds=[0.5, 0.55],
            image_count=5,
        ),
    ),
    (Evaluation, common_pb2.Evaluation(epoch=1, split="test")),
    (
        Progress,
        training_run_pb2.Progress(
            epoch=2,
            max_epochs=4,
            iteration=17,
            max_iterations=40,
            loss=1.5,
            losses={"loss_cls": 1.0},
            learning_rate=0.01,
            eta=_duration(12.5),
        ),
    ),
    (Progress, training_run_pb2.Progress(iteration=1)),
    (
        TrainingFacts,
        common_pb2.TrainingFacts(
            duration=_duration(61.25),
            epochs_trained=4,
            best_epoch=3,
            parameter_count=12_345_678,
            device="cuda:0",
            data_loading=common_pb2.DataLoading(workers=2, pin_memory=True),
        ),
    ),
    (TrainingFacts, common_pb2.TrainingFacts(duration=_duration(3))),
    (Notice, training_run_pb2.TrainingRunEvent.Notice(code="head", message="re-initialised")),
]


@pytest.mark.parametrize(("kind", "message"), MESSAGES)
def test_a_payload_reads_and_writes_the_proto_json_of_its_message(
    kind: Any, message: Message
) -> None:
    stored = to_dict(message)
    assert kind.from_json(stored).to_json() == stored


def test_a_stored_checkpoint_keeps_its_epoch_beside_the_artifact_fields() -> None:
    checkpoint = Artifact(kind="resume_checkpoint", uri="file:///e.pth", size_bytes=3, epoch=2)
    stored = checkpoint.to_json()
    assert stored == {
        "kind": "resume_checkpoint",
        "uri": "file:///e.pth",
        "size_bytes": "3",
        "epoch": 2,
    }
    assert Artifact.from_json(stored) == checkpoint


def test_the_series_is_stored_with_every_key() -> None:
    entry = EpochMetrics(epoch=1, train={"loss": 1.0})
    assert entry.to_json() == {"epoch": 1, "train": {"loss": 1.0}, "val": {}}
    assert EpochMetrics.from_json({"epoch": 2}) == EpochMetrics(epoch=2)


def test_the_report_kinds_are_the_worker_event_payload_fields() -> None:
    fields = worker_pb2.WorkerEvent.DESCRIPTOR.oneofs_by_name["payload"].fields
    assert {f.name for f in fields} == {k.value for k in ReportKind}


def test_the_history_kinds_are_the_run_event_payload_fields() -> None:
    fields = training_run_pb2.TrainingRunEvent.DESCRIPTOR.oneofs_by_name["payload"].fields
    assert {f.name for f in fields} == {k.value for k in EventKind}


@pytest.mark.parametrize("kind", list(ReportKind))
def test_every_report_kind_reads_its_empty_payload(kind: ReportKind) -> None:
    assert report_from_json(kind, {}).kind is kind


def test_a_success_report_reads_what_the_worker_sends() -> None:
    message = worker_pb2.WorkerEvent.Succeeded(
        artifacts=[common_pb2.Artifact(kind="checkpoint", uri="file:///m.pth", size_bytes=9)],
        facts=common_pb2.TrainingFacts(best_epoch=2, epochs_trained=3),
        evaluation=common_pb2.Evaluation(metrics={"coco/bbox_mAP": 0.4}, epoch=2, split="val"),
        epochs=[training_run_pb2.TrainingRunMetrics.EpochMetrics(epoch=1, train={"loss": 2.0})],
    )
    report = report_from_json(ReportKind.SUCCEEDED, to_dict(message))
    assert isinstance(report, Succeeded)
    assert report.artifacts == [Artifact(kind="checkpoint", uri="file:///m.pth", size_bytes=9)]
    assert report.facts == TrainingFacts(best_epoch=2, epochs_trained=3)
    assert report.evaluation == Evaluation(metrics={"coco/bbox_mAP": 0.4}, epoch=2, split="val")
    assert report.epochs == [EpochMetrics(epoch=1, train={"loss": 2.0})]
    assert report.test_evaluation is None


def test_a_history_entry_reads_back_what_it_stored() -> None:
    change = StateChange(
        from_state="QUEUED", to_state=RunState.PREPARING, reason="started", message="w"
    )
    assert payload_from_json(EventKind.STATE_CHANGED, change.to_json()) == change


def test_a_report_writes_the_proto_json_of_its_worker_event_field() -> None:
    event = worker_pb2.WorkerEvent(
        succeeded=worker_pb2.WorkerEvent.Succeeded(
            artifacts=[common_pb2.Artifact(kind="log", uri="file:///l.txt")],
            facts=common_pb2.TrainingFacts(best_epoch=1, duration=_duration(2.5)),
            test_evaluation=common_pb2.Evaluation(epoch=1, split="test"),
        )
    )
    others = [
        worker_pb2.WorkerEvent(running=worker_pb2.WorkerEvent.Running(device="cuda:0")),
        worker_pb2.WorkerEvent(preparing=worker_pb2.WorkerEvent.Preparing()),
        worker_pb2.WorkerEvent(
            checkpoint_saved=worker_pb2.WorkerEvent.CheckpointSaved(
                epoch=2, iteration=40, checkpoint=common_pb2.Artifact(uri="file:///c.pth")
            )
        ),
        worker_pb2.WorkerEvent(failed=training_run_pb2.Failure(reason="oom", message="m")),
        worker_pb2.WorkerEvent(released=worker_pb2.WorkerEvent.Released(reason="shutdown")),
    ]
    for message in [event, *others]:
        field = message.WhichOneof("payload")
        assert field is not None
        stored = to_dict(getattr(message, field))
        assert report_from_json(ReportKind(field), stored).to_json() == stored


def test_a_text_that_reads_zero_is_a_value_not_a_default() -> None:
    artifact = common_pb2.Artifact(kind="0", sha256="0", size_bytes=0)
    assert Artifact.from_json(to_dict(artifact)).to_json() == {"kind": "0", "sha256": "0"}


def test_a_metric_that_is_not_finite_is_stored_as_proto_json_writes_it() -> None:
    message = common_pb2.Evaluation(metrics={"a": float("nan"), "b": float("inf")}, epoch=1)
    stored = to_dict(message)
    assert Evaluation.from_json(stored).to_json() == stored
