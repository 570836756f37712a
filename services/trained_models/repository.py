"""Every SQL query of TrainedModelService."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    and_,
    delete,
    func,
    literal,
    or_,
    select,
    text,
    true,
    tuple_,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

from services.trained_models.domain import Lineage, LineageNode, Origin, TrainedModel
from shared.db.schema import trained_model_deletions, trained_models, training_runs
from shared.pagination import Cursor


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


def _to_model(row: Row[Any]) -> TrainedModel:
    m = row._mapping
    return TrainedModel(
        id=m["id"],
        display_name=m["display_name"],
        description=m["description"],
        labels=m["labels"],
        training_run_id=m["training_run_id"],
        base_model_id=m["base_model_id"],
        dataset_uri=m["dataset_uri"],
        dataset_fingerprint=m["dataset_fingerprint"],
        architecture=m["architecture"],
        classes=m["classes"],
        artifacts=m["artifacts"],
        evaluation=m["evaluation"],
        val_evaluation=m["val_evaluation"],
        facts=m["facts"],
        published=m["published"],
        channel=m["channel"],
        publish_time=m["publish_time"],
        published_by=m["published_by"],
        creator=m["creator"],
        origin=Origin(m["origin"]),
        request_id=m["request_id"],
        version=m["version"],
        create_time=m["create_time"],
        update_time=m["update_time"],
    )


def _values(model: TrainedModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "display_name": model.display_name,
        "description": model.description,
        "labels": model.labels,
        "training_run_id": model.training_run_id,
        "base_model_id": model.base_model_id,
        "dataset_uri": model.dataset_uri,
        "dataset_fingerprint": model.dataset_fingerprint,
        "architecture": model.architecture,
        "classes": model.classes,
        "artifacts": model.artifacts,
        "evaluation": model.evaluation,
        "val_evaluation": model.val_evaluation,
        "facts": model.facts,
        "bbox_map": model.bbox_map,
        "published": model.published,
        "channel": model.channel,
        "publish_time": model.publish_time,
        "published_by": model.published_by,
        "creator": model.creator,
        "origin": model.origin.value,
        "request_id": model.request_id,
        "version": model.version,
        "create_time": model.create_time,
        "update_time": model.update_time,
    }


# Both directions of the lineage in one recursive statement.
_LINEAGE = text(
    """
    WITH RECURSIVE
    ancestors AS (
        SELECT id, display_name, base_model_id, training_run_id, dataset_fingerprint,
               bbox_map, creator, 0 AS depth, ARRAY[id] AS path
        FROM trained_models WHERE id = :id
        UNION ALL
        SELECT m.id, m.display_name, m.base_model_id, m.training_run_id, m.dataset_fingerprint,
               m.bbox_map, m.creator, a.depth + 1, a.path || m.id
        FROM trained_models m JOIN ancestors a ON m.id = a.base_model_id
        WHERE NOT m.id = ANY(a.path)
    ),
    descendants AS (
        SELECT id, display_name, base_model_id, training_run_id, dataset_fingerprint,
               bbox_map, creator, 1 AS depth, create_time
        FROM trained_models WHERE base_model_id = :id
        UNION ALL
        SELECT m.id, m.display_name, m.base_model_id, m.training_run_id, m.dataset_fingerprint,
               m.bbox_map, m.creator, d.depth + 1, m.create_time
        FROM trained_models m JOIN descendants d ON m.base_model_id = d.id
        WHERE d.depth < :max_depth
    )
    SELECT 'ancestor' AS side, id, display_name, base_model_id, training_run_id,
           dataset_fingerprint, bbox_map, creator, depth, NULL::timestamptz AS create_time
    FROM ancestors
    UNION ALL
    SELECT 'descendant', id, display_name, base_model_id, training_run_id,
           dataset_fingerprint, bbox_map, creator, depth, create_time
    FROM descendants
    ORDER BY side, depth, create_time
    """
)


class TrainedModelRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, model_id: uuid.UUID, *, for_update: bool = False) -> TrainedModel | None:
        query = select(trained_models).where(trained_models.c.id == model_id)
        if for_update:
            query = query.with_for_update()
        row = (await self._session.execute(query)).first()
        return _to_model(row) if row else None

    async def get_by_request(self, creator: str, request_id: uuid.UUID) -> TrainedModel | None:
        query = select(trained_models).where(
            trained_models.c.creator == creator, trained_models.c.request_id == request_id
        )
        row = (await self._session.execute(query)).first()
        return _to_model(row) if row else None

    async def add(self, model: TrainedModel) -> None:
        await self._session.execute(trained_models.insert().values(**_values(model)))

    async def save(self, model: TrainedModel, *, expected_version: int) -> bool:
        """Writes the model unless someone else changed it since `expected_version`."""
        values = _values(model)
        del values["id"], values["create_time"]
        result = await self._session.execute(
            update(trained_models)
            .where(trained_models.c.id == model.id, trained_models.c.version == expected_version)
            .values(**values)
        )
        return bool(result.rowcount)  # type: ignore[attr-defined]

    async def delete(self, model: TrainedModel, *, actor: str) -> None:
        """Deletes the row and records its files for removal after the commit."""
        await self._session.execute(delete(trained_models).where(trained_models.c.id == model.id))
        await self._session.execute(
            trained_model_deletions.insert().values(
                trained_model_id=model.id,
                training_run_id=model.training_run_id,
                artifacts=model.artifacts,
                actor=actor,
            )
        )

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
        return _to_model(row) if row else None

    async def succeeded_run(self, run_id: uuid.UUID) -> dict[str, Any] | None:
        """What the model of a succeeded run is made of, as its row records it; None when
        the run did not succeed or does not exist (any more)."""
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
        ).where(r.id == run_id, r.state == "SUCCEEDED")
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
        """Inserts unless a model of the same training run exists; True if inserted."""
        result = await self._session.execute(
            pg_insert(trained_models)
            .values(**_values(model))
            .on_conflict_do_nothing(index_elements=[trained_models.c.training_run_id])
            .returning(trained_models.c.id)
        )
        return result.first() is not None

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

        if filter_.order_by == "coco/bbox_mAP desc":
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
        return [_to_model(row) for row in (await self._session.execute(query)).all()]

    async def lineage(self, model_id: uuid.UUID, *, max_depth: int) -> Lineage:
        rows = (
            await self._session.execute(_LINEAGE, {"id": model_id, "max_depth": max_depth})
        ).all()
        ancestors: list[LineageNode] = []
        descendants: list[LineageNode] = []
        for row in rows:
            node = LineageNode(
                id=row.id,
                display_name=row.display_name,
                base_model_id=row.base_model_id,
                training_run_id=row.training_run_id,
                dataset_fingerprint=row.dataset_fingerprint,
                bbox_map=row.bbox_map,
                depth=row.depth,
                creator=row.creator,
            )
            (ancestors if row.side == "ancestor" else descendants).append(node)
        return Lineage(ancestors=ancestors, descendants=descendants)
