from __future__ import annotations

import dataclasses

import pytest

from shared.metrics import best_epoch
from shared.proto.raven.training.v1 import training_run_pb2
from trainer_worker.job import is_cancel_request
from trainer_worker.protocol import (
    Evaluated,
    ProgressReported,
    ProtocolError,
    decode,
    encode,
)

State = training_run_pb2.TrainingRun.State


def test_best_epoch_is_the_highest_map_and_the_earliest_on_ties() -> None:
    evaluations = {
        1: {"coco/bbox_mAP": 0.2},
        2: {"coco/bbox_mAP": 0.5, "coco/bbox_mAP_l": -1.0},
        3: {},
        4: {"coco/bbox_mAP": 0.5},
    }
    assert best_epoch(evaluations, last_epoch=4) == 2


def test_without_any_map_the_last_epoch_is_best_and_nothing_is_picked_from_nothing() -> None:
    assert best_epoch({1: {}, 2: {}}, last_epoch=2) == 2
    assert best_epoch({}, last_epoch=0) is None


def test_child_events_round_trip() -> None:
    progress = ProgressReported(
        epoch=1, max_epochs=2, iter=3, max_iters=8, loss=1.5, losses={"loss_cls": 1.0}, eta_s=2.0
    )
    assert decode(encode(progress)) == progress
    assert decode(encode(Evaluated(epoch=2, metrics={}))) == Evaluated(epoch=2, metrics={})
    with pytest.raises(ProtocolError):
        decode(b'{"kind": "nonsense"}')
    with pytest.raises(ProtocolError):
        decode(b"not json")


@pytest.mark.parametrize(
    ("to_state", "expected"),
    [(State.CANCELLING, True), (State.CANCELLED, True), (State.RUNNING, False)],
)
def test_cancel_requests_are_state_changes_to_cancelling(to_state: int, expected: bool) -> None:
    event = training_run_pb2.TrainingRunEvent(
        state_changed=training_run_pb2.TrainingRunEvent.StateChanged(to_state=to_state)
    )
    assert is_cancel_request(event.SerializeToString()) is expected
    assert not is_cancel_request(b"\xff\xff not a protobuf")


def test_an_evaluation_separates_per_class_ap() -> None:
    from trainer_worker.events import evaluation

    message = evaluation(
        Evaluated(
            epoch=2,
            metrics={"coco/bbox_mAP": 0.4, "coco/bbox_mAP_l": -1.0, "coco/tire_precision": 0.5},
        ),
        image_count=4,
    )
    assert dict(message.metrics) == {"coco/bbox_mAP": 0.4, "coco/bbox_mAP_l": -1.0}
    assert dict(message.per_class_ap) == {"tire": 0.5}
    assert len(message.iou_thresholds) == 10 and max(message.iou_thresholds) == 0.95
    assert message.image_count == 4 and message.split == "val"
    # No detections, no mAP: nothing claims thresholds for a score that does not exist.
    empty = evaluation(Evaluated(epoch=1, metrics={}))
    assert not empty.metrics and not empty.iou_thresholds


def test_a_test_evaluation_travels_as_the_test_split() -> None:
    from trainer_worker.events import evaluation, succeeded
    from trainer_worker.outcomes import TrainingSucceeded

    # A line from a child that predates test splits is a validation.
    assert decode(b'{"kind": "evaluation", "epoch": 1, "metrics": {}}').split == "val"
    tested = Evaluated(epoch=2, metrics={"coco/bbox_mAP": 0.3}, split="test", image_count=4)
    assert decode(encode(tested)) == tested
    message = evaluation(tested)
    assert (message.split, message.epoch, message.image_count) == ("test", 2, 4)

    outcome = TrainingSucceeded(
        artifacts=(),
        best_epoch=2,
        best_metrics={"coco/bbox_mAP": 0.5},
        epochs=(),
        epochs_trained=3,
        duration_s=1.0,
        parameter_count=1,
        device="cpu",
        test_evaluation=tested,
    )
    done = succeeded(outcome)
    assert (done.evaluation.split, done.evaluation.metrics["coco/bbox_mAP"]) == ("val", 0.5)
    assert (done.test_evaluation.split, done.test_evaluation.epoch) == ("test", 2)
    assert done.test_evaluation.metrics["coco/bbox_mAP"] == 0.3
    assert done.test_evaluation.image_count == 4
    without = succeeded(dataclasses.replace(outcome, test_evaluation=None))
    assert not without.HasField("test_evaluation")
