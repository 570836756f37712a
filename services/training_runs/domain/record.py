"""What a training run holds, what follows from it (the best epoch, the checkpoints to
resume from), what a worker reports that changes no state (progress, evaluations,
checkpoints, the prepared dataset), and the appending of the run's history. Pure Python.
The state transitions are TrainingRun's (services.training_runs.domain.run)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.training_runs.domain import checkpoints
from services.training_runs.domain.evaluation import EvaluationRecord, RunKind
from services.training_runs.domain.events import (
    NO_STATE,
    EventKind,
    EventPayload,
    RunEvent,
    StateChange,
)
from services.training_runs.domain.states import RunState, check_transition
from shared import metrics
from shared.errors import FailedPrecondition
from shared.payloads import (
    Artifact,
    DatasetSummary,
    EpochMetrics,
    Evaluation,
    Notice,
    Progress,
    TrainingFacts,
)

# The Evaluation.split of the test split's evaluation (the others are "val").
TEST_SPLIT = "test"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    reason: str
    message: str


@dataclass(slots=True, kw_only=True)
class RunRecord:
    """A training run's record; TrainingRun adds its state transitions."""

    id: uuid.UUID
    display_name: str
    labels: dict[str, str]
    state: RunState
    # The exact spec (proto JSON of TrainingSpec), defaults filled in.
    spec: dict[str, Any]
    base_model_id: uuid.UUID | None
    creator: str
    create_time: datetime
    update_time: datetime
    request_id: uuid.UUID | None = None
    request_hash: str | None = None
    retry_of_id: uuid.UUID | None = None
    attempt: int = 1
    progress: Progress | None = None
    latest_evaluation: Evaluation | None = None
    best_evaluation: Evaluation | None = None
    # The test split's evaluation with the best checkpoint, once training is over.
    test_evaluation: Evaluation | None = None
    dataset: DatasetSummary | None = None
    failure: Failure | None = None
    artifacts: list[Artifact] = field(default_factory=list)
    facts: TrainingFacts | None = None
    epoch_metrics: list[EpochMetrics] = field(default_factory=list)
    worker_id: str | None = None
    heartbeat_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    last_sequence: int = 0
    version: int = 1
    # The model this run produced, once the registry has it (read-only here).
    trained_model_id: uuid.UUID | None = None
    # History entries added since the run was loaded; the unit of work stores them.
    new_events: list[RunEvent] = field(default_factory=list)
    # TRAINING, or EVALUATION: the job of the model evaluation `evaluation`.
    kind: RunKind = RunKind.TRAINING
    evaluation: EvaluationRecord | None = None

    @property
    def is_evaluation(self) -> bool:
        return self.kind is RunKind.EVALUATION

    @property
    def work(self) -> str:
        """What the job does, in the words of its history ("training", "evaluation")."""
        return self.kind.value

    @property
    def architecture(self) -> str:
        return str(self.spec["architecture"])

    @property
    def dataset_uri(self) -> str:
        return str(self.spec["dataset_uri"])

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def best_epoch(self) -> int | None:
        """The epoch with the highest coco/bbox_mAP, earliest on ties; the last validated
        epoch when none has a mAP; None before any validation (shared.metrics.best_epoch,
        the worker's rule). A finished run's is its facts': the epoch whose checkpoint its
        model keeps."""
        if self.facts and self.facts.best_epoch > 0:
            return self.facts.best_epoch
        validated = self.latest_evaluation.epoch if self.latest_evaluation else 0
        return checkpoints.best_epoch(self.epoch_metrics, last_validated=validated)

    @property
    def resume_checkpoint(self) -> Artifact | None:
        """The newest stored checkpoint, for a later attempt to resume from."""
        return checkpoints.newest(self.artifacts)

    @property
    def best_checkpoint(self) -> Artifact | None:
        """The stored checkpoint of the best epoch so far, when it is not the newest one:
        a resumed attempt still chooses the model's checkpoint among all epochs."""
        best, newest = self.best_epoch, self.resume_checkpoint
        if best is None or newest is None or newest.epoch == best:
            return None
        return checkpoints.of_epoch(self.artifacts, best)

    # What a worker reports while the state stays.

    def record_checkpoint(self, checkpoint: Artifact, *, epoch: int, now: datetime) -> None:
        """Keeps the stored checkpoint of `epoch`; its evaluation comes later."""
        self._require_active("record a checkpoint")
        self.artifacts = checkpoints.with_checkpoint(self.artifacts, checkpoint, epoch=epoch)
        self.artifacts = checkpoints.pruned(self.artifacts, best_epoch=self.best_epoch)
        self.update_time = now

    def record_dataset(self, summary: DatasetSummary, *, actor: str, now: datetime) -> None:
        self._require_active("record a prepared dataset")
        self.dataset = summary
        self._append(EventKind.DATASET_PREPARED, summary, actor, now)

    def report_progress(self, progress: Progress, *, actor: str, now: datetime) -> bool:
        """Records progress; a report not newer than the last one is ignored (returns False)."""
        self._require_active("report progress")
        if self.progress is not None and progress.iteration <= self.progress.iteration:
            return False
        self.progress = progress
        # The latest iteration's values until the worker's epoch means replace them.
        train = metrics.train_metrics(
            loss=progress.loss, losses=progress.losses, lr=progress.learning_rate or None
        )
        self.epoch_metrics = checkpoints.with_epoch(self.epoch_metrics, progress.epoch, train=train)
        self._append(EventKind.PROGRESS, progress, actor, now)
        return True

    def report_evaluation(self, evaluation: Evaluation, *, actor: str, now: datetime) -> None:
        """A validation joins the per-epoch series; the test split's single evaluation is
        kept apart, so that it never counts as an epoch nor chooses the best one."""
        self._require_active("report an evaluation")
        if evaluation.split == TEST_SPLIT:
            self.test_evaluation = evaluation
            self._append(EventKind.EVALUATION, evaluation, actor, now)
            return
        self.latest_evaluation = evaluation
        self.epoch_metrics = checkpoints.with_epoch(
            self.epoch_metrics, evaluation.epoch, val=evaluation.metrics
        )
        self.artifacts = checkpoints.pruned(self.artifacts, best_epoch=self.best_epoch)
        self._append(EventKind.EVALUATION, evaluation, actor, now)

    def notify(self, *, code: str, message: str, actor: str, now: datetime) -> None:
        self._append(EventKind.NOTICE, Notice(code=code, message=message), actor, now)

    def heartbeat(self, *, now: datetime) -> None:
        """Liveness only: no history entry, no new version."""
        if self.state.is_active:
            self.heartbeat_time = now

    # Internals.

    def _requeue(self, reason: str, message: str, actor: str, now: datetime) -> None:
        self._transition(RunState.QUEUED, reason, message, actor, now)
        self.attempt += 1
        self.worker_id = None
        self.heartbeat_time = None
        self.progress = None

    def _require_active(self, what: str) -> None:
        if not self.state.is_active:
            raise FailedPrecondition(f"training run {self.id} is {self.state}: cannot {what}")

    def _transition(
        self, target: RunState, reason: str, message: str, actor: str, now: datetime
    ) -> None:
        check_transition(self.id, self.state, target)
        previous = self.state
        self.state = target
        self._record_state(previous, target, reason, message, actor, now)

    def _record_state(
        self,
        previous: RunState | None,
        target: RunState,
        reason: str,
        message: str,
        actor: str,
        now: datetime,
    ) -> None:
        change = StateChange(
            from_state=previous.value if previous else NO_STATE,
            to_state=target,
            reason=reason,
            message=message,
        )
        self._append(EventKind.STATE_CHANGED, change, actor, now)

    def _append(self, kind: EventKind, payload: EventPayload, actor: str, now: datetime) -> None:
        self.last_sequence += 1
        self.new_events.append(
            RunEvent(
                run_id=self.id,
                sequence=self.last_sequence,
                time=now,
                attempt=self.attempt,
                actor=actor,
                kind=kind,
                payload=payload,
            )
        )
        self.update_time = now
        if kind is not EventKind.PROGRESS:
            self.version += 1
