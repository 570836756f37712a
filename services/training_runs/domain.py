"""The TrainingRun aggregate and its state machine. Pure Python.

Every state change goes through a method here that checks the current state,
refuses an illegal transition (the run is left unchanged) and appends an event
to the run's history. Nothing else assigns `state`.

Payloads (progress, evaluation, dataset summary, artifacts) are plain mappings
in the shape of their wire messages: the domain decides when they apply, not
how they look.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from shared import metrics
from shared.errors import FailedPrecondition

Payload = Mapping[str, Any]
# The Evaluation.split of the test split's evaluation (the others are "val").
TEST_SPLIT = "test"
# The actor of changes nobody asked for, such as a lost worker detected.
SYSTEM = "system"


class RunState(StrEnum):
    QUEUED = "QUEUED"
    PREPARING = "PREPARING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLING = "CANCELLING"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL

    @property
    def is_active(self) -> bool:
        """A worker holds (or is about to hold) the run."""
        return self in (RunState.PREPARING, RunState.RUNNING, RunState.CANCELLING)


TERMINAL = frozenset({RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED})

_ALLOWED: dict[RunState, frozenset[RunState]] = {
    RunState.QUEUED: frozenset({RunState.PREPARING, RunState.CANCELLED, RunState.FAILED}),
    RunState.PREPARING: frozenset(
        {RunState.RUNNING, RunState.FAILED, RunState.CANCELLING, RunState.QUEUED}
    ),
    RunState.RUNNING: frozenset(
        {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLING, RunState.QUEUED}
    ),
    # A job that finished before it saw the cancel request keeps its result.
    RunState.CANCELLING: frozenset({RunState.CANCELLED, RunState.FAILED, RunState.SUCCEEDED}),
    RunState.SUCCEEDED: frozenset(),
    RunState.FAILED: frozenset(),
    RunState.CANCELLED: frozenset(),
}


class IllegalTransition(FailedPrecondition):
    def __init__(self, run_id: uuid.UUID, current: RunState, target: RunState) -> None:
        super().__init__(f"training run {run_id} is {current}; it cannot become {target}")
        self.current = current
        self.target = target


class EventKind(StrEnum):
    """The TrainingRunEvent payload a history entry carries."""

    STATE_CHANGED = "state_changed"
    PROGRESS = "progress"
    EVALUATION = "evaluation"
    DATASET_PREPARED = "dataset_prepared"
    NOTICE = "notice"


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEvent:
    """One entry of a run's history; sequences are per run, from 1, without gaps."""

    run_id: uuid.UUID
    sequence: int
    time: datetime
    attempt: int
    actor: str
    kind: EventKind
    payload: Payload

    @property
    def is_terminal(self) -> bool:
        return (
            self.kind is EventKind.STATE_CHANGED and RunState(self.payload["to_state"]).is_terminal
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Claim:
    """The answer to a worker that wants to start a job."""

    granted: bool
    attempt: int
    # Why not, when not granted: finished, cancelled, superseded, attempts_exhausted.
    refusal: str = ""
    # When granted: the newest stored checkpoint, to resume from, and the best epoch's
    # when it is another one (each with its "epoch").
    resume_from: Payload | None = None
    best_checkpoint: Payload | None = None


# Kind of the artifact entries that hold the stored checkpoints of a running run: the
# newest epoch's and the best epoch's.
RESUME_CHECKPOINT = "resume_checkpoint"


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    reason: str
    message: str


@dataclass(slots=True, kw_only=True)
class TrainingRun:
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
    progress: dict[str, Any] | None = None
    latest_evaluation: dict[str, Any] | None = None
    best_evaluation: dict[str, Any] | None = None
    # The test split's evaluation with the best checkpoint, once training is over.
    test_evaluation: dict[str, Any] | None = None
    dataset: dict[str, Any] | None = None
    failure: Failure | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] | None = None
    epoch_metrics: list[dict[str, Any]] = field(default_factory=list)
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
        if self.facts and int(self.facts.get("best_epoch", 0)) > 0:
            return int(self.facts["best_epoch"])
        evaluations = {int(e["epoch"]): e.get("val", {}) for e in self.epoch_metrics}
        validated = int(self.latest_evaluation.get("epoch", 0)) if self.latest_evaluation else 0
        return metrics.best_epoch(evaluations, last_epoch=validated)

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
    ) -> TrainingRun:
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
        )
        run._record_state(None, RunState.QUEUED, "created", "queued for training", creator, now)
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

    def claim(self, *, attempt: int, worker_id: str, max_attempts: int, now: datetime) -> Claim:
        """A worker asks to start the job of `attempt`. A job that comes back while
        the run is active was redelivered because its holder stopped renewing it: the
        holder is lost, and the claimant continues as the next attempt."""
        actor = f"worker:{worker_id}"
        if self.state is RunState.CANCELLING:
            # The worker that was to stop is gone; nothing is left to stop.
            self.cancelled(actor=SYSTEM, now=now)
        if self.state.is_terminal:
            refusal = "cancelled" if self.state is RunState.CANCELLED else "finished"
            return Claim(granted=False, attempt=self.attempt, refusal=refusal)
        if attempt < self.attempt:
            return Claim(granted=False, attempt=self.attempt, refusal="superseded")
        if self.state.is_active:
            silent = (now - self.heartbeat_time).total_seconds() if self.heartbeat_time else 0.0
            self.lose_worker(max_attempts=max_attempts, silent_s=silent, now=now)
            if self.state is RunState.FAILED:
                return Claim(granted=False, attempt=self.attempt, refusal="attempts_exhausted")
        self.start_preparing(worker_id=worker_id, actor=actor, now=now)
        return Claim(
            granted=True,
            attempt=self.attempt,
            resume_from=self.resume_checkpoint,
            best_checkpoint=self.best_checkpoint,
        )

    @property
    def resume_checkpoint(self) -> dict[str, Any] | None:
        """The newest stored checkpoint, for a later attempt to resume from."""
        return max(self._checkpoints(), key=lambda a: int(a["epoch"]), default=None)

    @property
    def best_checkpoint(self) -> dict[str, Any] | None:
        """The stored checkpoint of the best epoch so far, when it is not the newest one:
        a resumed attempt still chooses the model's checkpoint among all epochs."""
        best, newest = self.best_epoch, self.resume_checkpoint
        if best is None or newest is None or int(newest["epoch"]) == best:
            return None
        return next((a for a in self._checkpoints() if int(a["epoch"]) == best), None)

    def record_checkpoint(self, checkpoint: Payload, *, epoch: int, now: datetime) -> None:
        """Keeps the stored checkpoint of `epoch`; its evaluation comes later."""
        self._require_active("record a checkpoint")
        entry = {**checkpoint, "kind": RESUME_CHECKPOINT, "epoch": epoch}
        self.artifacts = [
            *(a for a in self.artifacts if not _is_checkpoint(a) or int(a["epoch"]) != epoch),
            entry,
        ]
        self._prune_checkpoints()
        self.update_time = now

    def record_dataset(self, summary: Payload, *, actor: str, now: datetime) -> None:
        self._require_active("record a prepared dataset")
        self.dataset = dict(summary)
        self._append(EventKind.DATASET_PREPARED, summary, actor, now)

    def start_running(self, *, device: str, actor: str, now: datetime) -> None:
        self._transition(RunState.RUNNING, "training", f"training on {device}", actor, now)

    def report_progress(self, progress: Payload, *, actor: str, now: datetime) -> bool:
        """Records progress; a report not newer than the last one is ignored (returns False)."""
        self._require_active("report progress")
        if self.progress is not None and int(progress.get("iteration", 0)) <= int(
            self.progress.get("iteration", 0)
        ):
            return False
        self.progress = dict(progress)
        # The latest iteration's values until the worker's epoch means replace them.
        self._epoch(int(progress.get("epoch", 0)))["train"] = metrics.train_metrics(
            loss=float(progress.get("loss", 0.0)),
            losses=progress.get("losses", {}),
            lr=progress.get("learning_rate"),
        )
        self._append(EventKind.PROGRESS, progress, actor, now)
        return True

    def report_evaluation(self, evaluation: Payload, *, actor: str, now: datetime) -> None:
        """A validation joins the per-epoch series; the test split's single evaluation is
        kept apart, so that it never counts as an epoch nor chooses the best one."""
        self._require_active("report an evaluation")
        if evaluation.get("split") == TEST_SPLIT:
            self.test_evaluation = dict(evaluation)
            self._append(EventKind.EVALUATION, evaluation, actor, now)
            return
        self.latest_evaluation = dict(evaluation)
        self._epoch(int(evaluation.get("epoch", 0)))["val"] = dict(evaluation.get("metrics", {}))
        self._prune_checkpoints()
        self._append(EventKind.EVALUATION, evaluation, actor, now)

    def _epoch(self, epoch: int) -> dict[str, Any]:
        """The per-epoch series entry of `epoch`, kept as metrics arrive."""
        for existing in self.epoch_metrics:
            if existing["epoch"] == epoch:
                return existing
        entry: dict[str, Any] = {"epoch": epoch, "train": {}, "val": {}}
        self.epoch_metrics = sorted([*self.epoch_metrics, entry], key=lambda e: e["epoch"])
        return entry

    def notify(self, *, code: str, message: str, actor: str, now: datetime) -> None:
        self._append(EventKind.NOTICE, {"code": code, "message": message}, actor, now)

    def heartbeat(self, *, now: datetime) -> None:
        """Liveness only: no history entry, no new version."""
        if self.state.is_active:
            self.heartbeat_time = now

    def succeed(
        self,
        *,
        artifacts: list[dict[str, Any]],
        facts: Payload,
        best_evaluation: Payload | None,
        epoch_metrics: list[dict[str, Any]],
        actor: str,
        now: datetime,
        test_evaluation: Payload | None = None,
    ) -> None:
        self._transition(RunState.SUCCEEDED, "succeeded", "training finished", actor, now)
        self.artifacts = artifacts
        self.facts = dict(facts)
        self.best_evaluation = dict(best_evaluation) if best_evaluation else None
        # The worker's final word: only a test evaluation of the kept checkpoint stays.
        self.test_evaluation = dict(test_evaluation) if test_evaluation else None
        self.failure = None
        if epoch_metrics:
            self.epoch_metrics = _merged_series(self.epoch_metrics, epoch_metrics)
        self.end_time = now

    def fail(
        self,
        *,
        reason: str,
        message: str,
        actor: str,
        now: datetime,
        artifacts: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """`artifacts`: the files with the details (the training log of a crash)."""
        self._transition(RunState.FAILED, reason, message, actor, now)
        self.failure = Failure(reason=reason, message=message)
        if artifacts:
            self.artifacts = [dict(a) for a in artifacts]
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
        self._transition(RunState.CANCELLED, "cancelled", "training stopped", actor, now)
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
        self._transition(
            RunState.QUEUED,
            "worker_lost",
            f"{message}; queued for attempt {self.attempt + 1} of {max_attempts}",
            SYSTEM,
            now,
        )
        self.attempt += 1
        self.worker_id = None
        self.heartbeat_time = None
        self.progress = None

    def release(self, *, actor: str, now: datetime) -> None:
        """The worker stopped (shutdown) and gave the job back: queued for the next attempt
        at once. Not a failure: it never uses up the run's attempts."""
        if self.state is RunState.CANCELLING:
            self.cancelled(actor=actor, now=now)
            return
        self._require_active("release the job")
        self._transition(
            RunState.QUEUED,
            "worker_released",
            f"worker {self.worker_id or '?'} stopped; queued for attempt {self.attempt + 1}",
            actor,
            now,
        )
        self.attempt += 1
        self.worker_id = None
        self.heartbeat_time = None
        self.progress = None

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

    # Internals.

    def _checkpoints(self) -> list[dict[str, Any]]:
        return [a for a in self.artifacts if _is_checkpoint(a)]

    def _prune_checkpoints(self) -> None:
        """Only the newest and the best epoch's checkpoints stay recorded, as only their
        files stay on the worker's disk (trainer_worker.hooks.PruneCheckpointsHook)."""
        newest = self.resume_checkpoint
        keep = {self.best_epoch, int(newest["epoch"]) if newest else None}
        self.artifacts = [
            a for a in self.artifacts if not _is_checkpoint(a) or int(a["epoch"]) in keep
        ]

    def _require_active(self, what: str) -> None:
        if not self.state.is_active:
            raise FailedPrecondition(f"training run {self.id} is {self.state}: cannot {what}")

    def _transition(
        self, target: RunState, reason: str, message: str, actor: str, now: datetime
    ) -> None:
        if target not in _ALLOWED[self.state]:
            raise IllegalTransition(self.id, self.state, target)
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
        self._append(
            EventKind.STATE_CHANGED,
            {
                "from_state": previous.value if previous else "STATE_UNSPECIFIED",
                "to_state": target.value,
                "reason": reason,
                "message": message,
            },
            actor,
            now,
        )

    def _append(self, kind: EventKind, payload: Payload, actor: str, now: datetime) -> None:
        self.last_sequence += 1
        self.new_events.append(
            RunEvent(
                run_id=self.id,
                sequence=self.last_sequence,
                time=now,
                attempt=self.attempt,
                actor=actor,
                kind=kind,
                payload=dict(payload),
            )
        )
        self.update_time = now
        if kind is not EventKind.PROGRESS:
            self.version += 1


def _is_checkpoint(artifact: Mapping[str, Any]) -> bool:
    return artifact.get("kind") == RESUME_CHECKPOINT


def _merged_series(live: list[dict[str, Any]], final: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worker's series (epoch means) wins; the live one fills what it lacks: a resumed
    attempt does not know the validation of the epoch it resumed from, which the earlier
    attempt reported."""
    merged = {int(e.get("epoch", 0)): dict(e) for e in live}
    for entry in final:
        epoch = int(entry.get("epoch", 0))
        before = merged.get(epoch, {})
        merged[epoch] = {
            "epoch": epoch,
            "train": entry.get("train") or before.get("train", {}),
            "val": entry.get("val") or before.get("val", {}),
        }
    return [merged[e] for e in sorted(merged)]
