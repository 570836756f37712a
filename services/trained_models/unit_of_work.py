"""The unit of work of TrainedModelService."""

from __future__ import annotations

from services.trained_models.publication_repository import PublicationRepository
from services.trained_models.repository import TrainedModelRepository
from shared.unit_of_work import SqlUnitOfWork


class UnitOfWork(SqlUnitOfWork):
    def enter(self) -> None:
        self.models = TrainedModelRepository(self.session)
        self.publications = PublicationRepository(self.session)
