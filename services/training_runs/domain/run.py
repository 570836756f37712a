"""The TrainingRun aggregate. Pure Python.

Every state change goes through a method here that checks the current state,
refuses an illegal transition (the run is left unchanged) and appends an event
to the run's history. Nothing else assigns `state`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from services.training_runs.domain import checkpoints
from services.training_runs.domain.claims import ClaimDecision, decide_claim
from services.training_runs.domain.evaluation import EvaluationRecord, RunKind
from services.training_runs.domain.record import Failure, RunRecord
from services.training_runs.domain.states import SYSTEM, IllegalTransition, RunState
from shared.errors import FailedPrecondition
from shared.payloads import Artifact, EpochMetrics, Evaluation, TrainingFacts


class TrainingRun(RunRecord):
    """The aggregate: every change of a run's state is one of these methods."""

    __slots__ = ()

    # Construction.

    @classmethod
    def create(
        cls,
        *,
        display_name: str,
        labels: Mapping[str, str],
        spec: Mapping[str, Any],
        base_model_id: uuid.UUID | None,
        creator: str,
        request_id: uuid.UUID | None,
        request_hash: str | None,
        now: datetime,
        evaluation: EvaluationRecord | None = None,
    ) -> TrainingRun:
        """A new run; with `evaluation`, the job of that model evaluation."""
        run = cls(
            id=uuid.uuid4(),
            display_name=display_name,
            labels=dict(labels),
            state=RunState.QUEUED,
            spec=dict(spec),
            base_model_id=base_model_id,
            creator=creator,
            request_id=request_id,
            request_hash=request_hash,
            create_time=now,
            update_time=now,
            kind=RunKind.EVALUATION if evaluation else RunKind.TRAINING,
            evaluation=evaluation,
        )
        run._record_state(None, RunState.QUEUED, "created", f"queued for {run.work}", creator, now)
        return run

    def retried(
        self,
        *,
        creator: str,
        request_id: uuid.UUID | None,
        request_hash: str | None,
        now: datetime,
    ) -> TrainingRun:
        """A new run of this run's recorded spec (the same seed, so the same split)."""
        if self.is_evaluation:
            raise FailedPrecondition(
                f"training run {self.id} is the job of a model evaluation; "
                "start a new evaluation with EvaluateTrainedModel"
            )
        if self.state not in (RunState.FAILED, RunState.CANCELLED):
            raise FailedPrecondition(
                f"training run {self.id} is {self.state}; only a FAILED or CANCELLED run is retried"
            )
        run = TrainingRun.create(
            display_name=self.display_name,
            labels=self.labels,
            spec=self.spec,
            base_model_id=self.base_model_id,
            creator=creator,
            request_id=request_id,
            request_hash=request_hash,
            now=now,
        )
        run.retry_of_id = self.id
        return run

    # Worker-driven transitions.

    def start_preparing(self, *, worker_id: str, actor: str, now: datetime) -> None:
        self._transition(
            RunState.PREPARING, "started", f"worker {worker_id} took the job", actor, now
        )
        self.worker_id = worker_id
        self.heartbeat_time = now
        if self.start_time is None:
            self.start_time = now

    def start_running(self, *, device: str, actor: str, now: datetime) -> None:
        verb = "evaluating" if self.is_evaluation else "training"
        self._transition(RunState.RUNNING, verb, f"{verb} on {device}", actor, now)

    def claim(
        self, *, attempt: int, worker_id: str, max_attempts: int, now: datetime
    ) -> ClaimDecision:
        """A worker asks to start the job of `attempt` (claims.decide_claim)."""
        return decide_claim(
            self, attempt=attempt, worker_id=worker_id, max_attempts=max_attempts, now=now
        )

    def succeed(
        self,
        *,
        artifacts: Sequence[Artifact],
        facts: TrainingFacts,
        best_evaluation: Evaluation | None,
        epoch_metrics: Sequence[EpochMetrics],
        actor: str,
        now: datetime,
        test_evaluation: Evaluation | None = None,
    ) -> None:
        if self.is_evaluation:
            raise FailedPrecondition(
                f"training run {self.id} is the job of a model evaluation: it reports findings"
            )
        self._transition(RunState.SUCCEEDED, "succeeded", "training finished", actor, now)
        self.artifacts = list(artifacts)
        self.facts = facts
        self.best_evaluation = best_evaluation
        # The worker's final word: only a test evaluation of the kept checkpoint stays.
        self.test_evaluation = test_evaluation
        self.failure = None
        if epoch_metrics:
            self.epoch_metrics = checkpoints.merged_series(self.epoch_metrics, epoch_metrics)
        self.end_time = now

    def succeed_evaluation(
        self,
        *,
        artifacts: Sequence[Artifact],
        evaluation: Evaluation | None,
        review: Mapping[str, Any] | None,
        actor: str,
        now: datetime,
    ) -> None:
        """An evaluation job's end: its findings go onto its evaluation, written with the
        state change. FAILED (`model_deleted`) when the evaluation is gone with its model."""
        if self.evaluation is None:
            # Its model was deleted (and its evaluation with it) while the job ran.
            self.fail(
                reason="model_deleted",
                message="the evaluated model was deleted; its findings were not kept",
                actor=actor,
                now=now,
            )
            return
        self._transition(RunState.SUCCEEDED, "succeeded", "evaluation finished", actor, now)
        self.artifacts = list(artifacts)
        self.failure = None
        self.evaluation.record_findings(
            evaluation=evaluation,
            review=review,
            artifacts=artifacts,
            dataset_fingerprint=self.dataset.fingerprint if self.dataset else None,
        )
        self.end_time = now

    def fail(
        self,
        *,
        reason: str,
        message: str,
        actor: str,
        now: datetime,
        artifacts: Sequence[Artifact] = (),
    ) -> None:
        """`artifacts`: the files with the details (the training log of a crash)."""
        self._transition(RunState.FAILED, reason, message, actor, now)
        self.failure = Failure(reason=reason, message=message)
        if artifacts:
            self.artifacts = list(artifacts)
        self.end_time = now

    # Caller-driven transitions.

    def request_cancel(self, *, reason: str, actor: str, now: datetime) -> None:
        """QUEUED ends at once; an active run stops at its worker's next iteration.
        Cancelling twice is harmless; a finished run cannot be cancelled."""
        message = reason or "cancelled by request"
        if self.state in (RunState.CANCELLING, RunState.CANCELLED):
            return
        if self.state is RunState.QUEUED:
            self._transition(RunState.CANCELLED, "cancelled", message, actor, now)
            self.failure = Failure(reason="cancelled", message=message)
            self.end_time = now
            return
        self._transition(RunState.CANCELLING, "cancel_requested", message, actor, now)
        # Kept for when the worker confirms; dropped if the job finishes first.
        self.failure = Failure(reason="cancelled", message=message)

    def cancelled(self, *, actor: str, now: datetime) -> None:
        """The worker stopped on a cancel request; partial progress and metrics are kept."""
        if self.state is not RunState.CANCELLING:
            raise IllegalTransition(self.id, self.state, RunState.CANCELLED)
        self._transition(RunState.CANCELLED, "cancelled", f"{self.work} stopped", actor, now)
        self.failure = self.failure or Failure(reason="cancelled", message="cancelled by request")
        self.end_time = now

    def lose_worker(self, *, max_attempts: int, silent_s: float, now: datetime) -> None:
        """The worker stopped heart-beating: the run is queued for another attempt, or
        FAILED with `worker_lost` once its attempts are spent. Never left active."""
        message = f"worker {self.worker_id or '?'} sent no heartbeat for {silent_s:.0f}s"
        if self.state is RunState.CANCELLING:
            self.cancelled(actor=SYSTEM, now=now)
            return
        if self.attempt >= max_attempts:
            self.fail(
                reason="worker_lost",
                message=f"{message}; attempt {self.attempt} of {max_attempts}, none left",
                actor=SYSTEM,
                now=now,
            )
            return
        self._requeue(
            "worker_lost",
            f"{message}; queued for attempt {self.attempt + 1} of {max_attempts}",
            SYSTEM,
            now,
        )

    def release(self, *, actor: str, now: datetime) -> None:
        """The worker stopped (shutdown) and gave the job back: queued for the next attempt
        at once. Not a failure: it never uses up the run's attempts."""
        if self.state is RunState.CANCELLING:
            self.cancelled(actor=actor, now=now)
            return
        self._require_active("release the job")
        self._requeue(
            "worker_released",
            f"worker {self.worker_id or '?'} stopped; queued for attempt {self.attempt + 1}",
            actor,
            now,
        )

    def rename(
        self, *, display_name: str | None, labels: Mapping[str, str] | None, now: datetime
    ) -> None:
        if display_name is not None:
            self.display_name = display_name
        if labels is not None:
            self.labels = dict(labels)
        self.update_time = now
        self.version += 1

    def ensure_deletable(self) -> None:
        if self.state.is_active or self.state is RunState.QUEUED:
            raise FailedPrecondition(
                f"training run {self.id} is {self.state}; cancel it before deleting it"
            )
