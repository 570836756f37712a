"""COCO metrics of detections, by pycocotools' COCOeval itself: the 12 summary stats,
per-class AP and per-class precision-recall curves, all from one evaluation.

The parameters are COCOeval's defaults (maxDets 1, 10, 100). mmdet's CocoMetric, which
scores a run's validation, evaluates at maxDets 100, 300, 1000 and rounds to 3 digits:
the two agree when a model keeps at most 100 detections per image (mmdet's default
max_per_img) up to that rounding.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from shared.metrics import COCO_STATS
from trainer_worker.review.inputs import Detection, check_detections, class_names
from trainer_worker.review.results import IOU_50, IOU_50_95, CocoMetrics, PrCurve

# The order of COCOeval.stats, in mmdet's CocoMetric names.
STAT_NAMES = COCO_STATS
_AREA_ALL = 0
_MAX_DETS_100 = 2


def run_cocoeval(ground_truth: Mapping[str, Any], detections: Sequence[Detection]) -> COCOeval:
    """COCOeval on copies of the inputs (pycocotools writes into both), evaluated,
    accumulated and summarized, its printing silenced."""
    check_detections(ground_truth, detections)
    dataset = copy.deepcopy(dict(ground_truth))
    for annotation in dataset["annotations"]:
        # COCOeval's area ranges read `area` and its matching `iscrowd`; a dataset may
        # leave either out (no crowd, the box's area).
        annotation.setdefault("area", annotation["bbox"][2] * annotation["bbox"][3])
        annotation.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = _results(gt, copy.deepcopy(list(detections)))
        evaluation = COCOeval(gt, dt, iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return evaluation


def _results(gt: COCO, detections: list[Any]) -> COCO:
    if detections:
        return gt.loadRes(detections)
    # loadRes cannot take an empty list: no detections is a model that finds nothing.
    empty = COCO()
    empty.dataset = {
        "images": list(gt.dataset["images"]),
        "categories": copy.deepcopy(gt.dataset["categories"]),
        "annotations": [],
    }
    empty.createIndex()
    return empty


def coco_metrics(ground_truth: Mapping[str, Any], detections: Sequence[Detection]) -> CocoMetrics:
    """The COCO metrics of `detections` on `ground_truth` (COCO results format)."""
    evaluation = run_cocoeval(ground_truth, detections)
    return metrics_of(evaluation, class_names(ground_truth))


def metrics_of(evaluation: COCOeval, names: Mapping[int, str]) -> CocoMetrics:
    """Stats, per-class AP and PR curves of an accumulated and summarized COCOeval."""
    params = evaluation.params
    # precision[T, R, K, A, M]: IoU threshold, recall point, class, area range, maxDets.
    precision = np.asarray(evaluation.eval["precision"])
    recall = tuple(float(r) for r in params.recThrs)
    iou_50 = int(np.flatnonzero(np.isclose(params.iouThrs, 0.5))[0])
    per_class_ap: dict[str, float | None] = {}
    curves: list[PrCurve] = []
    for k, category_id in enumerate(params.catIds):
        name = names[int(category_id)]
        table = precision[:, :, k, _AREA_ALL, _MAX_DETS_100]
        # -1: the class has no ground truth, so it has no precision at any recall.
        if not (table > -1).any():
            per_class_ap[name] = None
            continue
        # Without ground truth -1 fills a whole class; mask anyway, as COCO's own mean does.
        masked = np.ma.masked_less_equal(table, -1)
        per_class_ap[name] = float(masked.mean())
        for label, points in ((IOU_50, masked[iou_50]), (IOU_50_95, masked.mean(axis=0))):
            curves.append(
                PrCurve(
                    class_name=name,
                    category_id=int(category_id),
                    iou=label,
                    recall=recall,
                    precision=tuple(float(p) for p in points.filled(0.0)),
                )
            )
    return CocoMetrics(
        metrics={
            key: float(value) for key, value in zip(STAT_NAMES, evaluation.stats, strict=True)
        },
        per_class_ap=per_class_ap,
        pr_curves=tuple(curves),
        image_count=len(params.imgIds),
    )
