"""The two inputs of a review, checked: a COCO ground-truth dict (trainer_worker.coco
validates datasets) and detections in COCO results format."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# A COCO results entry: {image_id, category_id, bbox [x, y, w, h], score}.
Detection = Mapping[str, Any]


def class_names(ground_truth: Mapping[str, Any]) -> dict[int, str]:
    """Category id -> name, ordered by id (label i of a model is the i-th category)."""
    return {c["id"]: c["name"] for c in sorted(ground_truth["categories"], key=lambda c: c["id"])}


def check_detections(ground_truth: Mapping[str, Any], detections: Sequence[Detection]) -> None:
    """Raises ValueError for a detection of an unknown image or category, or without a
    finite box and score: COCOeval would fail on it, or count it silently."""
    image_ids = {image["id"] for image in ground_truth["images"]}
    category_ids = {category["id"] for category in ground_truth["categories"]}
    for i, detection in enumerate(detections):
        if detection.get("image_id") not in image_ids:
            raise ValueError(f"detection #{i}: unknown image_id {detection.get('image_id')}")
        if detection.get("category_id") not in category_ids:
            raise ValueError(f"detection #{i}: unknown category_id {detection.get('category_id')}")
        bbox = detection.get("bbox")
        if not (isinstance(bbox, Sequence) and len(bbox) == 4 and all(_finite(v) for v in bbox)):
            raise ValueError(f"detection #{i}: bbox must be 4 finite numbers [x, y, w, h]")
        if not _finite(detection.get("score")):
            raise ValueError(f"detection #{i}: score must be a finite number")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x, y, w, h] boxes, as COCOeval computes it (no +1)."""
    width = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    height = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    inter = width * height
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)
