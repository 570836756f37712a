"""GetTrainingRun and ListTrainingRuns, answered from each run's stored message.

Every change of a run stores the TrainingRun message reads return (training_runs.proto,
`messages.stored_message`) in the transaction of the change. A read is then one query on
the driver's connection, which returns the stored bytes with the little that other rows
say (the registry's model of the run, the evaluation of an evaluation job) and, for a
queued run, its place in the queue: nothing is rebuilt from JSON columns per call.

A row whose stored message is missing (written before migration 0010, or by SQL of its
own) or stale (its version or update time is not the message's: a writer that does not
store the message changed the row) is read as before, from its columns, and its message
stored then for the reads after it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.ext.asyncio import AsyncEngine

from services.training_runs.domain import RunState
from services.training_runs.messages import run_to_proto, stored_message, with_joined_fields
from services.training_runs.repository import RunFilter
from services.training_runs.unit_of_work import UnitOfWork
from shared.errors import NotFound
from shared.pagination import Cursor
from shared.proto.raven.training.v1 import training_run_pb2 as pb

_SELECT = """
SELECT r.id, r.creator, r.create_time, r.update_time, r.version, r.proto,
       tm.id AS trained_model_id, me.trained_model_id AS evaluated_model_id{extra}
FROM training_runs AS r
LEFT JOIN trained_models AS tm ON tm.training_run_id = r.id
LEFT JOIN model_evaluations AS me ON me.id = r.id
"""
# 1 + the QUEUED runs created before a QUEUED run (on ix_training_runs_state_create_time_id);
# 0 for a run in any other state (docs/operations.md, "Queue position").
_PLACE = f"""
CASE WHEN r.state = '{RunState.QUEUED.value}' THEN 1 + (
    SELECT count(*) FROM training_runs AS q
    WHERE q.state = '{RunState.QUEUED.value}' AND (q.create_time, q.id) < (r.create_time, r.id)
) ELSE 0 END AS place"""
_GET = _SELECT.format(extra=",\n       " + _PLACE.strip()) + "WHERE r.id = $1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Stores a rebuilt message, unless the row changed since it was read.
_STORE = "UPDATE training_runs SET proto = $1 WHERE id = $2 AND version = $3 AND update_time = $4"


@dataclass(frozen=True, slots=True)
class RunRead:
    """A run as a read returns it, with what the caller's visibility and the page need."""

    message: pb.TrainingRun
    id: uuid.UUID
    creator: str
    create_time: datetime
    # Its place in the job queue when QUEUED (Get only; 0 otherwise).
    place: int = 0


class RunReads:
    def __init__(self, engine: AsyncEngine, uow_factory: Callable[[], UnitOfWork]) -> None:
        self._engine = engine
        self._uow = uow_factory

    async def get(self, run_id: uuid.UUID) -> RunRead:
        """The run of `run_id`; NotFound when there is none."""
        # None read also when the run was deleted before its message could be rebuilt.
        reads = await self._reads(await self._fetch(_GET, run_id))
        if not reads:
            raise NotFound(f"training run {run_id} does not exist")
        return reads[0]

    async def page(
        self, filter_: RunFilter, *, limit: int, after: Cursor | None
    ) -> Sequence[RunRead]:
        """Up to `limit` runs that `filter_` selects, in its order of (create_time, id),
        after the keyset `after`."""
        arguments: list[Any] = []
        conditions: list[str] = []

        def condition(sql: str, *values: Any) -> None:
            for value in values:
                arguments.append(value)
                sql = sql.replace("?", f"${len(arguments)}", 1)
            conditions.append(sql)

        if filter_.kinds:
            condition("r.kind = ANY(?::text[])", [k.value for k in filter_.kinds])
        if filter_.states:
            condition("r.state = ANY(?::text[])", [s.value for s in filter_.states])
        if filter_.base_model_id:
            condition("r.base_model_id = ?", filter_.base_model_id)
        if filter_.dataset_uri:
            condition("r.dataset_uri = ?", filter_.dataset_uri)
        if filter_.creator:
            condition("r.creator = ?", filter_.creator)
        if filter_.created_after:
            condition("r.create_time >= ?", filter_.created_after)
        if filter_.created_before:
            condition("r.create_time < ?", filter_.created_before)
        if after is not None:
            comparison = "<" if filter_.newest_first else ">"
            condition(
                f"(r.create_time, r.id) {comparison} (?, ?)", after.value, uuid.UUID(after.id)
            )
        direction = "DESC" if filter_.newest_first else "ASC"
        arguments.append(limit)
        sql = _list_sql(tuple(conditions), direction, len(arguments))
        return await self._reads(await self._fetch(sql, *arguments))

    async def _fetch(self, sql: str, *arguments: Any) -> list[Any]:
        async with self._engine.connect() as connection:
            raw = await connection.get_raw_connection()
            # asyncpg's own statement cache keeps each query prepared on its connection.
            return list(await raw.driver_connection.fetch(sql, *arguments))  # type: ignore[union-attr]

    async def _reads(self, rows: Sequence[Any]) -> list[RunRead]:
        reads: list[RunRead | None] = [_stored(row) for row in rows]
        missing = [row for row, read in zip(rows, reads, strict=True) if read is None]
        if missing:
            rebuilt = await self._rebuilt(missing)
            reads = [
                read or rebuilt.get(str(row["id"])) for row, read in zip(rows, reads, strict=True)
            ]
        return [read for read in reads if read is not None]

    async def _rebuilt(self, rows: Sequence[Any]) -> dict[str, RunRead]:
        """The runs of `rows` read from their columns, their messages stored; a run deleted
        meanwhile is left out."""
        async with self._uow().reading() as uow:
            runs = await uow.runs.get_many([row["id"] for row in rows])
        if runs:
            async with self._engine.connect() as connection:
                raw = await connection.get_raw_connection()
                await raw.driver_connection.executemany(  # type: ignore[union-attr]
                    _STORE,
                    [(stored_message(r), r.id, r.version, r.update_time) for r in runs],
                )
        places = {str(row["id"]): row.get("place", 0) for row in rows}
        return {
            str(r.id): RunRead(run_to_proto(r), r.id, r.creator, r.create_time, places[str(r.id)])
            for r in runs
        }


def _stored(row: Any) -> RunRead | None:
    """The read of a row from its stored message; None when it has none that is current."""
    if row["proto"] is None:
        return None
    message = pb.TrainingRun.FromString(row["proto"])
    if message.etag != f'"{row["version"]}"' or not _same_time(message.update_time, row):
        return None
    with_joined_fields(
        message,
        run_id=row["id"],
        trained_model_id=row["trained_model_id"],
        evaluated_model_id=row["evaluated_model_id"],
    )
    return RunRead(message, row["id"], row["creator"], row["create_time"], row.get("place", 0))


def _same_time(stamp: Timestamp, row: Any) -> bool:
    """Whether the stored update time is the row's (in integers: Timestamp.FromDatetime
    costs more than the rest of a read)."""
    since = row["update_time"] - _EPOCH
    return bool(
        stamp.seconds == since.days * 86_400 + since.seconds
        and stamp.nanos == since.microseconds * 1_000
    )


@functools.lru_cache(maxsize=256)
def _list_sql(conditions: tuple[str, ...], direction: str, limit_at: int) -> str:
    where = f"WHERE {' AND '.join(conditions)}\n" if conditions else ""
    return (
        _SELECT.format(extra="")
        + where
        + f"ORDER BY r.create_time {direction}, r.id {direction}\nLIMIT ${limit_at}"
    )
