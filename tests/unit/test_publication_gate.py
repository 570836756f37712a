"""The gate a trained model's evaluation passes before it is published."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from services.trained_models.domain import TrainedModel
from shared.errors import FailedPrecondition

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def model(evaluation: dict[str, Any] | None) -> TrainedModel:
    return TrainedModel(
        id=uuid.uuid4(),
        display_name="m",
        architecture="retinanet_r18_fpn",
        classes=["cat"],
        artifacts=[],
        creator="user",
        create_time=NOW,
        update_time=NOW,
        evaluation=evaluation,
    )


TESTED = {"split": "test", "epoch": 3, "metrics": {"coco/bbox_mAP": 0.4}}


def test_a_model_that_meets_what_the_request_relies_on_passes() -> None:
    model(TESTED).ensure_publishable(evaluation_split="test", evaluation_epoch=3, min_bbox_map=0.4)
    model(None).ensure_publishable(evaluation_split="", evaluation_epoch=None, min_bbox_map=None)


@pytest.mark.parametrize(
    ("evaluation", "split", "epoch", "least", "message"),
    [
        (TESTED, "val", None, None, "relies on a val evaluation"),
        (TESTED, "", 2, None, "evaluated at epoch 3"),
        (TESTED, "", None, 0.5, "below the required 0.5"),
        ({"split": "val", "epoch": 1}, "", None, 0.1, "has no coco/bbox_mAP"),
        (None, "test", None, None, "has no evaluation"),
    ],
)
def test_a_model_short_of_it_is_refused(
    evaluation: dict[str, Any] | None,
    split: str,
    epoch: int | None,
    least: float | None,
    message: str,
) -> None:
    with pytest.raises(FailedPrecondition, match=message):
        model(evaluation).ensure_publishable(
            evaluation_split=split, evaluation_epoch=epoch, min_bbox_map=least
        )
