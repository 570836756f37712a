"""Every SQL query of TrainedModelService."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, literal, or_, select, true, tuple_, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.trained_models import rows
from services.trained_models.domain import TrainedModel
from shared.db.schema import trained_model_deletions, trained_models, training_runs
from shared.errors import AlreadyExists, Conflict
from shared.metrics import ORDER_BY_PRIMARY
from shared.pagination import Cursor
from shared.repository import TrackingRepository, unique_violation


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFilter:
    published: bool | None = None
    base_model_id: uuid.UUID | None = None
    training_run_id: uuid.UUID | None = None
    dataset_uri: str = ""
    architecture: str = ""
    class_name: str = ""
    creator: str = ""
    created_after: datetime | None = None
    created_before: datetime | None = None
    # "create_time desc" | "create_time" | "coco/bbox_mAP desc"
    order_by: str = "create_time desc"


class TrainedModelRepository(TrackingRepository[TrainedModel]):
    """Models and the queries around them. The models it returns are tracked: the unit
    of work writes what changed in them."""

    table = trained_models
    noun = "trained model"

    def __init__(self, session: AsyncSession, *, tracking: bool = True) -> None:
        super().__init__(session, tracking=tracking)
        # Who deleted the models removed in this unit of work.
        self._deleted_by: dict[uuid.UUID, str] = {}

    def _row(self, aggregate: TrainedModel) -> dict[str, Any]:
        return rows.model_values(aggregate)

    def _already_exists(self, aggregate: TrainedModel, constraint: str) -> Exception:
        if constraint == "uq_trained_models_creator_request_id":
            return AlreadyExists(f"request_id {aggregate.request_id} was used already")
        return super()._already_exists(aggregate, constraint)

    def _write_order(self, aggregates: list[TrainedModel]) -> list[TrainedModel]:
        # Models leaving a channel first: one entering it must not meet them in the
        # unique index of published channels.
        return sorted(aggregates, key=lambda m: m.published)

    def _committed(self, aggregate: TrainedModel) -> None:
        aggregate.new_events.clear()

    async def _update(
        self, aggregate: TrainedModel, changes: dict[str, Any], *, version: int
    ) -> None:
        try:
            await super()._update(aggregate, changes, version=version)
        except IntegrityError as error:
            if unique_violation(error) != "uq_trained_models_published_channel":
                raise
            # The lock on the channel should have kept this out.
            raise Conflict(f"channel {aggregate.channel!r} changed concurrently; retry") from error

    async def _delete(self, aggregate: TrainedModel, *, version: int) -> None:
        await super()._delete(aggregate, version=version)
        await self._session.execute(
            trained_model_deletions.insert().values(
                trained_model_id=aggregate.id,
                training_run_id=aggregate.training_run_id,
                artifacts=aggregate.artifacts,
                actor=self._deleted_by[aggregate.id],
            )
        )

    async def get(self, model_id: uuid.UUID, *, for_update: bool = False) -> TrainedModel | None:
        query = select(trained_models).where(trained_models.c.id == model_id)
        if for_update:
            query = query.with_for_update()
        row = (await self._session.execute(query)).first()
        return self._loaded(rows.to_model(row)) if row else None

    async def get_by_request(self, creator: str, request_id: uuid.UUID) -> TrainedModel | None:
        query = select(trained_models).where(
            trained_models.c.creator == creator, trained_models.c.request_id == request_id
        )
        row = (await self._session.execute(query)).first()
        return self._loaded(rows.to_model(row)) if row else None

    def delete(self, model: TrainedModel, *, actor: str) -> None:
        """Deletes the row with the next commit, and records its files for removal after it."""
        self._removed(model)
        self._deleted_by[model.id] = actor

    async def deletions_with_files(
        self, *, model_id: uuid.UUID | None = None, limit: int = 100
    ) -> Sequence[tuple[uuid.UUID, list[dict[str, Any]]]]:
        """Deleted models whose files were not removed yet, locked for the caller."""
        d = trained_model_deletions.c
        query = select(d.trained_model_id, d.artifacts).where(d.files_removed_time.is_(None))
        if model_id is not None:
            query = query.where(d.trained_model_id == model_id)
        query = query.order_by(d.delete_time).limit(limit).with_for_update(skip_locked=True)
        return [(r.trained_model_id, r.artifacts) for r in await self._session.execute(query)]

    async def files_removed(self, model_id: uuid.UUID) -> None:
        d = trained_model_deletions.c
        await self._session.execute(
            update(trained_model_deletions)
            .where(d.trained_model_id == model_id)
            .values(files_removed_time=func.now())
        )

    async def lock_channel(self, channel: str) -> None:
        """Serialises publications to one channel until the transaction ends."""
        await self._session.execute(
            select(func.pg_advisory_xact_lock(func.hashtextextended("channel:" + channel, 0)))
        )

    async def published_in(self, channel: str) -> TrainedModel | None:
        query = (
            select(trained_models)
            .where(trained_models.c.published.is_(True), trained_models.c.channel == channel)
            .with_for_update()
        )
        row = (await self._session.execute(query)).first()
        return self._loaded(rows.to_model(row)) if row else None

    async def succeeded_run(self, run_id: uuid.UUID) -> dict[str, Any] | None:
        """What the model of a succeeded training run is made of, as its row records it;
        None when the run did not succeed, is an evaluation job, or does not exist (any
        more)."""
        r = training_runs.c
        query = select(
            r.display_name,
            r.labels,
            r.spec,
            r.base_model_id,
            r.dataset,
            r.artifacts,
            r.best_evaluation,
            r.test_evaluation,
            r.facts,
            r.creator,
        ).where(
            # An evaluation job's success makes no model.
            r.id == run_id,
            r.state == "SUCCEEDED",
            r.kind == "training",
        )
        row = (await self._session.execute(query)).first()
        return dict(row._mapping) if row else None

    async def run_state(self, run_id: uuid.UUID) -> str | None:
        """The state of a training run; None when the run does not exist (any more)."""
        query = select(training_runs.c.state).where(training_runs.c.id == run_id)
        return (await self._session.execute(query)).scalar_one_or_none()

    async def a_child(self, model_id: uuid.UUID) -> uuid.UUID | None:
        """A model fine-tuned from this one, if any."""
        query = (
            select(trained_models.c.id)
            .where(trained_models.c.base_model_id == model_id)
            .order_by(trained_models.c.create_time)
            .limit(1)
        )
        return (await self._session.execute(query)).scalar_one_or_none()

    async def an_unfinished_run_of(
        self, model_id: uuid.UUID, *, finished: frozenset[str]
    ) -> tuple[uuid.UUID, str] | None:
        """A run training from this model that has not finished (or succeeded and its model
        is not registered yet: registering it needs the base), with its state."""
        r = training_runs.c
        registered = or_(
            select(literal(1)).where(trained_models.c.training_run_id == r.id).exists(),
            select(literal(1)).where(trained_model_deletions.c.training_run_id == r.id).exists(),
        )
        query = (
            select(r.id, r.state)
            .where(
                r.base_model_id == model_id,
                or_(r.state.not_in(sorted(finished)), and_(r.state == "SUCCEEDED", ~registered)),
            )
            .order_by(training_runs.c.create_time)
            .limit(1)
        )
        row = (await self._session.execute(query)).first()
        return (row.id, row.state) if row else None

    async def add_if_absent(self, model: TrainedModel) -> bool:
        """Inserts unless a model of the same training run exists; True if inserted (and
        then announced by the commit, as an added model is)."""
        result = await self._session.execute(
            pg_insert(trained_models)
            .values(id=model.id, **rows.model_values(model))
            .on_conflict_do_nothing(index_elements=[trained_models.c.training_run_id])
            .returning(trained_models.c.id)
        )
        if result.first() is None:
            return False
        self._inserted(model)
        return True

    async def list(
        self, filter_: ModelFilter, *, limit: int, after: Cursor | None
    ) -> Sequence[TrainedModel]:
        t = trained_models.c
        conditions: list[ColumnElement[bool]] = []
        if filter_.published is not None:
            conditions.append(t.published.is_(filter_.published))
        if filter_.base_model_id:
            conditions.append(t.base_model_id == filter_.base_model_id)
        if filter_.training_run_id:
            conditions.append(t.training_run_id == filter_.training_run_id)
        if filter_.dataset_uri:
            conditions.append(t.dataset_uri == filter_.dataset_uri)
        if filter_.architecture:
            conditions.append(t.architecture == filter_.architecture)
        if filter_.class_name:
            conditions.append(t.classes.contains(literal([filter_.class_name], JSONB)))
        if filter_.creator:
            conditions.append(t.creator == filter_.creator)
        if filter_.created_after:
            conditions.append(t.create_time >= filter_.created_after)
        if filter_.created_before:
            conditions.append(t.create_time < filter_.created_before)

        if filter_.order_by == ORDER_BY_PRIMARY:
            # Models without a mAP sort last, as -1.
            sort = func.coalesce(t.bbox_map, -1.0)
            key, descending = tuple_(sort, t.id), True
            order = (sort.desc(), t.id.desc())
        else:
            descending = filter_.order_by != "create_time"
            key = tuple_(t.create_time, t.id)
            order = (
                (t.create_time.desc(), t.id.desc())
                if descending
                else (t.create_time.asc(), t.id.asc())
            )
        if after is not None:
            bound = tuple_(literal(after.value), literal(uuid.UUID(after.id)))
            conditions.append(key < bound if descending else key > bound)
        query = (
            select(trained_models).where(and_(true(), *conditions)).order_by(*order).limit(limit)
        )
        return [
            self._loaded(rows.to_model(row)) for row in (await self._session.execute(query)).all()
        ]
