"""Results review: what a model's detections on a COCO dataset get right and wrong.

Pure functions of a COCO ground-truth dict and detections in COCO results format:
COCO metrics and PR curves (coco_eval, by pycocotools' COCOeval), a confusion matrix
and TP/FP/FN at a score and IoU threshold (matching), the worst and best images
(samples), and PNG pictures of them (render, imported on its own: it loads Pillow,
and matplotlib when it plots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainer_worker.review.coco_eval import coco_metrics
from trainer_worker.review.inputs import Detection
from trainer_worker.review.matching import match_detections
from trainer_worker.review.results import (
    BACKGROUND,
    IOU_50,
    IOU_50_95,
    ClassCounts,
    CocoMetrics,
    ConfusionMatrix,
    ImageErrors,
    Matching,
    PrCurve,
    Review,
    Samples,
)
from trainer_worker.review.samples import select_samples

__all__ = [
    "BACKGROUND",
    "IOU_50",
    "IOU_50_95",
    "ClassCounts",
    "CocoMetrics",
    "ConfusionMatrix",
    "Detection",
    "ImageErrors",
    "Matching",
    "PrCurve",
    "Review",
    "Samples",
    "coco_metrics",
    "match_detections",
    "review",
    "select_samples",
]


def review(
    ground_truth: Mapping[str, Any],
    detections: Sequence[Detection],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    samples: int = 3,
) -> Review:
    """The COCO metrics of all `detections`, and their matching and the `samples` worst
    and best images at `score_threshold` and `iou_threshold`."""
    matching = match_detections(
        ground_truth, detections, score_threshold=score_threshold, iou_threshold=iou_threshold
    )
    return Review(
        coco=coco_metrics(ground_truth, detections),
        matching=matching,
        samples=select_samples(matching.per_image, k=samples),
    )
