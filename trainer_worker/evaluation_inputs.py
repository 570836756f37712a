"""What an evaluation job evaluates, decided before any inference: the request checked, the
images of the chosen split with the dataset's own ids and file names, how the model's labels
map onto the dataset's categories, and the fingerprint of the images.

Pure functions of the job and of the dataset's documents. The ground truth keeps the
dataset's ids (images, categories, annotations as the annotation file has them), so that the
detections an evaluation stores can be scored against that file by anyone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SPLITS = ("all", "train", "val", "test")
MAX_SAMPLES = 10


class EvaluationRefused(ValueError):
    """A job or dataset this evaluation cannot be run on: `reason` is the failure's code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    score: float
    iou: float
    samples: int


def checked_request(split: str, *, score: float, iou: float, samples: int) -> Thresholds:
    """The thresholds of a job, or EvaluationRefused naming the field that is out of range
    (the service checks them first: a job that still has one is refused, not retried)."""
    if split not in SPLITS:
        raise EvaluationRefused(
            "invalid_spec", f"evaluation.split {split!r} is none of {', '.join(SPLITS)}"
        )
    if not 0.0 <= score <= 1.0:
        raise EvaluationRefused(
            "invalid_spec", f"evaluation.score_threshold {score} is outside 0..1"
        )
    if not 0.0 < iou <= 1.0:
        raise EvaluationRefused("invalid_spec", f"evaluation.iou_threshold {iou} is outside (0, 1]")
    if not 0 <= samples <= MAX_SAMPLES:
        raise EvaluationRefused(
            "invalid_spec", f"evaluation.samples {samples} is outside 0..{MAX_SAMPLES}"
        )
    return Thresholds(score=score, iou=iou, samples=samples)


def split_image_ids(split: str, membership: Mapping[str, Any]) -> list[int]:
    """The image ids of `split` ("all": every split) from a split.json's membership; refused
    when the split holds no image (a dataset without a test split, say)."""
    if split == "all":
        ids = sorted({i for name in ("train", "val", "test") for i in membership.get(name, ())})
    else:
        ids = sorted(membership.get(split, ()))
    if not ids:
        raise EvaluationRefused(
            "dataset_invalid",
            f"the dataset has no {split} split: it has "
            + ", ".join(f"{len(membership.get(n, ()))} {n}" for n in ("train", "val", "test"))
            + ' images (a test split needs test_fraction, or images with "split": "test")',
        )
    return ids


def ground_truth(document: Mapping[str, Any], image_ids: Iterable[int]) -> dict[str, Any]:
    """The COCO document restricted to `image_ids`: its images, their annotations and every
    category, with the dataset's own ids and file names."""
    wanted = set(image_ids)
    return {
        "images": [dict(i) for i in document["images"] if i["id"] in wanted],
        "annotations": [dict(a) for a in document["annotations"] if a["image_id"] in wanted],
        "categories": [dict(c) for c in document["categories"]],
    }


def label_categories(
    model_classes: Sequence[str], categories: Sequence[Mapping[str, Any]]
) -> dict[int, int]:
    """Model label -> the dataset's category id of the same name. A label whose class the
    dataset lacks has none (its detections are left out); refused when no class is shared."""
    by_name = {str(c["name"]): int(c["id"]) for c in categories}
    mapping = {i: by_name[name] for i, name in enumerate(model_classes) if name in by_name}
    if not mapping:
        raise EvaluationRefused(
            "dataset_invalid",
            f"the model detects {_names(model_classes)}, the dataset has "
            f"{_names(by_name)}: they share no class",
        )
    return mapping


def class_differences(
    model_classes: Sequence[str], categories: Sequence[Mapping[str, Any]]
) -> str | None:
    """What a person should know when the model and the dataset do not have the same
    classes; None when they do (in any order)."""
    dataset = [str(c["name"]) for c in categories]
    unknown = [n for n in dataset if n not in model_classes]
    unlabelled = [n for n in model_classes if n not in dataset]
    if not unknown and not unlabelled:
        return None
    parts = []
    if unknown:
        parts.append(f"the model does not detect {_names(unknown)} (AP 0 where annotated)")
    if unlabelled:
        parts.append(
            f"the dataset does not annotate {_names(unlabelled)} (its detections are left out)"
        )
    return "; ".join(parts)


def detections(
    predictions: Iterable[Mapping[str, Any]], mapping: Mapping[int, int]
) -> list[dict[str, Any]]:
    """COCO results entries from the inference child's predictions ({image_id, labels,
    bboxes [x1, y1, x2, y2], scores} per image), in the dataset's category ids; labels the
    dataset has no category for are left out."""
    out: list[dict[str, Any]] = []
    for prediction in predictions:
        image_id = int(prediction["image_id"])
        for label, box, score in zip(
            prediction["labels"], prediction["bboxes"], prediction["scores"], strict=True
        ):
            category = mapping.get(int(label))
            if category is None:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            out.append(
                {
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    return out


def images_fingerprint(images: Iterable[Mapping[str, Any]]) -> str:
    """sha256 over the images' ids and file names, sorted by id: two evaluations have the
    same one exactly when they saw the same images (DetectionReview.images_fingerprint)."""
    digest = hashlib.sha256()
    for image in sorted(images, key=lambda i: int(i["id"])):
        digest.update(f"{int(image['id'])}\0{image['file_name']}\n".encode())
    return digest.hexdigest()


def _names(names: Iterable[str]) -> str:
    return "[" + ", ".join(names) + "]"
