"""Models side by side: which evaluations may be compared, and the table they make.
Pure Python.

Two evaluations are comparable only when they saw the same images: the same dataset
(its fingerprint), the same split, and the same images in it (the review's
images_fingerprint, which also tells apart two "val" splits drawn with other seeds).
A metric an evaluation lacks (COCO's -1 for "no ground truth of this kind", a class
without ground truth) is absent, never a zero that would rank a model.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.errors import FailedPrecondition
from shared.metrics import COCO_STATS
from shared.names import model_name

SPLITS = ("all", "train", "val", "test")
# A class's AP, as a metric name of a comparison and of the publication gate.
CLASS_AP_PREFIX = "AP/"
# The columns of a comparison: the COCO metrics, in the order COCO prints them.
COCO_METRICS = COCO_STATS


def evaluation_name(model_id: uuid.UUID, evaluation_id: uuid.UUID) -> str:
    return f"{model_name(model_id)}/evaluations/{evaluation_id}"


@dataclass(frozen=True, slots=True)
class ImageSet:
    """What makes two evaluations comparable."""

    dataset_fingerprint: str
    split: str
    images_fingerprint: str

    def describe(self) -> str:
        return (
            f"the {self.split} split of dataset {self.dataset_fingerprint} "
            f"(images {self.images_fingerprint[:12]})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationRecord:
    """A succeeded evaluation of a model, as far as comparing it goes."""

    id: uuid.UUID
    model_id: uuid.UUID
    images: ImageSet
    image_count: int
    create_time: datetime
    # COCO metrics and "AP/<class>", each present only when the evaluation has it.
    values: Mapping[str, float]

    @property
    def name(self) -> str:
        return evaluation_name(self.model_id, self.id)


def metric_values(evaluation: Mapping[str, Any] | None) -> dict[str, float]:
    """The comparable values of a stored Evaluation (proto JSON): its metrics and its
    per-class APs as "AP/<class>", without COCO's -1 for "nothing to measure"."""
    evaluation = evaluation or {}
    values = {str(k): float(v) for k, v in (evaluation.get("metrics") or {}).items()}
    for class_name, ap in (evaluation.get("per_class_ap") or {}).items():
        values[CLASS_AP_PREFIX + str(class_name)] = float(ap)
    return {k: v for k, v in values.items() if v >= 0}


def is_metric_name(name: str) -> bool:
    """Whether `name` could name a comparable value: a COCO metric or a class's AP."""
    if name.startswith(CLASS_AP_PREFIX):
        return len(name) > len(CLASS_AP_PREFIX)
    return name in COCO_METRICS


def newest_by_model(records: Sequence[EvaluationRecord]) -> dict[uuid.UUID, EvaluationRecord]:
    newest: dict[uuid.UUID, EvaluationRecord] = {}
    for record in records:
        current = newest.get(record.model_id)
        if current is None or _age_key(record) > _age_key(current):
            newest[record.model_id] = record
    return newest


def _age_key(record: EvaluationRecord) -> tuple[datetime, str]:
    # Ties on time are broken by id: the choice never depends on the order rows came in.
    return record.create_time, str(record.id)


def common_image_set(
    model_ids: Sequence[uuid.UUID],
    records: Sequence[EvaluationRecord],
    *,
    dataset_fingerprint: str = "",
    split: str = "",
) -> ImageSet:
    """The image set on which every model has a succeeded evaluation (within the
    requested dataset and split), the one evaluated most recently when there are
    several; FailedPrecondition naming the models that lack one."""
    wanted = [
        r
        for r in records
        if (not dataset_fingerprint or r.images.dataset_fingerprint == dataset_fingerprint)
        and (not split or r.images.split == split)
    ]
    by_set: dict[ImageSet, list[EvaluationRecord]] = {}
    for record in wanted:
        by_set.setdefault(record.images, []).append(record)
    everyone = set(model_ids)
    shared = [
        (max(_age_key(r) for r in found), images)
        for images, found in by_set.items()
        if {r.model_id for r in found} >= everyone
    ]
    if shared:
        return max(shared)[1]
    scope = _scope(dataset_fingerprint, split)
    evaluated = {r.model_id for r in wanted}
    lacking = [model_name(m) for m in model_ids if m not in evaluated]
    if lacking:
        raise FailedPrecondition(
            f"no succeeded evaluation{scope} of {', '.join(lacking)}: evaluate "
            "(EvaluateTrainedModel) every model on the same images first"
        )
    raise FailedPrecondition(
        f"the models have succeeded evaluations{scope}, but on no one set of images "
        "that all of them saw (dataset, split and images); evaluate them on the same images"
    )


def _scope(dataset_fingerprint: str, split: str) -> str:
    parts = []
    if split:
        parts.append(f"split {split!r}")
    if dataset_fingerprint:
        parts.append(f"dataset fingerprint {dataset_fingerprint!r}")
    return (" on " + " of ".join(parts)) if parts else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    images: ImageSet
    image_count: int
    metrics: list[str]
    # In request order: (model, its newest evaluation on the images).
    rows: list[tuple[uuid.UUID, EvaluationRecord]]


def table(
    model_ids: Sequence[uuid.UUID],
    records: Sequence[EvaluationRecord],
    *,
    dataset_fingerprint: str = "",
    split: str = "",
) -> Table:
    """Every model's newest succeeded evaluation on one common image set, and the metric
    names in display order: the COCO metrics (as COCO prints them), any other metric by
    name, then the classes' APs in the order the rows first name them."""
    images = common_image_set(
        model_ids, records, dataset_fingerprint=dataset_fingerprint, split=split
    )
    newest = newest_by_model([r for r in records if r.images == images])
    rows = [(m, newest[m]) for m in model_ids]
    present: dict[str, None] = {}
    for _, record in rows:
        present.update(dict.fromkeys(record.values))
    coco = [m for m in COCO_METRICS if m in present]
    classes = [m for m in present if m.startswith(CLASS_AP_PREFIX)]
    others = sorted(m for m in present if m not in COCO_METRICS and m not in classes)
    return Table(
        images=images,
        image_count=rows[0][1].image_count,
        metrics=coco + others + classes,
        rows=rows,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ComparedModels:
    table: Table
    # By model id.
    display_names: Mapping[uuid.UUID, str]
