"""WorkerEvents' payloads, built from what the worker observed (trainer_worker.publisher
sends them)."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration

from shared.metrics import overall, per_class
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from trainer_worker.dataset import PreparedDataset
from trainer_worker.outcomes import TrainingSucceeded
from trainer_worker.protocol import Evaluated, ProgressReported


def dataset_summary(prepared: PreparedDataset) -> common_pb2.DatasetSummary:
    return common_pb2.DatasetSummary(
        fingerprint=prepared.fingerprint,
        image_count=prepared.image_count,
        annotation_count=prepared.annotation_count,
        classes=list(prepared.classes),
        instances_per_class=dict(prepared.instances_per_class),
        train_image_count=prepared.train_image_count,
        val_image_count=prepared.val_image_count,
        test_image_count=prepared.test_image_count,
        split_seed=prepared.split_seed,
        split_source=prepared.split_source,
    )


def progress(event: ProgressReported) -> training_run_pb2.Progress:
    message = training_run_pb2.Progress(
        epoch=event.epoch,
        max_epochs=event.max_epochs,
        iteration=event.iter,
        max_iterations=event.max_iters,
        losses=dict(event.losses),
    )
    if event.loss is not None:
        message.loss = event.loss
    if event.lr is not None:
        message.learning_rate = event.lr
    if event.eta_s is not None:
        message.eta.CopyFrom(_duration(event.eta_s))
    return message


def evaluation(event: Evaluated, *, image_count: int = 0) -> common_pb2.Evaluation:
    return _evaluation(
        event.metrics,
        epoch=event.epoch,
        split=event.split,
        image_count=image_count or event.image_count,
    )


def succeeded(outcome: TrainingSucceeded) -> worker_pb2.WorkerEvent.Succeeded:
    message = worker_pb2.WorkerEvent.Succeeded(
        artifacts=[
            common_pb2.Artifact(
                kind=a.kind,
                name=a.name,
                uri=a.path.as_uri(),
                size_bytes=a.size_bytes,
                sha256=a.sha256,
            )
            for a in outcome.artifacts
        ],
        facts=common_pb2.TrainingFacts(
            duration=_duration(outcome.duration_s),
            epochs_trained=outcome.epochs_trained,
            best_epoch=outcome.best_epoch,
            parameter_count=outcome.parameter_count,
            device=outcome.device,
        ),
        evaluation=_evaluation(
            outcome.best_metrics, epoch=outcome.best_epoch, image_count=outcome.val_image_count
        ),
        epochs=[
            # The keys of the live series: per-class APs are not part of it.
            training_run_pb2.TrainingRunMetrics.EpochMetrics(
                epoch=r.epoch, train=dict(r.train), val=overall(r.val)
            )
            for r in outcome.epochs
        ],
    )
    if outcome.data_loading is not None:
        message.facts.data_loading.CopyFrom(
            common_pb2.DataLoading(
                workers=outcome.data_loading.workers,
                persistent_workers=outcome.data_loading.persistent_workers,
                pin_memory=outcome.data_loading.pin_memory,
            )
        )
    if outcome.test_evaluation is not None:
        message.test_evaluation.CopyFrom(evaluation(outcome.test_evaluation))
    return message


def failure(reason: str, message: str) -> training_run_pb2.Failure:
    return training_run_pb2.Failure(reason=reason, message=message)


def notice(code: str, message: str) -> training_run_pb2.TrainingRunEvent.Notice:
    return training_run_pb2.TrainingRunEvent.Notice(code=code, message=message)


# The IoU thresholds COCO's mAP averages over: 0.50 to 0.95 by 0.05.
COCO_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


def _evaluation(
    metrics: Mapping[str, float], *, epoch: int, split: str = "val", image_count: int = 0
) -> common_pb2.Evaluation:
    """The per-class APs travel as per_class_ap, the rest as metrics (shared.metrics)."""
    values = overall(metrics)
    return common_pb2.Evaluation(
        metrics=values,
        epoch=epoch,
        split=split,
        per_class_ap=per_class(metrics),
        iou_thresholds=COCO_IOU_THRESHOLDS if values else (),
        image_count=image_count,
    )


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromMilliseconds(round(seconds * 1000))
    return duration
