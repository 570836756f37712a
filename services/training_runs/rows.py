"""The rows of a training run and its history, as domain objects and back: the one
place that knows both the columns and the aggregate's fields. Every field is the column
of its name but those mapped here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from services.training_runs.domain import (
    EvaluationRecord,
    EventKind,
    Failure,
    RunEvent,
    RunKind,
    RunState,
    TrainingRun,
)
from services.training_runs.domain.events import payload_from_json
from shared.fields import field_values, from_attributes
from shared.json_shape import Payload, from_json_or_none, to_json_or_none
from shared.payloads import (
    DatasetSummary,
    EpochMetrics,
    Evaluation,
    Progress,
    TrainingFacts,
    artifacts_from_json,
    artifacts_to_json,
)

# The columns that hold a payload as its JSON, with the payload's class.
_PAYLOADS: dict[str, type[Payload]] = {
    "progress": Progress,
    "latest_evaluation": Evaluation,
    "best_evaluation": Evaluation,
    "test_evaluation": Evaluation,
    "dataset": DatasetSummary,
    "facts": TrainingFacts,
}
# Fields without a column: the history entries since the run was loaded; the evaluation
# of an evaluation job, in model_evaluations.
_UNSTORED = ("new_events", "evaluation")
# The columns of model_evaluations are read and written under this prefix, beside the run's.
EVALUATION_PREFIX = "evaluation__"


def to_run(row: Row[Any]) -> TrainingRun:
    m = row._mapping
    failure = (
        Failure(reason=m["failure_reason"], message=m["failure_message"] or "")
        if m["failure_reason"]
        else None
    )
    return from_attributes(
        TrainingRun,
        row,
        skip=_UNSTORED,
        state=RunState(m["state"]),
        failure=failure,
        artifacts=artifacts_from_json(m["artifacts"]),
        epoch_metrics=[EpochMetrics.from_json(e) for e in m["epoch_metrics"]],
        kind=RunKind(m["kind"]),
        evaluation=_to_evaluation(m),
        **{name: from_json_or_none(cls, m[name]) for name, cls in _PAYLOADS.items()},
    )


def _to_evaluation(m: Any) -> EvaluationRecord | None:
    """The evaluation of an evaluation job, from the model_evaluations columns joined in
    under EVALUATION_PREFIX; None for a training run."""
    p = EVALUATION_PREFIX
    if m.get(p + "trained_model_id") is None:
        return None
    values = {name.removeprefix(p): value for name, value in m.items() if name.startswith(p)}
    values.pop("id", None)
    return EvaluationRecord(
        **{
            **values,
            "evaluation": from_json_or_none(Evaluation, values["evaluation"]),
            "review": dict(values["review"]) if values["review"] else None,
            "artifacts": artifacts_from_json(values["artifacts"]),
        }
    )


def evaluation_values(evaluation: EvaluationRecord | None) -> dict[str, Any]:
    """The model_evaluations columns of an evaluation job's evaluation (but `id`), under
    EVALUATION_PREFIX; none for a training run."""
    if evaluation is None:
        return {}
    values = field_values(
        evaluation,
        evaluation=to_json_or_none(evaluation.evaluation),
        artifacts=artifacts_to_json(evaluation.artifacts),
    )
    return {EVALUATION_PREFIX + name: value for name, value in values.items()}


def run_values(run: TrainingRun) -> dict[str, Any]:
    return field_values(
        run,
        # trained_model_id is joined from the registry's table.
        skip=(*_UNSTORED, "id", "failure", "trained_model_id"),
        state=run.state.value,
        kind=run.kind.value,
        # Copies of the spec's, in columns of their own to filter on.
        architecture=run.architecture,
        dataset_uri=run.dataset_uri,
        failure_reason=run.failure.reason if run.failure else None,
        failure_message=run.failure.message if run.failure else None,
        artifacts=artifacts_to_json(run.artifacts),
        epoch_metrics=[e.to_json() for e in run.epoch_metrics],
        **{name: to_json_or_none(getattr(run, name)) for name in _PAYLOADS},
    )


def event_rows(run: TrainingRun) -> list[dict[str, Any]]:
    return [
        {
            "run_id": e.run_id,
            "sequence": e.sequence,
            "time": e.time,
            "attempt": e.attempt,
            "actor": e.actor,
            "kind": e.kind.value,
            "payload": e.payload.to_json(),
        }
        for e in run.new_events
    ]


def to_event(row: Row[Any]) -> RunEvent:
    m = row._mapping
    return RunEvent(
        run_id=m["run_id"],
        sequence=m["sequence"],
        time=m["time"],
        attempt=m["attempt"],
        actor=m["actor"],
        kind=EventKind(m["kind"]),
        payload=payload_from_json(EventKind(m["kind"]), m["payload"]),
    )
