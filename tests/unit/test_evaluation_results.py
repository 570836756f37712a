"""An evaluation's findings as files and messages (trainer_worker.evaluation_results): each
sample's picture named in the review, the confusion matrix row-major, and COCO's zeros for
a model that detected nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trainer_worker.evaluation_inputs import Thresholds
from trainer_worker.evaluation_results import evaluation_message, review_and_draw, review_message


def dataset(folder: Path) -> tuple[dict[str, Any], dict[int, Path]]:
    images, annotations, paths = [], [], {}
    rng = np.random.default_rng(3)
    for index, (width, height) in enumerate(((120, 90), (64, 150), (200, 40)), start=1):
        image_id = 100 + index
        path = folder / f"{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
        paths[image_id] = path
        images.append(
            {"id": image_id, "file_name": f"x/{image_id}.png", "width": width, "height": height}
        )
        annotations.append(
            {
                "id": index,
                "image_id": image_id,
                "category_id": 9 if index % 2 else 4,
                "bbox": [5, 5, 20, 20],
            }
        )
    categories = [{"id": 4, "name": "tire"}, {"id": 9, "name": "dump"}]
    return {"images": images, "annotations": annotations, "categories": categories}, paths


def findings(tmp_path: Path, detections: list[dict[str, Any]], samples: int = 1) -> Any:
    truth, paths = dataset(tmp_path)
    return review_and_draw(
        truth=truth,
        detections=detections,
        thresholds=Thresholds(score=0.5, iou=0.5, samples=samples),
        image_paths=paths,
        images_fingerprint="f" * 64,
        summary={"split": "val"},
        folder=tmp_path / "out",
    )


def test_the_review_names_each_samples_picture_and_writes_every_file(tmp_path: Path) -> None:
    detections = [
        {"image_id": 101, "category_id": 9, "bbox": [5.0, 5.0, 20.0, 20.0], "score": 0.9},
        {"image_id": 102, "category_id": 9, "bbox": [5.0, 5.0, 20.0, 20.0], "score": 0.8},
    ]
    found = findings(tmp_path, detections)
    thresholds = Thresholds(score=0.5, iou=0.5, samples=1)
    message = review_message(found, thresholds)
    names = {f.name: f for f in found.files}
    assert set(names) == {
        "detections.json",
        "evaluation.json",
        "worst-1.png",
        "best-1.png",
        "pr-curves-iou50.png",
        "pr-curves-iou50-95.png",
    }
    assert json.loads(names["detections.json"].path.read_text()) == detections
    # Image 102's "dump" is a tire: a confusion and a missed object; 101 is right.
    worst, best = message.samples
    assert (worst.rank, worst.image_id, worst.artifact) == ("worst", 102, "worst-1.png")
    assert (best.rank, best.image_id, best.file_name) == ("best", 101, "x/101.png")
    with Image.open(names["worst-1.png"].path) as picture:
        assert picture.size == (64, 150)
    assert list(message.confusion_matrix.labels) == ["tire", "dump", "background"]
    # Rows true, columns predicted: tire->dump 1, dump->dump 1, the other dump missed.
    assert list(message.confusion_matrix.counts) == [0, 1, 0, 0, 1, 1, 0, 0, 0]
    assert message.images_fingerprint == "f" * 64
    stored = json.loads(names["evaluation.json"].path.read_text())
    assert stored["split"] == "val" and stored["detection_count"] == 2
    evaluation = evaluation_message(found, split="val")
    assert evaluation.image_count == 3
    assert evaluation.per_class_ap["tire"] == 0.0
    assert len(evaluation.iou_thresholds) == 10


def test_a_model_that_detects_nothing_scores_zero_where_there_is_ground_truth(
    tmp_path: Path,
) -> None:
    found = findings(tmp_path, [], samples=0)
    evaluation = evaluation_message(found, split="test")
    assert (evaluation.split, evaluation.image_count) == ("test", 3)
    # Every object is small (20 x 20): medium and large have nothing to measure.
    assert evaluation.metrics["coco/bbox_mAP"] == 0.0
    assert evaluation.metrics["coco/bbox_mAP_50"] == 0.0
    assert evaluation.metrics["coco/bbox_mAP_s"] == 0.0
    assert evaluation.metrics["coco/bbox_mAP_m"] == -1.0
    assert dict(evaluation.per_class_ap) == {"tire": 0.0, "dump": 0.0}
    assert len(evaluation.iou_thresholds) == 10
    message = review_message(found, Thresholds(score=0.5, iou=0.5, samples=0))
    assert not message.samples
    assert sum(message.confusion_matrix.counts) == 3, "every object missed"
