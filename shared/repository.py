"""The base of repositories whose aggregates a unit of work writes: an identity map of
what they loaded or added, and the SQL that writes what changed in it."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sqlalchemy import Table, delete, insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from shared.errors import AlreadyExists, Conflict, NotFound


class Aggregate(Protocol):
    @property
    def id(self) -> uuid.UUID: ...

    @property
    def version(self) -> int: ...


A = TypeVar("A", bound=Aggregate)


class Change(enum.Enum):
    """What a commit did to an aggregate."""

    ADDED = "added"
    CHANGED = "changed"
    REMOVED = "removed"


class _State(enum.Enum):
    NEW = "new"  # to insert
    INSERTED = "inserted"  # inserted by the repository already; announced as added
    LOADED = "loaded"
    REMOVED = "removed"


@dataclass(slots=True)
class _Tracked(Generic[A]):
    aggregate: A
    state: _State
    # The row as loaded (a deep copy): what changed is written, checked against its version.
    loaded: dict[str, Any] | None
    # The columns the last flush wrote of a loaded row, and their values.
    written: dict[str, Any] | None = None


def unique_violation(error: IntegrityError) -> str | None:
    """The name of the unique constraint (or index) `error` violated; None for others."""
    cause = getattr(error.orig, "__cause__", None)
    if getattr(cause, "sqlstate", None) != "23505":
        return None
    return str(getattr(cause, "constraint_name", "") or "")


class TrackingRepository(Generic[A]):
    """Base of a repository whose aggregates the unit of work writes. Subclasses map
    an aggregate to its row (`_row`) and may add what goes with it (`_insert`, ...)."""

    table: Table
    # The aggregate in messages: "training run", "trained model".
    noun: str

    def __init__(self, session: AsyncSession, *, tracking: bool = True) -> None:
        self._session = session
        self._tracking = tracking
        self._tracked: dict[uuid.UUID, _Tracked[A]] = {}
        # What the last flush wrote, and how.
        self._written: list[tuple[_Tracked[A], Change]] = []

    # What subclasses provide.

    async def get(self, aggregate_id: uuid.UUID, *, for_update: bool = False) -> A | None:
        raise NotImplementedError

    def _row(self, aggregate: A) -> dict[str, Any]:
        """Every column of the aggregate's row but `id`."""
        raise NotImplementedError

    def _has_changes(self, aggregate: A, changes: dict[str, Any]) -> bool:
        return bool(changes)

    def _already_exists(self, aggregate: A, constraint: str) -> Exception:
        return AlreadyExists(f"{self.noun} {aggregate.id} already exists")

    def _write_order(self, aggregates: list[A]) -> list[A]:
        return aggregates

    def _committed(self, aggregate: A) -> None:
        """Forgets the aggregate's events once they are stored."""

    async def _insert(self, aggregate: A, row: dict[str, Any]) -> None:
        # Parameters rather than .values(): one statement per table, compiled once.
        await self._session.execute(insert(self.table), {"id": aggregate.id, **row})

    async def _update(self, aggregate: A, changes: dict[str, Any], *, version: int) -> None:
        if changes:
            result = await self._session.execute(
                update(self.table)
                .where(self.table.c.id == aggregate.id, self.table.c.version == version)
                .values(**changes)
            )
            if not result.rowcount:  # type: ignore[attr-defined]
                raise Conflict(f"{self.noun} {aggregate.id} was changed concurrently")

    async def _delete(self, aggregate: A, *, version: int) -> None:
        result = await self._session.execute(
            delete(self.table).where(
                self.table.c.id == aggregate.id, self.table.c.version == version
            )
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            raise Conflict(f"{self.noun} {aggregate.id} was changed concurrently")

    async def require(self, aggregate_id: uuid.UUID, *, for_update: bool = False) -> A:
        """The aggregate of `aggregate_id` (`get`); NotFound when there is none."""
        aggregate = await self.get(aggregate_id, for_update=for_update)
        if aggregate is None:
            raise NotFound(f"{self.noun} {aggregate_id} does not exist")
        return aggregate

    # Tracking.

    def _loaded(self, aggregate: A) -> A:
        """The aggregate of a row just read: the one already tracked for its id, if any
        (one object per row in a unit of work), else this one, tracked from now on."""
        if not self._tracking:
            return aggregate
        tracked = self._tracked.get(aggregate.id)
        if tracked is not None:
            return tracked.aggregate
        self._tracked[aggregate.id] = _Tracked(aggregate, _State.LOADED, self._snapshot(aggregate))
        return aggregate

    def _inserted(self, aggregate: A) -> None:
        """Tracks an aggregate the repository inserted itself: announced, not written again."""
        self._tracked[aggregate.id] = _Tracked(
            aggregate, _State.INSERTED, self._snapshot(aggregate)
        )

    def _removed(self, aggregate: A) -> None:
        tracked = self._tracked.get(aggregate.id)
        if tracked is None or tracked.aggregate is not aggregate:
            raise ValueError(f"{self.noun} {aggregate.id} was not loaded in this unit of work")
        if tracked.state is _State.NEW:
            del self._tracked[aggregate.id]
        else:
            tracked.state = _State.REMOVED

    def add(self, aggregate: A) -> None:
        """Inserted by the next commit, with its events. A duplicate makes the commit
        raise AlreadyExists (or what `_already_exists` says) and leaves this unit of work."""
        if aggregate.id in self._tracked:
            raise ValueError(f"{self.noun} {aggregate.id} is already in this unit of work")
        self._tracked[aggregate.id] = _Tracked(aggregate, _State.NEW, None)

    def _snapshot(self, aggregate: A) -> dict[str, Any]:
        row: dict[str, Any] = _copied(self._row(aggregate))
        return row

    async def flush(self) -> list[tuple[A, Change]]:
        """Writes what changed since the aggregates were loaded; what it wrote, in order."""
        by_id = {id(t.aggregate): t for t in self._tracked.values()}
        self._written = []
        for aggregate in self._write_order([t.aggregate for t in self._tracked.values()]):
            tracked = by_id[id(aggregate)]
            change = await self._write(tracked)
            if change is not None:
                self._written.append((tracked, change))
        return [(tracked.aggregate, change) for tracked, change in self._written]

    async def _write(self, tracked: _Tracked[A]) -> Change | None:
        aggregate = tracked.aggregate
        if tracked.state is _State.NEW:
            try:
                await self._insert(aggregate, self._row(aggregate))
            except IntegrityError as error:
                constraint = unique_violation(error)
                if constraint is None:
                    raise
                # Not written, and never will be: the use case may go on without it.
                del self._tracked[aggregate.id]
                raise self._already_exists(aggregate, constraint) from error
            return Change.ADDED
        assert tracked.loaded is not None
        version = tracked.loaded["version"]
        if tracked.state is _State.REMOVED:
            await self._delete(aggregate, version=version)
            return Change.REMOVED
        changes = {k: v for k, v in self._row(aggregate).items() if tracked.loaded.get(k) != v}
        tracked.written = changes
        if tracked.state is _State.INSERTED:
            await self._update(aggregate, changes, version=version)
            return Change.ADDED
        if not self._has_changes(aggregate, changes):
            return None
        await self._update(aggregate, changes, version=version)
        return Change.CHANGED

    def committed(self) -> None:
        """After the commit: what was written is the new loaded state."""
        for tracked, change in self._written:
            if change is Change.REMOVED:
                del self._tracked[tracked.aggregate.id]
                continue
            self._committed(tracked.aggregate)
            if tracked.state is _State.LOADED and tracked.loaded is not None and tracked.written:
                # The row as loaded, with what was written: no new snapshot of the rest.
                tracked.loaded.update(_copied(tracked.written))
            else:
                tracked.loaded = self._snapshot(tracked.aggregate)
            tracked.state = _State.LOADED
            tracked.written = None
        self._written = []


def _copied(value: Any) -> Any:
    """A copy of a row's values that later changes of the aggregate cannot reach: its
    dicts and lists (JSON columns, arrays) copied, the rest (scalars, UUIDs, times) as
    they are. What copy.deepcopy would give for such values, several times faster."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copied(v) for v in value)
    return value
