"""The entries of a run's history (TrainingRunEvent) and their payloads. Pure Python."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum, auto
from typing import Any, Self

from services.training_runs.domain.states import RunState
from shared.json_shape import Json
from shared.payloads import DatasetSummary, Evaluation, Notice, Progress

# The state a new run comes from, in its first history entry.
NO_STATE = "STATE_UNSPECIFIED"


class EventKind(StrEnum):
    """The TrainingRunEvent payload a history entry carries."""

    STATE_CHANGED = auto()
    PROGRESS = auto()
    EVALUATION = auto()
    DATASET_PREPARED = auto()
    NOTICE = auto()


@dataclass(frozen=True, slots=True, kw_only=True)
class StateChange:
    # NO_STATE for the first entry of a run.
    from_state: str
    to_state: RunState
    reason: str
    message: str

    def to_json(self) -> Json:
        return {
            "from_state": self.from_state,
            "to_state": self.to_state.value,
            "reason": self.reason,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Self:
        return cls(
            from_state=str(data.get("from_state", NO_STATE)),
            to_state=RunState(data["to_state"]),
            reason=str(data.get("reason", "")),
            message=str(data.get("message", "")),
        )


EventPayload = StateChange | Progress | Evaluation | DatasetSummary | Notice

_FROM_JSON: dict[EventKind, Callable[[Mapping[str, Any]], EventPayload]] = {
    EventKind.STATE_CHANGED: StateChange.from_json,
    EventKind.PROGRESS: Progress.from_json,
    EventKind.EVALUATION: Evaluation.from_json,
    EventKind.DATASET_PREPARED: DatasetSummary.from_json,
    EventKind.NOTICE: Notice.from_json,
}


def payload_from_json(kind: EventKind, data: Mapping[str, Any]) -> EventPayload:
    """A stored history entry's payload (proto JSON of its TrainingRunEvent field)."""
    return _FROM_JSON[kind](data)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunEvent:
    """One entry of a run's history; sequences are per run, from 1, without gaps."""

    run_id: uuid.UUID
    sequence: int
    time: datetime
    attempt: int
    actor: str
    kind: EventKind
    payload: EventPayload

    @property
    def state_change(self) -> StateChange | None:
        return self.payload if isinstance(self.payload, StateChange) else None

    @property
    def is_terminal(self) -> bool:
        change = self.state_change
        return change is not None and change.to_state.is_terminal
