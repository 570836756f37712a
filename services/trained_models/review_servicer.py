"""The review part of TrainedModelService: model evaluations (jobs on the training queue),
comparisons on equal images, and downloads of any artifact."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable

import grpc

from services.trained_models import (
    artifact_choice,
    comparing,
    downloads,
    evaluations,
    handlers,
)
from services.trained_models.access import ModelAccess
from services.trained_models.evaluations_messages import evaluation_to_proto
from services.trained_models.messages import comparison_to_proto
from services.training_runs.domain import RunState
from services.training_runs.domain.evaluation import SPLITS
from services.training_runs.repository import EvaluationFilter
from services.training_runs.unit_of_work import UnitOfWork as JobsUnitOfWork
from shared import pagination
from shared.errors import FieldViolation, InvalidArgument
from shared.identity import caller_identity, owner_scope, require_visible
from shared.names import TRAINED_MODELS, TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2
from shared.proto.raven.training.v1 import trained_model_pb2 as pb
from shared.proto_json import parse
from shared.storage import Storage

# ListModelEvaluationsRequest.trained_model naming every model.
ALL_MODELS = "trainedModels/-"


class ReviewRpcs(ModelAccess):
    _jobs_uow: Callable[[], JobsUnitOfWork]
    _storage: Storage

    async def CompareTrainedModels(
        self, request: pb.CompareTrainedModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelComparison:
        command = comparing.CompareCommand(
            model_ids=[
                parse_name(name, TRAINED_MODELS, field=f"trained_models[{i}]")
                for i, name in enumerate(request.trained_models)
            ],
            dataset_fingerprint=request.dataset_fingerprint,
            split=request.split,
            owner=owner_scope(context, TRAINED_MODELS),
        )
        return comparison_to_proto(await comparing.compare(self._uow(), command))

    async def DownloadArtifact(
        self, request: pb.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadTrainedModelResponse]:
        parent = artifact_choice.parse_parent(request.parent)
        artifact_choice.validate_wanted(request.artifact)
        if parent.kind is artifact_choice.ParentKind.RUN:
            await require_visible(
                context,
                TRAINING_RUNS,
                parent.id,
                lambda run_id: downloads.run_creator(self._uow(), run_id),
            )
        else:
            assert parent.model_id is not None
            await self._require_visible(parent.model_id, context)
        parts = downloads.download(self._uow(), parent, request.artifact, storage=self._storage)
        async for part in parts:
            if isinstance(part, bytes):
                yield pb.DownloadTrainedModelResponse(chunk=part)
            else:
                yield pb.DownloadTrainedModelResponse(artifact=parse(part, common_pb2.Artifact()))

    async def EvaluateTrainedModel(
        self, request: pb.EvaluateTrainedModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelEvaluation:
        model_id = await self._visible_id(request.trained_model, context, field="trained_model")
        command = evaluations.EvaluateModel(
            trained_model_id=model_id,
            dataset_uri=request.dataset_uri.strip(),
            image_root=request.image_root.strip(),
            split_of=request.split_of,
            split=request.split.strip(),
            score_threshold=request.score_threshold
            if request.HasField("score_threshold")
            else None,
            iou_threshold=request.iou_threshold if request.HasField("iou_threshold") else None,
            samples=request.samples if request.HasField("samples") else None,
            device=training_run_pb2.TrainingSpec.Device.Name(request.device),
            request_id=request.request_id,
            creator=caller_identity(context),
            request_hash="evaluate:"
            + hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest(),
            model_owner=owner_scope(context, TRAINED_MODELS),
            run_owner=owner_scope(context, TRAINING_RUNS),
        )
        job = await evaluations.evaluate_model(self._jobs_uow(), command, storage=self._storage)
        return evaluation_to_proto(job)

    async def GetModelEvaluation(
        self, request: pb.GetModelEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelEvaluation:
        model_id, evaluation_id = await self._visible_evaluation(request.name, context)
        job = await evaluations.get_evaluation(self._jobs_uow(), model_id, evaluation_id)
        return evaluation_to_proto(job)

    async def ListModelEvaluations(
        self, request: pb.ListModelEvaluationsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelEvaluationsResponse:
        model_id = None
        if request.trained_model != ALL_MODELS:
            model_id = await self._visible_id(request.trained_model, context, field="trained_model")
            # An unknown model is NOT_FOUND, not a model without evaluations.
            await handlers.get_model(self._uow(), model_id)
        split = request.split.strip()
        if split and split not in SPLITS:
            raise InvalidArgument(
                [FieldViolation("split", "one of: " + ", ".join(repr(s) for s in SPLITS))]
            )
        filter_ = EvaluationFilter(
            trained_model_id=model_id,
            dataset_fingerprint=request.dataset_fingerprint.strip(),
            split=split,
            states=tuple(
                RunState(training_run_pb2.TrainingRun.State.Name(s)) for s in request.states if s
            ),
            model_creator=owner_scope(context, TRAINED_MODELS),
        )
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint(evaluations.filter_key(filter_))
        after = pagination.decode(request.page_token, fingerprint)
        jobs = await evaluations.list_evaluations(
            self._jobs_uow(), filter_, limit=size + 1, after=after
        )
        page, token = pagination.rendered_page(
            jobs, size, evaluations.cursor, fingerprint, evaluation_to_proto
        )
        return pb.ListModelEvaluationsResponse(evaluations=page, next_page_token=token)

    async def CancelModelEvaluation(
        self, request: pb.CancelModelEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelEvaluation:
        model_id, evaluation_id = await self._visible_evaluation(request.name, context)
        job = await evaluations.cancel_evaluation(
            self._jobs_uow(),
            model_id,
            evaluation_id,
            reason=request.reason,
            actor=caller_identity(context),
        )
        return evaluation_to_proto(job)
