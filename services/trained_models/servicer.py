"""TrainedModelService over gRPC: translation between protobuf and the use cases, nothing more.

RPCs not overridden here answer UNIMPLEMENTED (the generated base class).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC

import grpc

from services.trained_models import handlers
from services.trained_models.messages import lineage_to_proto, model_to_proto
from services.trained_models.repository import ModelFilter
from services.trained_models.unit_of_work import UnitOfWork
from shared import pagination
from shared.errors import FieldViolation, InvalidArgument, grpc_errors
from shared.names import TRAINED_MODELS, TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import trained_model_pb2 as pb
from shared.proto.raven.training.v1 import trained_model_pb2_grpc

_ORDERS = {
    "": "create_time desc",
    "create_time desc": "create_time desc",
    "create_time": "create_time",
    "create_time asc": "create_time",
    "coco/bbox_mAP desc": "coco/bbox_mAP desc",
}
DEFAULT_DESCENDANT_DEPTH = 3


class TrainedModelServicer(trained_model_pb2_grpc.TrainedModelServiceServicer):
    def __init__(self, *, uow_factory: Callable[[], UnitOfWork]) -> None:
        self._uow = uow_factory

    @grpc_errors
    async def GetTrainedModel(
        self, request: pb.GetTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModel:
        model = await handlers.get_model(self._uow(), parse_name(request.name, TRAINED_MODELS))
        return model_to_proto(model)

    @grpc_errors
    async def ListTrainedModels(
        self, request: pb.ListTrainedModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTrainedModelsResponse:
        if request.order_by not in _ORDERS:
            raise InvalidArgument(
                [FieldViolation("order_by", "one of: " + ", ".join(repr(o) for o in _ORDERS if o))]
            )
        filter_ = ModelFilter(
            published=request.published if request.HasField("published") else None,
            base_model_id=parse_name(request.base_model, TRAINED_MODELS, field="base_model")
            if request.base_model
            else None,
            training_run_id=parse_name(request.training_run, TRAINING_RUNS, field="training_run")
            if request.training_run
            else None,
            dataset_uri=request.dataset_uri,
            architecture=request.architecture,
            class_name=request.class_name,
            creator=request.creator,
            created_after=request.created_after.ToDatetime(tzinfo=UTC)
            if request.HasField("created_after")
            else None,
            created_before=request.created_before.ToDatetime(tzinfo=UTC)
            if request.HasField("created_before")
            else None,
            order_by=_ORDERS[request.order_by],
        )
        by_time = filter_.order_by != "coco/bbox_mAP desc"
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint({k: str(v) for k, v in asdict(filter_).items()})
        after = pagination.decode(request.page_token, fingerprint, time_value=by_time)
        models = await handlers.list_models(self._uow(), filter_, limit=size + 1, after=after)
        token = ""
        if len(models) > size:
            models = models[:size]
            last = models[-1]
            value = (
                last.create_time
                if by_time
                else (last.bbox_map if last.bbox_map is not None else -1.0)
            )
            token = pagination.encode(pagination.Cursor(value, str(last.id)), fingerprint)
        return pb.ListTrainedModelsResponse(
            trained_models=[model_to_proto(m) for m in models], next_page_token=token
        )

    @grpc_errors
    async def GetTrainedModelLineage(
        self, request: pb.GetTrainedModelLineageRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModelLineage:
        if request.descendant_depth < 0:
            raise InvalidArgument([FieldViolation("descendant_depth", "must not be negative")])
        lineage = await handlers.lineage(
            self._uow(),
            parse_name(request.name, TRAINED_MODELS),
            depth=request.descendant_depth or DEFAULT_DESCENDANT_DEPTH,
        )
        return lineage_to_proto(lineage)
