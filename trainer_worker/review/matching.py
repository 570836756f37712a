"""Detections matched to ground truth at one score and one IoU threshold: a confusion
matrix with a background row and column, TP/FP/FN per class and errors per image.

The matching rule, per image: detections with score >= `score_threshold` are taken in
order of score, highest first (ties in input order). Each is matched to the not yet
matched true box of highest IoU, of any class, when that IoU is >= `iou_threshold`
(ties: the lower annotation id). Same class: a true positive of that class (the
diagonal). Another class: a confusion, cell (true class, predicted class), which counts
as a false positive of the predicted class and a false negative of the true class. A
detection without a match is a false positive: row background. A true box left
unmatched is a false negative: column background. Crowd boxes (`iscrowd` 1) take no
part: COCOeval ignores them as well.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainer_worker.review.inputs import Detection, check_detections, class_names, iou
from trainer_worker.review.results import (
    BACKGROUND,
    ClassCounts,
    ConfusionMatrix,
    ImageErrors,
    Matching,
)


def match_detections(
    ground_truth: Mapping[str, Any],
    detections: Sequence[Detection],
    *,
    score_threshold: float,
    iou_threshold: float,
) -> Matching:
    """The confusion matrix, per-class counts and per-image errors (module docstring)."""
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must lie in (0, 1], got {iou_threshold}")
    check_detections(ground_truth, detections)
    names = class_names(ground_truth)
    # Matrix index of each category id; background is the last row and column.
    index = {category_id: i for i, category_id in enumerate(names)}
    background = len(names)
    counts = [[0] * (background + 1) for _ in range(background + 1)]
    truths: dict[int, list[Mapping[str, Any]]] = {}
    for annotation in sorted(ground_truth["annotations"], key=lambda a: a["id"]):
        if not annotation.get("iscrowd", 0):
            truths.setdefault(annotation["image_id"], []).append(annotation)
    kept: dict[int, list[Detection]] = {}
    for detection in detections:
        if detection["score"] >= score_threshold:
            kept.setdefault(detection["image_id"], []).append(detection)
    per_image: list[ImageErrors] = []
    for image in sorted(ground_truth["images"], key=lambda i: i["id"]):
        image_truths = truths.get(image["id"], [])
        image_detections = sorted(kept.get(image["id"], []), key=lambda d: -d["score"])
        matched = [False] * len(image_truths)
        tp = 0
        for detection in image_detections:
            predicted = index[detection["category_id"]]
            best, best_iou = -1, iou_threshold
            for j, truth in enumerate(image_truths):
                if matched[j]:
                    continue
                overlap = iou(detection["bbox"], truth["bbox"])
                if overlap > best_iou or (overlap == best_iou and best < 0):
                    best, best_iou = j, overlap
            if best < 0:
                counts[background][predicted] += 1
                continue
            matched[best] = True
            true = index[image_truths[best]["category_id"]]
            counts[true][predicted] += 1
            tp += true == predicted
        for j, truth in enumerate(image_truths):
            if not matched[j]:
                counts[index[truth["category_id"]]][background] += 1
        per_image.append(
            ImageErrors(
                image_id=image["id"],
                file_name=str(image.get("file_name", "")),
                tp=tp,
                fp=len(image_detections) - tp,
                fn=len(image_truths) - tp,
            )
        )
    labels = (*names.values(), BACKGROUND)
    return Matching(
        confusion=ConfusionMatrix(
            labels=labels,
            counts=tuple(tuple(row) for row in counts),
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
        ),
        per_class=tuple(_class_counts(labels[i], i, counts) for i in range(background)),
        per_image=tuple(per_image),
    )


def _class_counts(name: str, i: int, counts: list[list[int]]) -> ClassCounts:
    tp = counts[i][i]
    return ClassCounts(
        class_name=name,
        tp=tp,
        fp=sum(row[i] for row in counts) - tp,
        fn=sum(counts[i]) - tp,
    )
