"""What a job of kind EVALUATION is for: the model evaluation it runs, what was asked
for and, once it succeeded, what it found. Pure Python.

An evaluation is not an aggregate of its own: its state, attempts, cancellation and
history are those of its job (a TrainingRun of kind EVALUATION), whose record holds it,
so that its findings are written with the job's success, in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from shared.payloads import Artifact, Evaluation


class RunKind(StrEnum):
    """What a job does (TrainingRun.Kind)."""

    TRAINING = "training"
    EVALUATION = "evaluation"


# The image sets an evaluation may take (EvaluateTrainedModelRequest.split).
SPLITS = ("all", "train", "val", "test")
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_IOU_THRESHOLD = 0.5
DEFAULT_SAMPLES = 3
MAX_SAMPLES = 10


@dataclass(slots=True, kw_only=True)
class EvaluationRecord:
    """A model evaluation: the request, and the findings of its succeeded job."""

    trained_model_id: uuid.UUID
    dataset_uri: str
    image_root: str
    split: str
    split_of_id: uuid.UUID | None
    score_threshold: float
    iou_threshold: float
    samples: int
    creator: str
    create_time: datetime
    # Set when the job succeeds.
    dataset_fingerprint: str | None = None
    images_fingerprint: str | None = None
    image_count: int | None = None
    evaluation: Evaluation | None = None
    # The proto JSON of DetectionReview, as the worker reported it.
    review: dict[str, Any] | None = None
    artifacts: list[Artifact] = field(default_factory=list)

    def record_findings(
        self,
        *,
        evaluation: Evaluation | None,
        review: Mapping[str, Any] | None,
        artifacts: Sequence[Artifact],
        dataset_fingerprint: str | None,
    ) -> None:
        """What the job found; the image set is the review's (the worker fingerprints the
        images it evaluated), their count the evaluation's."""
        self.evaluation = evaluation
        self.review = dict(review) if review else None
        self.artifacts = list(artifacts)
        self.dataset_fingerprint = dataset_fingerprint or None
        fingerprint = str(review.get("images_fingerprint", "")) if review else ""
        self.images_fingerprint = fingerprint or None
        self.image_count = evaluation.image_count if evaluation else None
