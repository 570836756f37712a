"""Use cases of TrainedModelService."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import structlog

from services.trained_models.domain import Lineage, TrainedModel
from services.trained_models.messages import created_message
from services.trained_models.repository import ModelFilter
from services.trained_models.unit_of_work import UnitOfWork
from shared.errors import NotFound
from shared.pagination import Cursor

log = structlog.get_logger(__name__)

MAX_LINEAGE_DEPTH = 50


async def register_from_run(uow: UnitOfWork, model: TrainedModel) -> bool:
    """Registers the model of a succeeded run, once per run however often the
    completion is delivered. Returns False when it was already registered."""
    assert model.training_run_id is not None
    async with uow:
        if not await uow.models.run_exists(model.training_run_id):
            log.warning(
                "run deleted before its model was registered", run_id=str(model.training_run_id)
            )
            return False
        if not await uow.models.add_if_absent(model):
            return False
        uow.publish(created_message(model, uow.subjects))
        await uow.commit()
    log.info("trained model registered", model_id=str(model.id), run_id=str(model.training_run_id))
    return True


async def get_model(uow: UnitOfWork, model_id: uuid.UUID) -> TrainedModel:
    async with uow:
        model = await uow.models.get(model_id)
    if model is None:
        raise NotFound(f"trained model {model_id} does not exist")
    return model


async def list_models(
    uow: UnitOfWork, filter_: ModelFilter, *, limit: int, after: Cursor | None
) -> Sequence[TrainedModel]:
    async with uow:
        return await uow.models.list(filter_, limit=limit, after=after)


async def lineage(uow: UnitOfWork, model_id: uuid.UUID, *, depth: int) -> Lineage:
    async with uow:
        result = await uow.models.lineage(model_id, max_depth=min(depth, MAX_LINEAGE_DEPTH))
    if not result.ancestors:
        raise NotFound(f"trained model {model_id} does not exist")
    return result
