"""The TrainedModel aggregate. Pure Python."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

HEADLINE_METRIC = "coco/bbox_mAP"


@dataclass(slots=True, kw_only=True)
class TrainedModel:
    id: uuid.UUID
    display_name: str
    architecture: str
    # Ordered: index i is label i.
    classes: list[str]
    artifacts: list[dict[str, Any]]
    creator: str
    create_time: datetime
    update_time: datetime
    description: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    training_run_id: uuid.UUID | None = None
    base_model_id: uuid.UUID | None = None
    dataset_uri: str = ""
    dataset_fingerprint: str = ""
    evaluation: dict[str, Any] | None = None
    facts: dict[str, Any] | None = None
    published: bool = False
    channel: str | None = None
    publish_time: datetime | None = None
    published_by: str | None = None
    version: int = 1

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def bbox_map(self) -> float | None:
        """The headline metric; None when the model has none yet (never 0 in its place)."""
        value = (self.evaluation or {}).get("metrics", {}).get(HEADLINE_METRIC)
        return float(value) if value is not None else None


@dataclass(frozen=True, slots=True, kw_only=True)
class LineageNode:
    id: uuid.UUID
    display_name: str
    base_model_id: uuid.UUID | None
    training_run_id: uuid.UUID | None
    dataset_fingerprint: str
    bbox_map: float | None
    depth: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Lineage:
    # From the model itself (depth 0) up to its root.
    ancestors: list[LineageNode]
    # Breadth first, depth 1 = direct children.
    descendants: list[LineageNode]
