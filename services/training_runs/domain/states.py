"""The states of a training run and the transitions between them. Pure Python."""

from __future__ import annotations

import uuid
from enum import StrEnum

from shared.errors import FailedPrecondition

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

ALLOWED: dict[RunState, frozenset[RunState]] = {
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


def check_transition(run_id: uuid.UUID, current: RunState, target: RunState) -> None:
    if target not in ALLOWED[current]:
        raise IllegalTransition(run_id, current, target)
