"""TrainedModelService over gRPC: translation between protobuf and the use cases, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import grpc

from services.trained_models import (
    handlers,
    importing,
    publication,
)
from services.trained_models.domain import TrainedModel
from services.trained_models.messages import (
    lineage_to_proto,
    model_to_proto,
    publication_event_to_proto,
)
from services.trained_models.repository import ModelFilter
from services.trained_models.review_servicer import ReviewRpcs
from services.trained_models.unit_of_work import UnitOfWork
from services.training_runs.unit_of_work import UnitOfWork as JobsUnitOfWork
from shared import pagination
from shared.errors import FieldViolation, InvalidArgument
from shared.identity import caller_identity, missing, owner_scope, visible
from shared.metrics import ORDER_BY_PRIMARY
from shared.names import TRAINED_MODELS, TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import common_pb2, trained_model_pb2_grpc
from shared.proto.raven.training.v1 import trained_model_pb2 as pb
from shared.proto_json import optional_time, parse
from shared.storage import Storage

_ORDERS = {
    "": "create_time desc",
    "create_time desc": "create_time desc",
    "create_time": "create_time",
    "create_time asc": "create_time",
    ORDER_BY_PRIMARY: ORDER_BY_PRIMARY,
}
DEFAULT_DESCENDANT_DEPTH = 3


class TrainedModelServicer(ReviewRpcs, trained_model_pb2_grpc.TrainedModelServiceServicer):
    def __init__(
        self,
        *,
        uow_factory: Callable[[], UnitOfWork],
        storage: Storage,
        publish_policy: publication.PublicationPolicy,
        import_policy: importing.ImportPolicy,
        jobs_uow_factory: Callable[[], JobsUnitOfWork],
    ) -> None:
        self._uow = uow_factory
        # Evaluations are jobs on the training queue: written by the runs' unit of work.
        self._jobs_uow = jobs_uow_factory
        self._storage = storage
        self._publish_policy = publish_policy
        self._import_policy = import_policy

    async def GetTrainedModel(
        self, request: pb.GetTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModel:
        model_id = parse_name(request.name, TRAINED_MODELS)
        model = await handlers.get_model(self._uow(), model_id)
        if not visible(owner_scope(context, TRAINED_MODELS), model.creator):
            raise missing(TRAINED_MODELS, model_id)
        return model_to_proto(model)

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
            creator=owner_scope(context, TRAINED_MODELS) or request.creator,
            created_after=optional_time(request, "created_after"),
            created_before=optional_time(request, "created_before"),
            order_by=_ORDERS[request.order_by],
        )
        by_time = filter_.order_by != ORDER_BY_PRIMARY
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint({k: str(v) for k, v in asdict(filter_).items()})
        after = pagination.decode(request.page_token, fingerprint, time_value=by_time)
        if request.creator and request.creator != filter_.creator:
            # Someone else's models, asked by a caller that may only see its own.
            return pb.ListTrainedModelsResponse()
        models = await handlers.list_models(self._uow(), filter_, limit=size + 1, after=after)

        def cursor(last: TrainedModel) -> pagination.Cursor:
            value = (
                last.create_time
                if by_time
                else (last.bbox_map if last.bbox_map is not None else -1.0)
            )
            return pagination.Cursor(value, str(last.id))

        page, token = pagination.rendered_page(models, size, cursor, fingerprint, model_to_proto)
        return pb.ListTrainedModelsResponse(trained_models=page, next_page_token=token)

    async def GetTrainedModelLineage(
        self, request: pb.GetTrainedModelLineageRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModelLineage:
        if request.descendant_depth < 0:
            raise InvalidArgument([FieldViolation("descendant_depth", "must not be negative")])
        model_id = await self._visible_id(request.name, context)
        lineage = await handlers.lineage(
            self._uow(),
            model_id,
            depth=request.descendant_depth or DEFAULT_DESCENDANT_DEPTH,
        )
        owner = owner_scope(context, TRAINED_MODELS)
        return lineage_to_proto(lineage if owner is None else lineage.seen_by(owner))

    async def UpdateTrainedModel(
        self, request: pb.UpdateTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModel:
        wanted = request.trained_model
        edit = handlers.Edit(
            display_name=wanted.display_name,
            description=wanted.description,
            labels=dict(wanted.labels),
            fields=frozenset(request.update_mask.paths),
            etag=wanted.etag,
        )
        model_id = await self._visible_id(wanted.name, context, field="trained_model.name")
        return model_to_proto(await handlers.update_model(self._uow(), model_id, edit))

    async def ImportTrainedModel(
        self,
        request_iterator: AsyncIterator[pb.ImportTrainedModelRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.TrainedModel:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise InvalidArgument([FieldViolation("metadata", "the first message must be it")])
        metadata = first.metadata
        command = importing.ImportCommand(
            display_name=metadata.display_name,
            description=metadata.description,
            labels=dict(metadata.labels),
            architecture=metadata.architecture,
            classes=list(metadata.classes),
            config_uri=metadata.config_uri,
            checkpoint_uri=metadata.checkpoint_uri,
            request_id=metadata.request_id,
            creator=caller_identity(context),
        )

        async def parts() -> AsyncIterator[importing.Part]:
            async for message in request_iterator:
                kind = message.WhichOneof("part")
                if kind == "config_chunk":
                    yield "config", message.config_chunk
                elif kind == "checkpoint_chunk":
                    yield "checkpoint", message.checkpoint_chunk
                else:
                    raise InvalidArgument(
                        [FieldViolation("metadata", "only the first message carries it")]
                    )

        model = await importing.import_model(self._uow, command, parts(), self._import_policy)
        return model_to_proto(model)

    async def PublishTrainedModel(
        self, request: pb.PublishTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModel:
        model_id = await self._visible_id(request.name, context)
        command = publication.PublishCommand(
            model_id=model_id,
            channel=request.channel,
            reason=request.reason,
            actor=caller_identity(context),
            etag=request.etag,
            min_bbox_map=request.min_bbox_map if request.HasField("min_bbox_map") else None,
            evaluation_split=request.evaluation_split,
            evaluation_epoch=request.evaluation_epoch
            if request.HasField("evaluation_epoch")
            else None,
            beat_incumbent=request.beat_incumbent if request.HasField("beat_incumbent") else None,
            incumbent_metric=request.incumbent_metric,
            incumbent_tolerance=request.incumbent_tolerance
            if request.HasField("incumbent_tolerance")
            else None,
        )
        model = await publication.publish(self._uow(), command, self._publish_policy)
        return model_to_proto(model)

    async def UnpublishTrainedModel(
        self, request: pb.UnpublishTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainedModel:
        model_id = await self._visible_id(request.name, context)
        model = await publication.unpublish(
            self._uow(),
            model_id,
            reason=request.reason,
            actor=caller_identity(context),
            etag=request.etag,
        )
        return model_to_proto(model)

    async def ListPublicationEvents(
        self, request: pb.ListPublicationEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPublicationEventsResponse:
        model_id = (
            parse_name(request.trained_model, TRAINED_MODELS, field="trained_model")
            if request.trained_model
            else None
        )
        if model_id is not None:
            await self._require_visible(model_id, context)
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint(
            {"model": str(model_id), "channel": request.channel}
        )
        after = pagination.decode(request.page_token, fingerprint, time_value=False)
        events = await publication.history(
            self._uow(),
            model_id=model_id,
            channel=request.channel,
            limit=size + 1,
            before_id=int(after.value) if after else None,
            creator=owner_scope(context, TRAINED_MODELS),
        )
        token = ""
        if len(events) > size:
            events = events[:size]
            last = events[-1]
            token = pagination.encode(pagination.Cursor(last.id, str(last.id)), fingerprint)
        return pb.ListPublicationEventsResponse(
            events=[publication_event_to_proto(e) for e in events], next_page_token=token
        )

    async def DownloadTrainedModel(
        self, request: pb.DownloadTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadTrainedModelResponse]:
        kind = request.artifact_kind or "checkpoint"
        if kind not in ("checkpoint", "config"):
            raise InvalidArgument([FieldViolation("artifact_kind", "'checkpoint' or 'config'")])
        model_id = await self._visible_id(request.name, context)
        parts = handlers.download(self._uow(), model_id, kind=kind, storage=self._storage)
        async for part in parts:
            if isinstance(part, bytes):
                yield pb.DownloadTrainedModelResponse(chunk=part)
            else:
                yield pb.DownloadTrainedModelResponse(artifact=parse(part, common_pb2.Artifact()))

    async def DeleteTrainedModel(
        self, request: pb.DeleteTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTrainedModelResponse:
        model_id = await self._visible_id(request.name, context)
        await handlers.delete_model(
            self._uow(),
            model_id,
            etag=request.etag,
            actor=caller_identity(context),
            storage=self._storage,
        )
        return pb.DeleteTrainedModelResponse()
