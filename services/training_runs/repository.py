"""Every SQL query of TrainingRunService."""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    TextClause,
    insert,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError

from services.training_runs import rows
from services.training_runs.domain import RunEvent, RunKind, RunState, TrainingRun
from services.training_runs.messages import stored_message
from shared.db.schema import (
    model_evaluations,
    processed_messages,
    trained_models,
    training_run_events,
    training_runs,
)
from shared.errors import AlreadyExists, Conflict
from shared.fields import from_attributes
from shared.pagination import Cursor
from shared.repository import Change, TrackingRepository, unique_violation


@dataclass(frozen=True, slots=True, kw_only=True)
class RunFilter:
    states: tuple[RunState, ...] = ()
    base_model_id: uuid.UUID | None = None
    dataset_uri: str = ""
    creator: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    newest_first: bool = True
    # Empty: every kind.
    kinds: tuple[RunKind, ...] = (RunKind.TRAINING,)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationFilter:
    """Which model evaluations to list (newest first)."""

    trained_model_id: uuid.UUID | None = None
    dataset_fingerprint: str = ""
    split: str = ""
    states: tuple[RunState, ...] = ()
    # Only the evaluations of this creator's models: a caller that may read only its own.
    model_creator: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseModel:
    """What a run needs to know of the model it fine-tunes, or an evaluation of the
    model it evaluates."""

    id: uuid.UUID
    architecture: str
    classes: list[str]
    artifacts: list[dict[str, Any]]
    creator: str = ""
    display_name: str = ""
    training_run_id: uuid.UUID | None = None


def _select_runs() -> Any:
    """Runs with the model each produced and, for an evaluation job, its evaluation's
    columns (rows.EVALUATION_PREFIX): one query, whatever the kind."""
    evaluation = (
        c.label(rows.EVALUATION_PREFIX + c.name) for c in model_evaluations.c if c.name != "id"
    )
    # The stored message is read by services.training_runs.reads, never into the domain.
    columns = (c for c in training_runs.c if c.name != "proto")
    return (
        select(*columns, trained_models.c.id.label("trained_model_id"), *evaluation)
        .outerjoin(trained_models, trained_models.c.training_run_id == training_runs.c.id)
        .outerjoin(model_evaluations, model_evaluations.c.id == training_runs.c.id)
    )


def _split_row(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A row of `_row` as the training_runs columns and the model_evaluations ones."""
    prefix = rows.EVALUATION_PREFIX
    run = {k: v for k, v in row.items() if not k.startswith(prefix)}
    evaluation = {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}
    return run, evaluation


@functools.cache
def _bulk_update(columns: tuple[str, ...]) -> TextClause:
    """UPDATE of many runs' `columns` from one JSON parameter `rows` (a list of objects with
    id, loaded_version and the new values), checking each run's version; returns the ids
    it updated. One statement text per set of columns, prepared once, whatever the count."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    types = ", ".join(
        f"{name} {training_runs.c[name].type.compile(dialect=dialect)}" for name in columns
    )
    assignments = ", ".join(f"{name} = changed.{name}" for name in columns)
    return text(
        f"UPDATE training_runs SET {assignments} "
        "FROM jsonb_to_recordset(CAST(:rows AS jsonb)) "
        f"AS changed(id uuid, loaded_version integer, {types}) "
        "WHERE training_runs.id = changed.id "
        "AND training_runs.version = changed.loaded_version "
        "RETURNING training_runs.id"
    )


def _json_value(value: Any) -> str:
    """The JSON of a column value json.dumps does not know: times and UUIDs as Postgres
    reads them back."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes):
        return "\\x" + value.hex()  # bytea's hex input
    raise TypeError(f"no JSON for {type(value).__name__}")


# Columns the stored message does not show: a change of these alone leaves it as it is.
_NOT_IN_MESSAGE = frozenset({"heartbeat_time", "worker_id"})

# The states of the partial index ix_training_runs_active_heartbeat.
ACTIVE_STATES = tuple(s.value for s in RunState if s.is_active)


class TrainingRunRepository(TrackingRepository[TrainingRun]):
    """Runs, their history and the queries around them. The runs it returns are tracked:
    the unit of work writes what changed in them, and their new history entries."""

    table = training_runs
    noun = "training run"

    def _row(self, aggregate: TrainingRun) -> dict[str, Any]:
        return {**rows.run_values(aggregate), **rows.evaluation_values(aggregate.evaluation)}

    def _has_changes(self, aggregate: TrainingRun, changes: dict[str, Any]) -> bool:
        return bool(changes or aggregate.new_events)

    def _already_exists(self, aggregate: TrainingRun, constraint: str) -> Exception:
        if constraint == "uq_training_runs_creator_request_id":
            return AlreadyExists(f"request_id {aggregate.request_id} was used already")
        return super()._already_exists(aggregate, constraint)

    def _committed(self, aggregate: TrainingRun) -> None:
        aggregate.new_events.clear()

    async def _insert(self, aggregate: TrainingRun, row: dict[str, Any]) -> None:
        run, evaluation = _split_row(row)
        await super()._insert(aggregate, {**run, "proto": stored_message(aggregate)})
        if evaluation:
            await self._session.execute(
                insert(model_evaluations).values(id=aggregate.id, **evaluation)
            )
        await self._add_events(aggregate)

    async def flush(self) -> list[tuple[TrainingRun, Change]]:
        """As every repository's, but the runs' changes and history entries of the whole
        unit of work go in as few statements as their shapes allow: a batch of many runs'
        progress is one UPDATE and one INSERT, not two per run."""
        self._changed_runs: list[tuple[TrainingRun, dict[str, Any], int]] = []
        self._new_events: list[dict[str, Any]] = []
        written = await super().flush()
        await self._write_changed_runs()
        await self._write_new_events()
        return written

    async def _update(
        self, aggregate: TrainingRun, changes: dict[str, Any], *, version: int
    ) -> None:
        run, evaluation = _split_row(changes)
        if run.keys() - _NOT_IN_MESSAGE:
            run["proto"] = stored_message(aggregate)
        if run:
            self._changed_runs.append((aggregate, run, version))
        if evaluation:
            # In the transaction of the job's change (its version checked above).
            await self._session.execute(
                update(model_evaluations)
                .where(model_evaluations.c.id == aggregate.id)
                .values(**evaluation)
            )
        await self._add_events(aggregate)

    async def get(self, run_id: uuid.UUID, *, for_update: bool = False) -> TrainingRun | None:
        query = _select_runs().where(training_runs.c.id == run_id)
        if for_update:
            query = query.with_for_update(of=training_runs)
        row = (await self._session.execute(query)).first()
        return self._loaded(rows.to_run(row)) if row else None

    async def get_many(
        self, run_ids: Collection[uuid.UUID], *, for_update: bool = False
    ) -> Sequence[TrainingRun]:
        """The runs of these ids that exist, in one query; locked in id order, so that two
        such locks of overlapping runs cannot deadlock."""
        query = _select_runs().where(training_runs.c.id.in_(run_ids)).order_by(training_runs.c.id)
        if for_update:
            query = query.with_for_update(of=training_runs)
        return [
            self._loaded(rows.to_run(row)) for row in (await self._session.execute(query)).all()
        ]

    async def get_by_request(self, creator: str, request_id: uuid.UUID) -> TrainingRun | None:
        query = _select_runs().where(
            training_runs.c.creator == creator, training_runs.c.request_id == request_id
        )
        row = (await self._session.execute(query)).first()
        return self._loaded(rows.to_run(row)) if row else None

    def delete(self, run: TrainingRun) -> None:
        """Deleted by the next commit (its history with it: ON DELETE CASCADE)."""
        self._removed(run)

    async def record_heartbeat(self, run_id: uuid.UUID, *, attempt: int, time: datetime) -> bool:
        """Sets the heartbeat time of an active run of this attempt, reading and writing
        no other column (TrainingRun.heartbeat's rule: active runs only). False when no
        such run: unknown, another attempt's, or not active. For a run not loaded in
        this unit of work."""
        c = training_runs.c
        result = await self._session.execute(
            update(training_runs)
            .where(c.id == run_id, c.attempt == attempt, c.state.in_(ACTIVE_STATES))
            .values(heartbeat_time=time)
            .returning(c.id)
        )
        return result.first() is not None

    async def _add_events(self, run: TrainingRun) -> None:
        """Written at the end of the flush, with the other runs' (_write_new_events)."""
        self._new_events.extend(rows.event_rows(run))

    async def _write_changed_runs(self) -> None:
        """Each run's UPDATE checks the version it was loaded at; runs that changed the same
        columns are updated by one statement (_bulk_update)."""
        by_columns: dict[tuple[str, ...], list[tuple[TrainingRun, dict[str, Any], int]]] = {}
        for changed in self._changed_runs:
            by_columns.setdefault(tuple(changed[1]), []).append(changed)
        for columns, group in by_columns.items():
            if len(group) == 1:
                run, changes, version = group[0]
                await TrackingRepository._update(self, run, changes, version=version)
                continue
            result = await self._session.execute(
                _bulk_update(columns),
                {
                    "rows": json.dumps(
                        [
                            {"id": run.id, "loaded_version": version, **changes}
                            for run, changes, version in group
                        ],
                        default=_json_value,
                    )
                },
            )
            updated = set(result.scalars())
            for run, _, _ in group:
                if run.id not in updated:
                    raise Conflict(f"training run {run.id} was changed concurrently")

    async def _write_new_events(self) -> None:
        if not self._new_events:
            return
        try:
            await self._session.execute(insert(training_run_events), self._new_events)
        except IntegrityError as error:
            if unique_violation(error) is None:
                raise
            # Another writer appended the same sequence numbers first.
            runs = sorted({str(row["run_id"]) for row in self._new_events})
            raise Conflict(f"training run {', '.join(runs)} was changed concurrently") from error

    async def list_evaluations(
        self, filter_: EvaluationFilter, *, limit: int, after: Cursor | None
    ) -> Sequence[TrainingRun]:
        """The jobs of the model evaluations `filter_` selects, newest evaluation first."""
        e = model_evaluations.c
        conditions: list[ColumnElement[bool]] = [training_runs.c.kind == RunKind.EVALUATION.value]
        if filter_.trained_model_id is not None:
            conditions.append(e.trained_model_id == filter_.trained_model_id)
        if filter_.dataset_fingerprint:
            conditions.append(e.dataset_fingerprint == filter_.dataset_fingerprint)
        if filter_.split:
            conditions.append(e.split == filter_.split)
        if filter_.states:
            conditions.append(training_runs.c.state.in_([s.value for s in filter_.states]))
        if filter_.model_creator is not None:
            owned = select(trained_models.c.id).where(
                trained_models.c.creator == filter_.model_creator
            )
            conditions.append(e.trained_model_id.in_(owned))
        if after is not None:
            bound = tuple_(after.value, uuid.UUID(after.id))
            conditions.append(tuple_(e.create_time, e.id) < bound)
        query = (
            _select_runs()
            .where(*conditions)
            .order_by(e.create_time.desc(), e.id.desc())
            .limit(limit)
        )
        return [
            self._loaded(rows.to_run(row)) for row in (await self._session.execute(query)).all()
        ]

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
        return [rows.to_event(row) for row in (await self._session.execute(query)).all()]

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
        return [
            self._loaded(rows.to_run(row)) for row in (await self._session.execute(query)).all()
        ]

    async def base_model(self, model_id: uuid.UUID, *, lock: bool = False) -> BaseModel | None:
        """The model a run fine-tunes. `lock` holds it (FOR SHARE) until the transaction
        ends, so that it cannot be deleted while a run that names it is being created."""
        query = select(*(trained_models.c[f.name] for f in fields(BaseModel))).where(
            trained_models.c.id == model_id
        )
        if lock:
            query = query.with_for_update(read=True)
        row = (await self._session.execute(query)).first()
        if row is None:
            return None
        return from_attributes(BaseModel, row)

    async def mark_processed(self, consumer: str, message_id: str) -> bool:
        """Records that a consumer applied a message; False if it already had."""
        result = await self._session.execute(
            pg_insert(processed_messages)
            .values(consumer=consumer, message_id=message_id)
            .on_conflict_do_nothing()
            .returning(processed_messages.c.message_id)
        )
        return result.first() is not None
