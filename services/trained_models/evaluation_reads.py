"""The few reads of model evaluations that comparison, the publication gate and
downloads need: each one query, whatever the number of models asked about."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.trained_models.comparison import EvaluationRecord, ImageSet, metric_values
from shared.db.schema import model_evaluations, trained_models, training_runs

_e = model_evaluations.c
_r = training_runs.c


class EvaluationReads:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def succeeded(
        self,
        model_ids: Sequence[uuid.UUID],
        *,
        dataset_fingerprint: str = "",
        split: str = "",
    ) -> list[EvaluationRecord]:
        """The succeeded evaluations of these models that recorded what they saw (an
        evaluation's state is its job's)."""
        query = (
            select(
                _e.id,
                _e.trained_model_id,
                _e.dataset_fingerprint,
                _e.split,
                _e.images_fingerprint,
                _e.image_count,
                _e.create_time,
                _e.evaluation,
            )
            .join(training_runs, _r.id == _e.id)
            .where(
                _e.trained_model_id.in_(list(model_ids)),
                _r.state == "SUCCEEDED",
                _e.evaluation.is_not(None),
                _e.dataset_fingerprint.is_not(None),
                _e.images_fingerprint.is_not(None),
            )
        )
        if dataset_fingerprint:
            query = query.where(_e.dataset_fingerprint == dataset_fingerprint)
        if split:
            query = query.where(_e.split == split)
        return [
            EvaluationRecord(
                id=row.id,
                model_id=row.trained_model_id,
                images=ImageSet(row.dataset_fingerprint, row.split, row.images_fingerprint),
                image_count=int(row.image_count or 0),
                create_time=row.create_time,
                values=metric_values(row.evaluation),
            )
            for row in await self._session.execute(query)
        ]

    async def models(self, model_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, tuple[str, str]]:
        """The display name and creator of each of these models that exists."""
        m = trained_models.c
        query = select(m.id, m.display_name, m.creator).where(m.id.in_(list(model_ids)))
        return {
            row.id: (row.display_name, row.creator) for row in await self._session.execute(query)
        }

    async def published_in(self, channel: str) -> uuid.UUID | None:
        """The model a channel serves now, read without a lock."""
        m = trained_models.c
        query = select(m.id).where(m.published.is_(True), m.channel == channel)
        return (await self._session.execute(query)).scalar_one_or_none()

    async def artifacts_of_evaluation(
        self, model_id: uuid.UUID, evaluation_id: uuid.UUID
    ) -> list[dict[str, Any]] | None:
        """None when the model has no such evaluation."""
        query = select(_e.artifacts).where(_e.id == evaluation_id, _e.trained_model_id == model_id)
        found = (await self._session.execute(query)).first()
        return list(found.artifacts or []) if found else None

    async def run(self, run_id: uuid.UUID) -> tuple[str, list[dict[str, Any]]] | None:
        """The creator and artifacts of a training run (or evaluation job); None when
        it does not exist."""
        query = select(_r.creator, _r.artifacts).where(_r.id == run_id)
        found = (await self._session.execute(query)).first()
        return (found.creator, list(found.artifacts or [])) if found else None
