"""What an evaluation job evaluates (trainer_worker.evaluation_inputs): its request checked
field by field, the split's images, the model's labels mapped by class name onto the
dataset's category ids, detections in COCO results format and the images' fingerprint."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from trainer_worker.evaluation_inputs import (
    EvaluationRefused,
    checked_request,
    class_differences,
    detections,
    ground_truth,
    images_fingerprint,
    label_categories,
    split_image_ids,
)

CATEGORIES = [{"id": 3, "name": "tire"}, {"id": 7, "name": "dump"}]


@pytest.mark.parametrize(
    ("split", "score", "iou", "samples", "field"),
    [
        ("holdout", 0.5, 0.5, 3, "evaluation.split"),
        ("", 0.5, 0.5, 3, "evaluation.split"),
        ("test", -0.1, 0.5, 3, "evaluation.score_threshold"),
        ("test", 1.5, 0.5, 3, "evaluation.score_threshold"),
        ("test", 0.5, 0.0, 3, "evaluation.iou_threshold"),
        ("test", 0.5, 1.01, 3, "evaluation.iou_threshold"),
        ("test", 0.5, 0.5, -1, "evaluation.samples"),
        ("test", 0.5, 0.5, 11, "evaluation.samples"),
    ],
)
def test_a_request_out_of_range_is_refused_naming_its_field(
    split: str, score: float, iou: float, samples: int, field: str
) -> None:
    with pytest.raises(EvaluationRefused) as refused:
        checked_request(split, score=score, iou=iou, samples=samples)
    assert refused.value.reason == "invalid_spec"
    assert refused.value.message.startswith(field)


def test_the_edges_of_each_range_are_accepted() -> None:
    for split in ("all", "train", "val", "test"):
        checked_request(split, score=0.0, iou=1.0, samples=0)
    thresholds = checked_request("val", score=1.0, iou=0.01, samples=10)
    assert (thresholds.score, thresholds.iou, thresholds.samples) == (1.0, 0.01, 10)


def test_a_split_names_its_images_and_all_names_every_split() -> None:
    membership = {"source": "seed", "train": [5, 1], "val": [9], "test": [4, 2]}
    assert split_image_ids("train", membership) == [1, 5]
    assert split_image_ids("test", membership) == [2, 4]
    assert split_image_ids("all", membership) == [1, 2, 4, 5, 9]


def test_an_empty_split_is_refused_with_what_the_dataset_has() -> None:
    with pytest.raises(EvaluationRefused) as refused:
        split_image_ids("test", {"train": [1, 2, 3], "val": [4], "test": []})
    assert refused.value.reason == "dataset_invalid"
    assert "no test split" in refused.value.message
    assert "3 train, 1 val, 0 test" in refused.value.message


def test_the_ground_truth_keeps_the_datasets_ids_and_names() -> None:
    document: dict[str, Any] = {
        "images": [
            {"id": 40, "file_name": "a/x.png", "width": 9, "height": 9},
            {"id": 41, "file_name": "b/y.png", "width": 9, "height": 9},
        ],
        "annotations": [
            {"id": 100, "image_id": 40, "category_id": 7, "bbox": [0, 0, 2, 2]},
            {"id": 101, "image_id": 41, "category_id": 3, "bbox": [1, 1, 2, 2]},
        ],
        "categories": CATEGORIES,
    }
    truth = ground_truth(document, [41])
    assert truth["images"] == [document["images"][1]]
    assert truth["annotations"] == [document["annotations"][1]]
    assert truth["categories"] == CATEGORIES
    truth["images"][0]["file_name"] = "changed"
    assert document["images"][1]["file_name"] == "b/y.png", "the document is not changed"


def test_labels_map_by_class_name_whatever_the_ids_and_their_order() -> None:
    # Label 0 "dump" is category 7, label 1 "tire" is category 3.
    assert label_categories(("dump", "tire"), CATEGORIES) == {0: 7, 1: 3}
    assert label_categories(("crane", "tire"), CATEGORIES) == {1: 3}
    assert class_differences(("tire", "dump"), CATEGORIES) is None
    differences = class_differences(("crane", "tire"), CATEGORIES)
    assert differences is not None
    assert "does not detect [dump]" in differences
    assert "does not annotate [crane]" in differences


def test_a_model_sharing_no_class_with_the_dataset_is_refused() -> None:
    with pytest.raises(EvaluationRefused) as refused:
        label_categories(("crane", "barrel"), CATEGORIES)
    assert refused.value.reason == "dataset_invalid"
    assert "[crane, barrel]" in refused.value.message and "[tire, dump]" in refused.value.message


def test_predictions_become_coco_results_in_the_datasets_category_ids() -> None:
    predictions = [
        {
            "image_id": 41,
            "labels": [0, 1, 2],
            "bboxes": [[10.0, 20.0, 15.5, 30.0], [0, 0, 1, 1], [5, 5, 6, 6]],
            "scores": [0.9, 0.25, 0.8],
        },
        {"image_id": 40, "labels": [], "bboxes": [], "scores": []},
    ]
    # Label 2 is a class the dataset lacks: its detection is left out.
    assert detections(predictions, {0: 7, 1: 3}) == [
        {"image_id": 41, "category_id": 7, "bbox": [10.0, 20.0, 5.5, 10.0], "score": 0.9},
        {"image_id": 41, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.25},
    ]


def test_the_fingerprint_is_of_the_ids_and_names_in_any_order() -> None:
    images = [{"id": 2, "file_name": "b.png", "width": 3}, {"id": 1, "file_name": "a.png"}]
    same = images_fingerprint(images)
    assert same == images_fingerprint(list(reversed(images)))
    assert same == images_fingerprint(
        [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
    )
    assert same != images_fingerprint(
        [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "c.png"}]
    )
    assert same != images_fingerprint(
        [{"id": 1, "file_name": "a.png"}, {"id": 3, "file_name": "b.png"}]
    )
    assert same != images_fingerprint(images[:1])
    assert len(same) == 64


def test_the_worker_side_of_an_evaluation_loads_no_training_stack() -> None:
    code = (
        "import sys, trainer_worker.pipeline, trainer_worker.evaluation; "
        "print([m for m in ('torch', 'mmdet', 'mmengine', 'matplotlib') if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
