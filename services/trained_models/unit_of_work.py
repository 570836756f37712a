"""The unit of work of TrainedModelService: the models it loaded or added and the
outbox messages that announce their changes are written in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.trained_models.domain import TrainedModel
from services.trained_models.lineage_repository import LineageRepository
from services.trained_models.messages import created_message, lifecycle_message
from services.trained_models.publication_repository import PublicationRepository
from services.trained_models.repository import TrainedModelRepository
from shared.names import model_name
from shared.outbox import OutboxMessage
from shared.repository import Change, TrackingRepository
from shared.unit_of_work import SqlUnitOfWork


class UnitOfWork(SqlUnitOfWork):
    def enter(self) -> Sequence[TrackingRepository[Any]]:
        self.models = TrainedModelRepository(self.session, tracking=self.tracking)
        self.publications = PublicationRepository(self.session)
        self.lineage = LineageRepository(self.session)
        return [self.models]

    def outbox_messages(self, aggregate: TrainedModel, change: Change) -> list[OutboxMessage]:
        """`trained_model.created` / `.deleted`, or one `trained_model.<event>` per change,
        each with the model as it is after the commit."""
        if change is Change.ADDED:
            return [created_message(aggregate, self.subjects)]
        if change is Change.REMOVED:
            return [lifecycle_message("deleted", aggregate, self.subjects)]
        return [lifecycle_message(e.value, aggregate, self.subjects) for e in aggregate.new_events]

    def resource_name(self, aggregate: TrainedModel) -> str:
        return model_name(aggregate.id)
