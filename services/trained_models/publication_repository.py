"""SQL of the publication history."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import ColumnElement, and_, insert, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from services.trained_models.domain import PublicationAction, PublicationEvent
from shared.db.schema import trained_model_publications, trained_models

_t = trained_model_publications.c


class PublicationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, event: PublicationEvent) -> int:
        result = await self._session.execute(
            insert(trained_model_publications)
            .values(
                trained_model_id=event.trained_model_id,
                action=event.action.value,
                channel=event.channel,
                actor=event.actor,
                reason=event.reason,
                time=event.time,
                replaced_model_id=event.replaced_model_id,
                bbox_map=event.bbox_map,
            )
            .returning(_t.id)
        )
        return int(result.scalar_one())

    async def list(
        self,
        *,
        model_id: uuid.UUID | None,
        channel: str,
        limit: int,
        before_id: int | None,
        creator: str | None = None,
    ) -> Sequence[PublicationEvent]:
        """Newest first; `creator`: events of that identity's (existing) models only."""
        conditions: list[ColumnElement[bool]] = []
        if creator is not None:
            conditions.append(
                _t.trained_model_id.in_(
                    select(trained_models.c.id).where(trained_models.c.creator == creator)
                )
            )
        if model_id is not None:
            conditions.append(_t.trained_model_id == model_id)
        if channel:
            conditions.append(_t.channel == channel)
        if before_id is not None:
            conditions.append(_t.id < before_id)
        query = (
            select(trained_model_publications)
            .where(and_(true(), *conditions))
            .order_by(_t.id.desc())
            .limit(limit)
        )
        return [
            PublicationEvent(
                id=row.id,
                trained_model_id=row.trained_model_id,
                action=PublicationAction(row.action),
                channel=row.channel,
                actor=row.actor,
                reason=row.reason,
                time=row.time,
                replaced_model_id=row.replaced_model_id,
                bbox_map=row.bbox_map,
            )
            for row in (await self._session.execute(query)).all()
        ]
