"""The names of a run's metrics and the rule that picks its best epoch. Pure Python.

One naming everywhere a run's metrics travel (docs/metrics.md): the per-epoch `train`
series uses mmengine's names for the training log (`loss`, `loss_cls`, ..., `lr`), the
`val` series and every Evaluation mmdet's CocoMetric names (`coco/bbox_mAP`, ...). The
service, the worker and the training child all import them from here.
"""

from __future__ import annotations

from collections.abc import Mapping

# mmdet's CocoMetric names (Evaluation.metrics and TrainingRunMetrics val).
COCO_PREFIX = "coco/"
MAP = f"{COCO_PREFIX}bbox_mAP"
MAP_50 = f"{MAP}_50"
MAP_75 = f"{MAP}_75"
# COCOeval's twelve summary stats in mmdet's CocoMetric names, in the order of
# COCOeval.stats (the order COCO prints them).
COCO_STATS = (
    MAP,
    MAP_50,
    MAP_75,
    f"{MAP}_s",
    f"{MAP}_m",
    f"{MAP}_l",
    f"{COCO_PREFIX}AR@1",
    f"{COCO_PREFIX}AR@10",
    f"{COCO_PREFIX}AR@100",
    f"{COCO_PREFIX}AR_s@100",
    f"{COCO_PREFIX}AR_m@100",
    f"{COCO_PREFIX}AR_l@100",
)
# The headline metric: what chooses the best epoch and ranks models.
PRIMARY_METRIC = MAP
# ListTrainedModels' order_by that ranks models by it, best first.
ORDER_BY_PRIMARY = f"{PRIMARY_METRIC} desc"

# mmdet's CocoMetric with classwise=True adds `coco/<class>_precision`, the class's AP:
# it travels as Evaluation.per_class_ap, never in the metrics or the val series.
PER_CLASS_SUFFIX = "_precision"

# mmengine's names (TrainingRunMetrics train, Progress.losses).
TOTAL_LOSS = "loss"
LEARNING_RATE = "lr"
# Every loss term a model reports starts with it: loss_cls, loss_bbox, loss_rpn_cls...
LOSS_PREFIX = "loss"


def train_metrics(
    *, loss: float | None, losses: Mapping[str, float], lr: float | None
) -> dict[str, float]:
    """An epoch's `train` entry: the total loss, each loss term and the learning rate.
    Other training outputs (a detector's `acc`) are not part of the series."""
    entry = {k: float(v) for k, v in losses.items() if is_loss(k) and k != TOTAL_LOSS}
    if loss is not None:
        entry[TOTAL_LOSS] = float(loss)
    if lr is not None:
        entry[LEARNING_RATE] = float(lr)
    return entry


def is_loss(name: str) -> bool:
    return name.startswith(LOSS_PREFIX)


def overall(metrics: Mapping[str, float]) -> dict[str, float]:
    """An evaluation's metrics without the per-class APs: Evaluation.metrics, and an
    epoch's `val` entry."""
    return {k: v for k, v in metrics.items() if not k.endswith(PER_CLASS_SUFFIX)}


def per_class(metrics: Mapping[str, float]) -> dict[str, float]:
    """The per-class APs of an evaluation's metrics, by class name."""
    return {
        k.removeprefix(COCO_PREFIX).removesuffix(PER_CLASS_SUFFIX): v
        for k, v in metrics.items()
        if k.endswith(PER_CLASS_SUFFIX)
    }


def best_epoch(evaluations: Mapping[int, Mapping[str, float]], *, last_epoch: int) -> int | None:
    """The epoch with the highest `coco/bbox_mAP`, the earliest on ties; `last_epoch` when
    no epoch has a mAP (an untrained model detects nothing: its last weights are kept);
    None when no epoch finished at all (`last_epoch` 0)."""
    scored = [(e, m[PRIMARY_METRIC]) for e, m in evaluations.items() if PRIMARY_METRIC in m]
    if scored:
        return min(scored, key=lambda item: (-item[1], item[0]))[0]
    return last_epoch if last_epoch > 0 else None
