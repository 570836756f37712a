"""Every SQL query of TrainingRunService."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, delete, insert, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.training_runs.domain import EventKind, Failure, RunEvent, RunState, TrainingRun
from services.training_runs.domain.events import payload_from_json
from shared.db.schema import processed_messages, trained_models, training_run_events, training_runs
from shared.json_shape import from_json_or_none, to_json_or_none
from shared.pagination import Cursor
from shared.payloads import (
    DatasetSummary,
    EpochMetrics,
    Evaluation,
    Progress,
    TrainingFacts,
    artifacts_from_json,
    artifacts_to_json,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFilter:
    states: tuple[RunState, ...] = ()
    base_model_id: uuid.UUID | None = None
    dataset_uri: str = ""
    creator: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    newest_first: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseModel:
    """What a run needs to know of the model it fine-tunes."""

    id: uuid.UUID
    architecture: str
    classes: list[str]
    artifacts: list[dict[str, Any]]
    creator: str = ""


def _select_runs() -> Any:
    return select(
        training_runs,
        trained_models.c.id.label("trained_model_id"),
    ).outerjoin(trained_models, trained_models.c.training_run_id == training_runs.c.id)


def _to_run(row: Row[Any]) -> TrainingRun:
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


def _values(run: TrainingRun) -> dict[str, Any]:
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


def _to_event(row: Row[Any]) -> RunEvent:
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


# The states of the partial index ix_training_runs_active_heartbeat.
ACTIVE_STATES = (RunState.PREPARING.value, RunState.RUNNING.value, RunState.CANCELLING.value)


class TrainingRunRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, run_id: uuid.UUID, *, for_update: bool = False) -> TrainingRun | None:
        query = _select_runs().where(training_runs.c.id == run_id)
        if for_update:
            query = query.with_for_update(of=training_runs)
        row = (await self._session.execute(query)).first()
        return _to_run(row) if row else None

    async def get_by_request(self, creator: str, request_id: uuid.UUID) -> TrainingRun | None:
        query = _select_runs().where(
            training_runs.c.creator == creator, training_runs.c.request_id == request_id
        )
        row = (await self._session.execute(query)).first()
        return _to_run(row) if row else None

    async def add(self, run: TrainingRun) -> None:
        await self._session.execute(insert(training_runs).values(id=run.id, **_values(run)))
        await self._add_events(run)

    async def save(self, run: TrainingRun) -> None:
        await self._session.execute(
            update(training_runs).where(training_runs.c.id == run.id).values(**_values(run))
        )
        await self._add_events(run)

    async def _add_events(self, run: TrainingRun) -> None:
        if not run.new_events:
            return
        await self._session.execute(
            insert(training_run_events),
            [
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
            ],
        )

    async def delete(self, run_id: uuid.UUID) -> None:
        await self._session.execute(delete(training_runs).where(training_runs.c.id == run_id))

    async def list(
        self, filter_: RunFilter, *, limit: int, after: Cursor | None
    ) -> Sequence[TrainingRun]:
        query = _select_runs()
        conditions: list[ColumnElement[bool]] = []
        if filter_.states:
            conditions.append(training_runs.c.state.in_([s.value for s in filter_.states]))
        if filter_.base_model_id:
            conditions.append(training_runs.c.base_model_id == filter_.base_model_id)
        if filter_.dataset_uri:
            conditions.append(training_runs.c.dataset_uri == filter_.dataset_uri)
        if filter_.creator:
            conditions.append(training_runs.c.creator == filter_.creator)
        if filter_.created_after:
            conditions.append(training_runs.c.create_time >= filter_.created_after)
        if filter_.created_before:
            conditions.append(training_runs.c.create_time < filter_.created_before)
        key = tuple_(training_runs.c.create_time, training_runs.c.id)
        if after is not None:
            bound = tuple_(after.value, uuid.UUID(after.id))
            conditions.append(key < bound if filter_.newest_first else key > bound)
        if filter_.newest_first:
            order = (training_runs.c.create_time.desc(), training_runs.c.id.desc())
        else:
            order = (training_runs.c.create_time.asc(), training_runs.c.id.asc())
        query = query.where(*conditions).order_by(*order).limit(limit)
        return [_to_run(row) for row in (await self._session.execute(query)).all()]

    async def events(
        self, run_id: uuid.UUID, *, after_sequence: int, limit: int
    ) -> Sequence[RunEvent]:
        query = (
            select(training_run_events)
            .where(
                training_run_events.c.run_id == run_id,
                training_run_events.c.sequence > after_sequence,
            )
            .order_by(training_run_events.c.sequence)
            .limit(limit)
        )
        return [_to_event(row) for row in (await self._session.execute(query)).all()]

    async def silent_runs(self, *, since: datetime, limit: int) -> Sequence[TrainingRun]:
        """Active runs without a heartbeat since `since`, locked; runs another process
        is already handling are skipped."""
        query = (
            _select_runs()
            .where(
                training_runs.c.state.in_(ACTIVE_STATES),
                training_runs.c.heartbeat_time < since,
            )
            .order_by(training_runs.c.heartbeat_time)
            .limit(limit)
            .with_for_update(of=training_runs, skip_locked=True)
        )
        return [_to_run(row) for row in (await self._session.execute(query)).all()]

    async def base_model(self, model_id: uuid.UUID, *, lock: bool = False) -> BaseModel | None:
        """The model a run fine-tunes. `lock` holds it (FOR SHARE) until the transaction
        ends, so that it cannot be deleted while a run that names it is being created."""
        query = select(
            trained_models.c.id,
            trained_models.c.architecture,
            trained_models.c.classes,
            trained_models.c.artifacts,
            trained_models.c.creator,
        ).where(trained_models.c.id == model_id)
        if lock:
            query = query.with_for_update(read=True)
        row = (await self._session.execute(query)).first()
        if row is None:
            return None
        return BaseModel(
            id=row.id,
            architecture=row.architecture,
            classes=row.classes,
            artifacts=row.artifacts,
            creator=row.creator,
        )

    async def mark_processed(self, consumer: str, message_id: str) -> bool:
        """Records that a consumer applied a message; False if it already had."""
        result = await self._session.execute(
            pg_insert(processed_messages)
            .values(consumer=consumer, message_id=message_id)
            .on_conflict_do_nothing()
            .returning(processed_messages.c.message_id)
        )
        return result.first() is not None
