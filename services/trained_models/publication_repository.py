"""SQL of the publication history."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import ColumnElement, and_, insert, select, true
from sqlalchemy.ext.asyncio import AsyncSession

from services.trained_models.domain import PublicationAction, PublicationEvent
from shared.db.schema import trained_model_publications, trained_models
from shared.fields import field_values, from_attributes

_t = trained_model_publications.c


class PublicationRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def add(self, event: PublicationEvent) -> int:
        result = await self._session.execute(
            insert(trained_model_publications)
            .values(field_values(event, skip=("id",), action=event.action.value))
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
            from_attributes(PublicationEvent, row, action=PublicationAction(row.action))
            for row in (await self._session.execute(query)).all()
        ]
