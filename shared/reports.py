"""What a trainer worker reports about a job (the WorkerEvent payloads), typed. Pure Python.

`ReportKind` names the payload field of raven.training.v1.WorkerEvent; each kind has one
frozen payload class. The worker publishes them and TrainingRunService applies them, so
a kind one side adds and the other does not know is a type error, not a log line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum, auto
from typing import Any, ClassVar

from shared.json_shape import Json, drop_defaults, int64, to_json_or_none
from shared.payloads import (
    Artifact,
    DatasetSummary,
    EpochMetrics,
    Evaluation,
    Notice,
    Progress,
    TrainingFacts,
    artifacts_from_json,
    artifacts_to_json,
)


class ReportKind(StrEnum):
    """The WorkerEvent `payload` oneof: each value is a field name."""

    PREPARING = auto()
    DATASET_PREPARED = auto()
    RUNNING = auto()
    PROGRESS = auto()
    EVALUATION = auto()
    NOTICE = auto()
    SUCCEEDED = auto()
    FAILED = auto()
    CANCELLED = auto()
    HEARTBEAT = auto()
    CHECKPOINT_SAVED = auto()
    RELEASED = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class Preparing:
    """The worker took the job and prepares the dataset."""

    kind: ClassVar[ReportKind] = ReportKind.PREPARING

    def to_json(self) -> Json:
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetPrepared:
    kind: ClassVar[ReportKind] = ReportKind.DATASET_PREPARED
    summary: DatasetSummary

    def to_json(self) -> Json:
        return self.summary.to_json()


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    kind: ClassVar[ReportKind] = ReportKind.RUNNING
    # "cpu", "cuda:0", ...; "" when not said.
    device: str = ""

    def to_json(self) -> Json:
        return drop_defaults({"device": self.device})


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressReported:
    kind: ClassVar[ReportKind] = ReportKind.PROGRESS
    progress: Progress

    def to_json(self) -> Json:
        return self.progress.to_json()


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationReported:
    kind: ClassVar[ReportKind] = ReportKind.EVALUATION
    evaluation: Evaluation

    def to_json(self) -> Json:
        return self.evaluation.to_json()


@dataclass(frozen=True, slots=True, kw_only=True)
class NoticeReported:
    kind: ClassVar[ReportKind] = ReportKind.NOTICE
    notice: Notice

    def to_json(self) -> Json:
        return self.notice.to_json()


@dataclass(frozen=True, slots=True, kw_only=True)
class Succeeded:
    kind: ClassVar[ReportKind] = ReportKind.SUCCEEDED
    artifacts: Sequence[Artifact] = ()
    facts: TrainingFacts = field(default_factory=TrainingFacts)
    # Validation of the best epoch (absent metrics stay absent).
    evaluation: Evaluation | None = None
    epochs: Sequence[EpochMetrics] = ()
    # The test split's evaluation of the best epoch's checkpoint, when there is a test split.
    test_evaluation: Evaluation | None = None
    # An evaluation job's findings: the proto JSON of DetectionReview (its curves and
    # matrix are stored and served as they came, so they stay in that shape).
    review: Mapping[str, Any] | None = None

    def to_json(self) -> Json:
        return drop_defaults(
            {
                "artifacts": artifacts_to_json(self.artifacts),
                "facts": self.facts.to_json(),
                "evaluation": to_json_or_none(self.evaluation),
                "epochs": [e.to_json() for e in self.epochs],
                "test_evaluation": to_json_or_none(self.test_evaluation),
                "review": dict(self.review) if self.review else None,
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Failed:
    kind: ClassVar[ReportKind] = ReportKind.FAILED
    reason: str = ""
    message: str = ""
    # The files with the details (the training log of a crash).
    artifacts: Sequence[Artifact] = ()

    def to_json(self) -> Json:
        return drop_defaults(
            {
                "reason": self.reason,
                "message": self.message,
                "artifacts": artifacts_to_json(self.artifacts),
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancelled:
    """The job stopped on a cancel request."""

    kind: ClassVar[ReportKind] = ReportKind.CANCELLED

    def to_json(self) -> Json:
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    kind: ClassVar[ReportKind] = ReportKind.HEARTBEAT

    def to_json(self) -> Json:
        return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointSaved:
    """A checkpoint was written and stored: what a later attempt resumes from."""

    kind: ClassVar[ReportKind] = ReportKind.CHECKPOINT_SAVED
    epoch: int = 0
    iteration: int = 0
    checkpoint: Artifact = field(default_factory=Artifact)

    def to_json(self) -> Json:
        return drop_defaults(
            {
                "epoch": self.epoch,
                "iteration": int64(self.iteration),
                "checkpoint": self.checkpoint.to_json(),
            }
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Released:
    """The worker is shutting down and gave the job back."""

    kind: ClassVar[ReportKind] = ReportKind.RELEASED
    reason: str = ""

    def to_json(self) -> Json:
        return drop_defaults({"reason": self.reason})


Report = (
    Preparing
    | DatasetPrepared
    | Running
    | ProgressReported
    | EvaluationReported
    | NoticeReported
    | Succeeded
    | Failed
    | Cancelled
    | Heartbeat
    | CheckpointSaved
    | Released
)


def _optional_evaluation(data: Mapping[str, Any] | None) -> Evaluation | None:
    """None for an absent evaluation, and for an empty one."""
    return Evaluation.from_json(data) if data else None


_FROM_JSON: dict[ReportKind, Callable[[Mapping[str, Any]], Report]] = {
    ReportKind.PREPARING: lambda d: Preparing(),
    ReportKind.DATASET_PREPARED: lambda d: DatasetPrepared(summary=DatasetSummary.from_json(d)),
    ReportKind.RUNNING: lambda d: Running(device=str(d.get("device", ""))),
    ReportKind.PROGRESS: lambda d: ProgressReported(progress=Progress.from_json(d)),
    ReportKind.EVALUATION: lambda d: EvaluationReported(evaluation=Evaluation.from_json(d)),
    ReportKind.NOTICE: lambda d: NoticeReported(notice=Notice.from_json(d)),
    ReportKind.SUCCEEDED: lambda d: Succeeded(
        artifacts=artifacts_from_json(d.get("artifacts")),
        facts=TrainingFacts.from_json(d.get("facts", {})),
        evaluation=_optional_evaluation(d.get("evaluation")),
        epochs=[EpochMetrics.from_json(e) for e in d.get("epochs", ())],
        test_evaluation=_optional_evaluation(d.get("test_evaluation")),
        review=dict(d["review"]) if d.get("review") else None,
    ),
    ReportKind.FAILED: lambda d: Failed(
        reason=str(d.get("reason", "")),
        message=str(d.get("message", "")),
        artifacts=artifacts_from_json(d.get("artifacts")),
    ),
    ReportKind.CANCELLED: lambda d: Cancelled(),
    ReportKind.HEARTBEAT: lambda d: Heartbeat(),
    ReportKind.CHECKPOINT_SAVED: lambda d: CheckpointSaved(
        epoch=int(d.get("epoch", 0)),
        iteration=int(d.get("iteration", 0)),
        checkpoint=Artifact.from_json(d.get("checkpoint", {})),
    ),
    ReportKind.RELEASED: lambda d: Released(reason=str(d.get("reason", ""))),
}


def report_from_json(kind: ReportKind, data: Mapping[str, Any]) -> Report:
    """The payload of a WorkerEvent from its proto JSON (field `kind` of the oneof);
    `report.to_json()` is the way back."""
    return _FROM_JSON[kind](data)
