"""The rows of a training run and its history, as domain objects and back: the one
place that knows both the columns and the aggregate's fields."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from services.training_runs.domain import EventKind, Failure, RunEvent, RunState, TrainingRun


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
        progress=m["progress"],
        latest_evaluation=m["latest_evaluation"],
        best_evaluation=m["best_evaluation"],
        test_evaluation=m["test_evaluation"],
        dataset=m["dataset"],
        failure=failure,
        artifacts=m["artifacts"],
        facts=m["facts"],
        epoch_metrics=m["epoch_metrics"],
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
        "progress": run.progress,
        "latest_evaluation": run.latest_evaluation,
        "best_evaluation": run.best_evaluation,
        "test_evaluation": run.test_evaluation,
        "dataset": run.dataset,
        "failure_reason": run.failure.reason if run.failure else None,
        "failure_message": run.failure.message if run.failure else None,
        "artifacts": run.artifacts,
        "facts": run.facts,
        "epoch_metrics": run.epoch_metrics,
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
            "payload": dict(e.payload),
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
        payload=m["payload"],
    )
