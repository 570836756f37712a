"""SQL of a model's lineage: its ancestors and descendants, read in one statement."""

from __future__ import annotations

import uuid

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from services.trained_models.domain import Lineage, LineageNode
from shared.fields import from_attributes

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


class LineageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    async def get(self, model_id: uuid.UUID, *, max_depth: int) -> Lineage:
        rows = (
            await self._session.execute(_LINEAGE, {"id": model_id, "max_depth": max_depth})
        ).all()
        ancestors: list[LineageNode] = []
        descendants: list[LineageNode] = []
        for row in rows:
            node = from_attributes(LineageNode, row)
            (ancestors if row.side == "ancestor" else descendants).append(node)
        return Lineage(ancestors=ancestors, descendants=descendants)
