"""The rows of a training run and its history, as domain objects and back: the one
place that knows both the columns and the aggregate's fields."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from services.training_runs.domain import EventKind, Failure, RunEvent, RunState, TrainingRun
from services.training_runs.domain.events import payload_from_json
from shared.json_shape import from_json_or_none, to_json_or_none
from shared.payloads import (
    DatasetSummary,
    EpochMetrics,
    Evaluation,
    Progress,
    TrainingFacts,
    artifacts_from_json,
    artifacts_to_json,
)


def to_run(row: Row[Any]) -> TrainingRun:
    m = row._mapping
    failure = (
        Failure(reason=m["failure_reason"], message=m["failure_message"] or "")
        if m["failure_reason"]
        else None
    )
    return TrainingRun(
        id=m["id"],
        display_name=m["display_name"],
        labels=m["labels"],
        state=RunState(m["state"]),
        spec=m["spec"],
        base_model_id=m["base_model_id"],
        creator=m["creator"],
        request_id=m["request_id"],
        request_hash=m["request_hash"],
        retry_of_id=m["retry_of_id"],
        attempt=m["attempt"],
        progress=from_json_or_none(Progress, m["progress"]),
        latest_evaluation=from_json_or_none(Evaluation, m["latest_evaluation"]),
        best_evaluation=from_json_or_none(Evaluation, m["best_evaluation"]),
        test_evaluation=from_json_or_none(Evaluation, m["test_evaluation"]),
        dataset=from_json_or_none(DatasetSummary, m["dataset"]),
        failure=failure,
        artifacts=artifacts_from_json(m["artifacts"]),
        facts=from_json_or_none(TrainingFacts, m["facts"]),
        epoch_metrics=[EpochMetrics.from_json(e) for e in m["epoch_metrics"]],
        worker_id=m["worker_id"],
        heartbeat_time=m["heartbeat_time"],
        start_time=m["start_time"],
        end_time=m["end_time"],
        last_sequence=m["last_sequence"],
        version=m["version"],
        create_time=m["create_time"],
        update_time=m["update_time"],
        trained_model_id=m["trained_model_id"],
    )


def run_values(run: TrainingRun) -> dict[str, Any]:
    return {
        "display_name": run.display_name,
        "labels": run.labels,
        "state": run.state.value,
        "spec": run.spec,
        "architecture": run.architecture,
        "dataset_uri": run.dataset_uri,
        "base_model_id": run.base_model_id,
        "creator": run.creator,
        "request_id": run.request_id,
        "request_hash": run.request_hash,
        "retry_of_id": run.retry_of_id,
        "attempt": run.attempt,
        "progress": to_json_or_none(run.progress),
        "latest_evaluation": to_json_or_none(run.latest_evaluation),
        "best_evaluation": to_json_or_none(run.best_evaluation),
        "test_evaluation": to_json_or_none(run.test_evaluation),
        "dataset": to_json_or_none(run.dataset),
        "failure_reason": run.failure.reason if run.failure else None,
        "failure_message": run.failure.message if run.failure else None,
        "artifacts": artifacts_to_json(run.artifacts),
        "facts": to_json_or_none(run.facts),
        "epoch_metrics": [e.to_json() for e in run.epoch_metrics],
        "worker_id": run.worker_id,
        "heartbeat_time": run.heartbeat_time,
        "start_time": run.start_time,
        "end_time": run.end_time,
        "last_sequence": run.last_sequence,
        "version": run.version,
        "create_time": run.create_time,
        "update_time": run.update_time,
    }


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
