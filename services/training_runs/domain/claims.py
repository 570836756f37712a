"""The service's decision on a worker's claim of a job. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum, auto
from typing import TYPE_CHECKING

from services.training_runs.domain.states import SYSTEM, RunState
from shared.payloads import Artifact

if TYPE_CHECKING:
    from services.training_runs.domain.run import TrainingRun


class ClaimRefusal(StrEnum):
    """Why a claim was refused (ClaimJobResponse.refusal)."""

    FINISHED = auto()
    CANCELLED = auto()
    SUPERSEDED = auto()
    ATTEMPTS_EXHAUSTED = auto()
    UNKNOWN_RUN = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class ClaimDecision:
    """The answer to a worker that wants to start a job: granted for `attempt`, or not."""

    granted: bool
    attempt: int
    refusal: ClaimRefusal | None = None
    # When granted: the newest stored checkpoint, to resume from, and the best epoch's
    # when it is another one (each with its epoch).
    resume_from: Artifact | None = None
    best_checkpoint: Artifact | None = None

    @classmethod
    def refused(cls, refusal: ClaimRefusal, *, attempt: int) -> ClaimDecision:
        return cls(granted=False, attempt=attempt, refusal=refusal)


def decide_claim(
    run: TrainingRun, *, attempt: int, worker_id: str, max_attempts: int, now: datetime
) -> ClaimDecision:
    """A worker asks to start the job of `attempt` of `run`. A job that comes back while
    the run is active was redelivered because its holder stopped renewing it: the
    holder is lost, and the claimant continues as the next attempt."""
    if run.state is RunState.CANCELLING:
        # The worker that was to stop is gone; nothing is left to stop.
        run.cancelled(actor=SYSTEM, now=now)
    if run.state.is_terminal:
        refusal = (
            ClaimRefusal.CANCELLED if run.state is RunState.CANCELLED else ClaimRefusal.FINISHED
        )
        return ClaimDecision.refused(refusal, attempt=run.attempt)
    if attempt < run.attempt:
        return ClaimDecision.refused(ClaimRefusal.SUPERSEDED, attempt=run.attempt)
    if run.state.is_active:
        silent = (now - run.heartbeat_time).total_seconds() if run.heartbeat_time else 0.0
        run.lose_worker(max_attempts=max_attempts, silent_s=silent, now=now)
        if run.state is RunState.FAILED:
            return ClaimDecision.refused(ClaimRefusal.ATTEMPTS_EXHAUSTED, attempt=run.attempt)
    run.start_preparing(worker_id=worker_id, actor=f"worker:{worker_id}", now=now)
    return ClaimDecision(
        granted=True,
        attempt=run.attempt,
        resume_from=run.resume_checkpoint,
        best_checkpoint=run.best_checkpoint,
    )
