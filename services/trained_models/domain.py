"""The TrainedModel aggregate. Pure Python."""

from __future__ import annotations

import enum
import itertools
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from shared.errors import FailedPrecondition
from shared.metrics import PRIMARY_METRIC as HEADLINE_METRIC


class Origin(enum.StrEnum):
    RUN = "run"
    IMPORT = "import"


class ModelEvent(enum.StrEnum):
    """A change of a model, announced as `trained_model.<value>` once committed."""

    UPDATED = "updated"
    PUBLISHED = "published"
    UNPUBLISHED = "unpublished"


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
    # What the model is judged by: the test split's evaluation when its run had one, else
    # the best epoch's validation.
    evaluation: dict[str, Any] | None = None
    # The best epoch's validation, which chose the checkpoint.
    val_evaluation: dict[str, Any] | None = None
    facts: dict[str, Any] | None = None
    published: bool = False
    channel: str | None = None
    publish_time: datetime | None = None
    published_by: str | None = None
    origin: Origin = Origin.RUN
    request_id: uuid.UUID | None = None
    version: int = 1
    # Changes since the model was loaded; the unit of work announces them.
    new_events: list[ModelEvent] = field(default_factory=list)

    @property
    def etag(self) -> str:
        return f'"{self.version}"'

    @property
    def bbox_map(self) -> float | None:
        """The headline metric; None when the model has none yet (never 0 in its place)."""
        value = (self.evaluation or {}).get("metrics", {}).get(HEADLINE_METRIC)
        return float(value) if value is not None else None

    def artifact(self, kind: str) -> dict[str, Any] | None:
        return next((a for a in self.artifacts if a.get("kind") == kind), None)

    def edit(
        self,
        *,
        now: datetime,
        display_name: str | None = None,
        description: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> None:
        if display_name is not None:
            self.display_name = display_name
        if description is not None:
            self.description = description
        if labels is not None:
            self.labels = dict(labels)
        self._changed(now, ModelEvent.UPDATED)

    def publish(self, *, channel: str, actor: str, now: datetime) -> bool:
        """Puts the model in `channel`; False when it already is there (nothing changes)."""
        if self.published:
            if self.channel == channel:
                return False
            raise FailedPrecondition(
                f"trained model {self.id} is published in channel {self.channel!r}; "
                f"unpublish it before publishing it to {channel!r}"
            )
        self._place(channel, actor=actor, now=now)
        return True

    def unpublish(self, *, now: datetime) -> str:
        """Takes the model out of its channel; returns the channel."""
        if not self.published or self.channel is None:
            raise FailedPrecondition(f"trained model {self.id} is not published")
        channel = self.channel
        self._place(None, actor=None, now=now)
        return channel

    def _place(self, channel: str | None, *, actor: str | None, now: datetime) -> None:
        """Puts the model in `channel` (by `actor`, at `now`), or out of any with None."""
        self.published = channel is not None
        self.channel = channel
        self.publish_time = now if channel is not None else None
        self.published_by = actor
        self._changed(now, ModelEvent.PUBLISHED if self.published else ModelEvent.UNPUBLISHED)

    def ensure_publishable(
        self, *, evaluation_split: str, evaluation_epoch: int | None, min_bbox_map: float | None
    ) -> None:
        """The gate on the model's evaluation: the split and the epoch a publication relies
        on (when it names them), and the least headline metric it requires."""
        evaluation = self.evaluation or {}
        if evaluation_split and evaluation.get("split", "") != evaluation_split:
            raise FailedPrecondition(
                f"the request relies on a {evaluation_split} evaluation; trained model "
                f"{self.id} has {evaluation.get('split') or 'no'} evaluation"
            )
        if evaluation_epoch is not None and evaluation.get("epoch", 0) != evaluation_epoch:
            raise FailedPrecondition(
                f"the request relies on the evaluation of epoch {evaluation_epoch}; "
                f"trained model {self.id} was evaluated at epoch {evaluation.get('epoch', 0)}"
            )
        if min_bbox_map is None:
            return
        if self.bbox_map is None:
            raise FailedPrecondition(
                f"trained model {self.id} has no {HEADLINE_METRIC}; "
                f"at least {min_bbox_map} is required"
            )
        if self.bbox_map < min_bbox_map:
            raise FailedPrecondition(
                f"trained model {self.id} has {HEADLINE_METRIC} {self.bbox_map:.4f}, "
                f"below the required {min_bbox_map}"
            )

    def ensure_deletable(self) -> None:
        if self.published:
            raise FailedPrecondition(
                f"trained model {self.id} is published in channel {self.channel!r}; "
                "unpublish it first"
            )

    def _changed(self, now: datetime, event: ModelEvent) -> None:
        self.update_time = now
        self.version += 1
        self.new_events.append(event)


@dataclass(frozen=True, slots=True, kw_only=True)
class LineageNode:
    id: uuid.UUID
    display_name: str
    base_model_id: uuid.UUID | None
    training_run_id: uuid.UUID | None
    dataset_fingerprint: str
    bbox_map: float | None
    depth: int
    creator: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Lineage:
    # From the model itself (depth 0) up to its root.
    ancestors: list[LineageNode]
    # Breadth first, depth 1 = direct children.
    descendants: list[LineageNode]

    def seen_by(self, owner: str) -> Lineage:
        """What a caller that may see only `owner`'s models sees: the ancestors up to the
        first that is another's, the descendants reached through its own models only."""
        ancestors = list(itertools.takewhile(lambda n: n.creator == owner, self.ancestors))
        reachable = {n.id for n in ancestors[:1]}
        descendants = []
        for node in self.descendants:
            if node.creator == owner and node.base_model_id in reachable:
                descendants.append(node)
                reachable.add(node.id)
        return Lineage(ancestors=ancestors, descendants=descendants)


class PublicationAction(enum.StrEnum):
    PUBLISHED = "published"
    UNPUBLISHED = "unpublished"


@dataclass(frozen=True, slots=True, kw_only=True)
class PublicationEvent:
    """One line of the publication history: who put which model in or out of a channel."""

    trained_model_id: uuid.UUID
    action: PublicationAction
    channel: str
    actor: str
    reason: str
    time: datetime
    replaced_model_id: uuid.UUID | None = None
    bbox_map: float | None = None
    # Proto JSON of IncumbentComparison: what a publication that had to match the
    # channel's model was compared on.
    incumbent_comparison: dict[str, Any] | None = None
    id: int | None = None
