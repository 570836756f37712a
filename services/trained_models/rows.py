"""The row of a trained model, as a domain object and back: the one place that knows
both the columns and the aggregate's fields. Every field is the column of its name but
those mapped here."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row

from services.trained_models.domain import Origin, TrainedModel
from shared.fields import field_values, from_attributes

# Fields without a column: what changed since the model was loaded.
_UNSTORED = ("new_events",)


def to_model(row: Row[Any]) -> TrainedModel:
    return from_attributes(TrainedModel, row, skip=_UNSTORED, origin=Origin(row.origin))


def model_values(model: TrainedModel) -> dict[str, Any]:
    return field_values(
        model,
        skip=(*_UNSTORED, "id"),
        origin=model.origin.value,
        # A column of its own: models are ordered by it, and the lineage reads it.
        bbox_map=model.bbox_map,
    )
