"""An evaluation's findings, from the detections to the files and messages that carry them:
the review (trainer_worker.review), its pictures, its JSON files, and the Evaluation and
DetectionReview of the job's Succeeded event.

Runs in the worker process (no torch): review() is pycocotools and numpy, the pictures
Pillow and matplotlib.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.proto.raven.training.v1 import common_pb2
from trainer_worker.evaluation_inputs import Thresholds
from trainer_worker.events import COCO_IOU_THRESHOLDS
from trainer_worker.review import IOU_50, IOU_50_95, ImageErrors, Review, review
from trainer_worker.review.inputs import class_names

# Samples are drawn at most this many pixels on their longer side.
SAMPLE_MAX_SIDE = 800
DETECTIONS_FILE = "detections.json"
REVIEW_FILE = "evaluation.json"
_PLOTS = ((IOU_50, "pr-curves-iou50.png"), (IOU_50_95, "pr-curves-iou50-95.png"))


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultFile:
    kind: str
    name: str
    path: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Findings:
    review: Review
    files: tuple[ResultFile, ...]
    # Sample -> the name of the artifact that draws it, by (rank, image id).
    drawn: Mapping[tuple[str, int], str]
    images_fingerprint: str
    detection_count: int


def review_and_draw(
    *,
    truth: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    thresholds: Thresholds,
    image_paths: Mapping[int, Path],
    images_fingerprint: str,
    summary: Mapping[str, Any],
    folder: Path,
) -> Findings:
    """Reviews `detections` on `truth` and writes into `folder`: the detections (COCO
    results, the dataset's ids), the review as JSON (with `summary`), a PNG per sample
    and the PR curves at each IoU."""
    found = review(
        truth,
        detections,
        score_threshold=thresholds.score,
        iou_threshold=thresholds.iou,
        samples=thresholds.samples,
    )
    folder.mkdir(parents=True, exist_ok=True)
    files: list[ResultFile] = []

    def write(kind: str, name: str, data: bytes) -> None:
        path = folder / name
        path.write_bytes(data)
        files.append(ResultFile(kind=kind, name=name, path=path))

    write("evaluation", DETECTIONS_FILE, json.dumps(list(detections)).encode())
    drawn: dict[tuple[str, int], str] = {}
    from trainer_worker.review.render import render_pr_curves

    names = class_names(truth)
    for rank, chosen in (("worst", found.samples.worst), ("best", found.samples.best)):
        for index, errors in enumerate(chosen, start=1):
            name = f"{rank}-{index}.png"
            write("sample", name, _draw(errors, truth, detections, names, thresholds, image_paths))
            drawn[(rank, errors.image_id)] = name
    for iou, name in _PLOTS:
        curves = list(found.coco.curves(iou).values())
        write("plot", name, render_pr_curves(curves, title=f"precision-recall, IoU {iou}"))
    document = {
        **summary,
        "images_fingerprint": images_fingerprint,
        "score_threshold": thresholds.score,
        "iou_threshold": thresholds.iou,
        "detection_count": len(detections),
        "review": found.to_json(),
        "artifacts": {f.name: f.kind for f in files},
    }
    write("evaluation", REVIEW_FILE, json.dumps(document, indent=1).encode())
    return Findings(
        review=found,
        files=tuple(files),
        drawn=drawn,
        images_fingerprint=images_fingerprint,
        detection_count=len(detections),
    )


def _draw(
    errors: ImageErrors,
    truth: Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    names: Mapping[int, str],
    thresholds: Thresholds,
    image_paths: Mapping[int, Path],
) -> bytes:
    from PIL import Image, ImageOps

    from trainer_worker.review.render import render_sample

    with Image.open(image_paths[errors.image_id]) as opened:
        # The orientation the loader applied, so that the boxes sit where the model saw them.
        image = ImageOps.exif_transpose(opened)
        image.load()
    scale = min(1.0, SAMPLE_MAX_SIDE / max(image.width, image.height))
    return render_sample(
        image,
        truths=[
            a
            for a in truth["annotations"]
            if a["image_id"] == errors.image_id and not a.get("iscrowd", 0)
        ],
        detections=[d for d in detections if d["image_id"] == errors.image_id],
        class_names=names,
        score_threshold=thresholds.score,
        scale=scale,
    )


def evaluation_message(findings: Findings, *, split: str) -> common_pb2.Evaluation:
    """The COCO metrics as an Evaluation, -1 where COCO finds nothing to measure; a class
    without ground truth has AP -1. A model that detects nothing scores what COCOeval gives
    it, 0 wherever there is ground truth (mmdet's CocoMetric would report no metrics at all,
    which a comparison or a publication gate cannot tell from an evaluation never made)."""
    coco = findings.review.coco
    message = common_pb2.Evaluation(epoch=0, split=split, image_count=coco.image_count)
    message.metrics.update(coco.metrics)
    message.per_class_ap.update(
        {name: -1.0 if ap is None else ap for name, ap in coco.per_class_ap.items()}
    )
    message.iou_thresholds.extend(COCO_IOU_THRESHOLDS)
    return message


def review_message(findings: Findings, thresholds: Thresholds) -> common_pb2.DetectionReview:
    Message = common_pb2.DetectionReview
    found = findings.review
    confusion = found.matching.confusion
    samples = [
        Message.Sample(
            rank=rank,
            image_id=e.image_id,
            file_name=e.file_name,
            true_positives=e.tp,
            false_positives=e.fp,
            false_negatives=e.fn,
            artifact=findings.drawn[(rank, e.image_id)],
        )
        for rank, chosen in (("worst", found.samples.worst), ("best", found.samples.best))
        for e in chosen
    ]
    return Message(
        pr_curves=[
            Message.PrCurve(
                class_name=c.class_name,
                iou=c.iou,
                recall=list(c.recall),
                precision=list(c.precision),
            )
            for c in found.coco.pr_curves
        ],
        confusion_matrix=Message.ConfusionMatrix(
            labels=list(confusion.labels),
            counts=[count for row in confusion.counts for count in row],
        ),
        class_counts=[
            Message.ClassCounts(
                class_name=c.class_name,
                true_positives=c.tp,
                false_positives=c.fp,
                false_negatives=c.fn,
            )
            for c in found.matching.per_class
        ],
        score_threshold=thresholds.score,
        iou_threshold=thresholds.iou,
        samples=samples,
        images_fingerprint=findings.images_fingerprint,
    )
