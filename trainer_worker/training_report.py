"""A finished training's report, written beside the model's files: PNG plots of its
per-epoch series (kind "plot") and one self-contained HTML page (kind "report") with
the plots, the dataset, the per-class AP and pictures of the kept model's predictions
on the test split, else on the val split (the child's dumps, trainer_worker.detections).

The worker's I/O around the pure rendering (trainer_worker.review.plots, .report).
A report is derived from the run: when it cannot be rendered the model is still
whole, and the run succeeds without one (a notice says so).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from shared.metrics import overall, per_class
from shared.storage import sha256_file
from trainer_worker import detections
from trainer_worker.dataset import PreparedDataset
from trainer_worker.outcomes import ArtifactFile, TrainingSucceeded
from trainer_worker.review import match_detections, select_samples
from trainer_worker.review.inputs import check_detections, class_names
from trainer_worker.review.plots import (
    EpochPoint,
    learning_rate_plot,
    loss_plot,
    val_map_plot,
)
from trainer_worker.review.report import (
    DatasetFacts,
    EvaluationFacts,
    Plot,
    SamplePicture,
    TrainingReport,
    render_html,
)

log = structlog.get_logger(__name__)

REPORT_FILE = "report.html"
# name -> title of each plot, in the report's order.
PLOT_FILES = (
    ("plot-loss.png", "Training loss"),
    ("plot-learning-rate.png", "Learning rate"),
    ("plot-val-map.png", "Validation mAP"),
)
SAMPLES_PER_GROUP = 3
SCORE_THRESHOLD = 0.5
IOU_THRESHOLD = 0.5
# Pictures of the samples fit this many pixels on their longer side (small images grow).
SAMPLE_PX = 480
_MAX_UPSCALE = 3.0


@dataclass(frozen=True, slots=True, kw_only=True)
class _Evaluated:
    facts: EvaluationFacts
    ground_truth: Path | None
    detections: Path


async def with_report(
    outcome: TrainingSucceeded,
    *,
    prepared: PreparedDataset,
    title: str,
    architecture: str,
    work_dir: Path,
    artifact_dir: Path,
    notice: Any,
) -> TrainingSucceeded:
    """`outcome` with the report's files among its artifacts; unchanged (and `notice`d)
    when the report cannot be rendered. A fault writing the files is raised: it is one of
    the artifact root's, as writing the model's files would meet it."""
    try:
        files = await asyncio.to_thread(
            write_report,
            outcome,
            prepared=prepared,
            title=title,
            architecture=architecture,
            work_dir=work_dir,
            artifact_dir=artifact_dir,
        )
    except OSError:
        raise
    except Exception as error:
        log.warning("training report not rendered", error=repr(error))
        await notice(
            "report_not_rendered",
            "the training report could not be rendered; the model is complete without it",
        )
        return outcome
    return replace(outcome, artifacts=(*outcome.artifacts, *files))


def write_report(
    outcome: TrainingSucceeded,
    *,
    prepared: PreparedDataset,
    title: str,
    architecture: str,
    work_dir: Path,
    artifact_dir: Path,
) -> tuple[ArtifactFile, ...]:
    """Renders the plots and the page into `artifact_dir`; their artifacts, plots first."""
    epochs = [EpochPoint(epoch=r.epoch, train=r.train, val=r.val) for r in outcome.epochs]
    pngs = (
        loss_plot(epochs),
        learning_rate_plot(epochs),
        val_map_plot(epochs, best_epoch=outcome.best_epoch),
    )
    evaluated = _evaluated(outcome, prepared, work_dir)
    samples, note = _samples(evaluated)
    report = TrainingReport(
        title=title,
        architecture=architecture,
        best_epoch=outcome.best_epoch,
        epochs_trained=outcome.epochs_trained,
        duration_s=outcome.duration_s,
        device=outcome.device,
        dataset=_dataset_facts(prepared),
        evaluation=evaluated.facts,
        plots=[Plot(title=t, png=png) for (_, t), png in zip(PLOT_FILES, pngs, strict=True)],
        samples=samples,
        score_threshold=SCORE_THRESHOLD,
        iou_threshold=IOU_THRESHOLD,
        samples_note=note,
    )
    artifact_dir.mkdir(parents=True, exist_ok=True)
    written = [
        _write("plot", artifact_dir / name, png)
        for (name, _), png in zip(PLOT_FILES, pngs, strict=True)
    ]
    written.append(
        _write("report", artifact_dir / REPORT_FILE, render_html(report).encode("utf-8"))
    )
    return tuple(written)


def _evaluated(outcome: TrainingSucceeded, prepared: PreparedDataset, work_dir: Path) -> _Evaluated:
    """The evaluation that describes the model (the test split's, else the best val)."""
    tested = outcome.test_evaluation
    if tested is not None:
        metrics, split, epoch = tested.metrics, "test", tested.epoch
        count, truth = tested.image_count, prepared.test_path
    else:
        metrics, split, epoch = outcome.best_metrics, "val", outcome.best_epoch
        count, truth = outcome.val_image_count or prepared.val_image_count, prepared.val_path
    return _Evaluated(
        facts=EvaluationFacts(
            split=split,
            epoch=epoch,
            image_count=count,
            metrics=overall(metrics),
            per_class_ap=per_class(metrics),
        ),
        ground_truth=truth,
        detections=detections.of_epoch(work_dir, split, epoch),
    )


def _samples(evaluated: _Evaluated) -> tuple[list[SamplePicture], str]:
    """Pictures of the images with the most and the fewest errors; none, and why, when the
    kept weights' detections are not at hand (the best epoch trained in an earlier attempt)."""
    split = evaluated.facts.split
    if evaluated.ground_truth is None or not evaluated.detections.is_file():
        return [], f"The {split} split's detections of the kept weights are not available."
    ground_truth = json.loads(evaluated.ground_truth.read_text())
    try:
        found: list[Mapping[str, Any]] = json.loads(evaluated.detections.read_text())
        check_detections(ground_truth, found)
    except ValueError as error:
        # A dump cut short or of other images: the rest of the report still holds.
        log.warning("detections not pictured", path=str(evaluated.detections), error=str(error))
        return [], f"The {split} split's detections of the kept weights could not be read."
    matching = match_detections(
        ground_truth, found, score_threshold=SCORE_THRESHOLD, iou_threshold=IOU_THRESHOLD
    )
    chosen = select_samples(matching.per_image, k=SAMPLES_PER_GROUP)
    if not chosen.worst and not chosen.best:
        return [], f"The {split} split has no images."
    return [
        _picture(group, errors, ground_truth, found)
        for group, images in (("worst", chosen.worst), ("best", chosen.best))
        for errors in images
    ], ""


def _picture(
    group: str, errors: Any, ground_truth: Mapping[str, Any], found: Sequence[Mapping[str, Any]]
) -> SamplePicture:
    # Imported here: Pillow is for drawing, which only a report does in the worker.
    from PIL import Image

    from trainer_worker.review.render import render_sample

    image_id = errors.image_id
    truths = [a for a in ground_truth["annotations"] if a["image_id"] == image_id]
    predicted = [d for d in found if d["image_id"] == image_id]
    # The prepared split files name each image by its full path.
    with Image.open(errors.file_name) as image:
        scale = min(_MAX_UPSCALE, SAMPLE_PX / max(image.width, image.height))
        png = render_sample(
            image,
            truths=truths,
            detections=predicted,
            class_names=class_names(ground_truth),
            score_threshold=SCORE_THRESHOLD,
            scale=scale,
        )
    return SamplePicture(
        group=group,
        file_name=os.path.basename(errors.file_name),
        tp=errors.tp,
        fp=errors.fp,
        fn=errors.fn,
        png=png,
    )


def _dataset_facts(prepared: PreparedDataset) -> DatasetFacts:
    return DatasetFacts(
        fingerprint=prepared.fingerprint,
        classes=prepared.classes,
        image_count=prepared.image_count,
        annotation_count=prepared.annotation_count,
        instances_per_class=prepared.instances_per_class,
        train_image_count=prepared.train_image_count,
        val_image_count=prepared.val_image_count,
        test_image_count=prepared.test_image_count,
        split_source=prepared.split_source,
        split_seed=prepared.split_seed,
    )


def _write(kind: str, path: Path, content: bytes) -> ArtifactFile:
    path.write_bytes(content)
    return ArtifactFile(
        kind=kind,
        name=path.name,
        path=path,
        size_bytes=path.stat().st_size,
        sha256=sha256_file(path),
    )
