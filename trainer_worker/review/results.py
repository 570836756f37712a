"""What a review of detections holds: frozen values, each with `to_json()` for storage.

Floats that are not finite (none should arise) are written as proto JSON writes them
(shared.json_shape.double); a class without ground truth has AP `None` (JSON null).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared import json_shape
from shared.json_shape import Json

BACKGROUND = "background"
# The IoU labels of the two PR curves of a class.
IOU_50 = "0.50"
IOU_50_95 = "0.50:0.95"


@dataclass(frozen=True, slots=True, kw_only=True)
class PrCurve:
    """A class's interpolated precision at COCO's 101 recall points (area all, maxDets 100)."""

    class_name: str
    category_id: int
    iou: str
    recall: tuple[float, ...]
    precision: tuple[float, ...]

    @property
    def ap(self) -> float:
        """The mean precision over the recall points: COCOeval's AP of the class."""
        return sum(self.precision) / len(self.precision)

    def to_json(self) -> Json:
        return {
            "class_name": self.class_name,
            "category_id": self.category_id,
            "iou": self.iou,
            "recall": [json_shape.double(r) for r in self.recall],
            "precision": [json_shape.double(p) for p in self.precision],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class CocoMetrics:
    """COCOeval's 12 summary stats (mmdet's CocoMetric names), per-class AP and PR curves.

    COCO writes -1 for a stat without ground truth (no small objects: `coco/bbox_mAP_s`
    -1); a class without ground truth has AP None and no PR curves.
    """

    metrics: Mapping[str, float]
    per_class_ap: Mapping[str, float | None]
    pr_curves: tuple[PrCurve, ...]
    image_count: int

    def curves(self, iou: str) -> dict[str, PrCurve]:
        """The PR curves at `iou` (IOU_50 or IOU_50_95), by class name."""
        return {c.class_name: c for c in self.pr_curves if c.iou == iou}

    def to_json(self) -> Json:
        return {
            "metrics": json_shape.doubles(self.metrics),
            "per_class_ap": {
                k: None if v is None else json_shape.double(v) for k, v in self.per_class_ap.items()
            },
            "pr_curves": [c.to_json() for c in self.pr_curves],
            "image_count": self.image_count,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfusionMatrix:
    """Counts of detections and objects: rows the true class, then background; columns the
    predicted class, then background. `labels` names both, in order, background last."""

    labels: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]
    score_threshold: float
    iou_threshold: float

    def cell(self, true: str, predicted: str) -> int:
        return self.counts[self.labels.index(true)][self.labels.index(predicted)]

    def to_json(self) -> Json:
        return {
            "labels": list(self.labels),
            "counts": [list(row) for row in self.counts],
            "score_threshold": self.score_threshold,
            "iou_threshold": self.iou_threshold,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassCounts:
    """A class's true positives, false positives and false negatives at the thresholds."""

    class_name: str
    tp: int
    fp: int
    fn: int

    def to_json(self) -> Json:
        return {"class_name": self.class_name, "tp": self.tp, "fp": self.fp, "fn": self.fn}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageErrors:
    """One image's outcome at the thresholds; `errors` is FP + FN."""

    image_id: int
    file_name: str
    tp: int
    fp: int
    fn: int

    @property
    def errors(self) -> int:
        return self.fp + self.fn

    def to_json(self) -> Json:
        return {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Matching:
    """The outcome of matching detections to ground truth at one score and IoU threshold."""

    confusion: ConfusionMatrix
    per_class: tuple[ClassCounts, ...]
    per_image: tuple[ImageErrors, ...]

    def counts(self, class_name: str) -> ClassCounts:
        return next(c for c in self.per_class if c.class_name == class_name)

    def to_json(self) -> Json:
        return {
            "confusion": self.confusion.to_json(),
            "per_class": [c.to_json() for c in self.per_class],
            "per_image": [i.to_json() for i in self.per_image],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Samples:
    """The images worth looking at: most errors first, and fewest errors first."""

    worst: tuple[ImageErrors, ...]
    best: tuple[ImageErrors, ...]

    def to_json(self) -> Json:
        return {
            "worst": [i.to_json() for i in self.worst],
            "best": [i.to_json() for i in self.best],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Review:
    """Everything a review of one model's detections on one dataset finds."""

    coco: CocoMetrics
    matching: Matching
    samples: Samples

    def to_json(self) -> Json:
        return {
            "coco": self.coco.to_json(),
            "matching": self.matching.to_json(),
            "samples": self.samples.to_json(),
        }
