"""Which models a caller may name: the ownership rule of shared.identity applied to models
(another's is NOT_FOUND, as a missing one), shared by the servicer's parts."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc

from services.trained_models import handlers
from services.trained_models.unit_of_work import UnitOfWork
from shared.errors import NotFound
from shared.identity import require_visible
from shared.names import TRAINED_MODELS, parse_evaluation_name, parse_name


class ModelAccess:
    _uow: Callable[[], UnitOfWork]

    async def _visible_evaluation(
        self, name: str, context: grpc.aio.ServicerContext
    ) -> tuple[uuid.UUID, uuid.UUID]:
        """The ids in an evaluation's name, whose model the caller may see (else NOT_FOUND)."""
        model_id, evaluation_id = parse_evaluation_name(name)
        await self._require_visible(model_id, context)
        return model_id, evaluation_id

    async def _visible_id(
        self, name: str, context: grpc.aio.ServicerContext, *, field: str = "name"
    ) -> uuid.UUID:
        """The id of the model `name` names, which the caller may see (else NOT_FOUND)."""
        model_id = parse_name(name, TRAINED_MODELS, field=field)
        await self._require_visible(model_id, context)
        return model_id

    async def _require_visible(
        self, model_id: uuid.UUID, context: grpc.aio.ServicerContext
    ) -> None:
        await require_visible(context, TRAINED_MODELS, model_id, self._creator_of)

    async def _creator_of(self, model_id: uuid.UUID) -> str | None:
        try:
            return (await handlers.get_model(self._uow(), model_id)).creator
        except NotFound:
            return None
