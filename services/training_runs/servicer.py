"""TrainingRunService over gRPC: translation between protobuf and the use cases, nothing more."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from typing import Any

import grpc

from services.training_runs import handlers
from services.training_runs.domain import RunKind, RunState
from services.training_runs.messages import event_to_proto, run_to_proto, spec_request
from services.training_runs.reads import RunReads
from services.training_runs.repository import RunFilter
from services.training_runs.unit_of_work import UnitOfWork
from services.training_runs.watch import EventHub
from shared import catalog, pagination
from shared.errors import FieldViolation, InvalidArgument, NotFound
from shared.identity import caller_identity, missing, owner_scope, require_visible, visible
from shared.names import TRAINED_MODELS, TRAINING_RUNS, parse_name, run_name
from shared.proto.raven.training.v1 import training_run_pb2 as pb
from shared.proto.raven.training.v1 import training_run_pb2_grpc
from shared.proto_json import optional_time
from shared.storage import Storage

_UPDATABLE = frozenset({"display_name", "labels"})
_ORDERS = {"": True, "create_time desc": True, "create_time": False, "create_time asc": False}


class TrainingRunServicer(training_run_pb2_grpc.TrainingRunServiceServicer):
    def __init__(
        self,
        *,
        uow_factory: Callable[[], UnitOfWork],
        reads: RunReads,
        hub: EventHub,
        storage: Storage,
    ) -> None:
        self._uow = uow_factory
        self._reads = reads
        self._hub = hub
        self._storage = storage

    async def CreateTrainingRun(
        self, request: pb.CreateTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainingRun:
        body = request.training_run
        command = handlers.CreateRun(
            display_name=body.display_name,
            labels=dict(body.labels),
            spec=spec_request(body.spec),
            base_model=body.base_model,
            request_id=request.request_id,
            creator=caller_identity(context),
            request_hash=hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest(),
            base_model_owner=owner_scope(context, TRAINED_MODELS),
        )
        run = await handlers.create_run(self._uow(), command, storage=self._storage)
        return run_to_proto(run)

    async def GetTrainingRun(
        self, request: pb.GetTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainingRun:
        run_id = parse_name(request.name, TRAINING_RUNS)
        run = await self._reads.get(run_id)
        if not visible(owner_scope(context), run.creator):
            raise missing(TRAINING_RUNS, run_id)
        run.message.queue_position = run.place
        return run.message

    async def ListTrainingRuns(
        self, request: pb.ListTrainingRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTrainingRunsResponse:
        if request.order_by not in _ORDERS:
            raise InvalidArgument(
                [FieldViolation("order_by", "one of: 'create_time desc', 'create_time'")]
            )
        filter_ = RunFilter(
            states=tuple(RunState(pb.TrainingRun.State.Name(s)) for s in request.states if s),
            base_model_id=parse_name(request.base_model, TRAINED_MODELS, field="base_model")
            if request.base_model
            else None,
            dataset_uri=request.dataset_uri,
            creator=owner_scope(context) or request.creator,
            created_after=optional_time(request, "created_after"),
            created_before=optional_time(request, "created_before"),
            newest_first=_ORDERS[request.order_by],
            kinds=_kinds(request.kinds),
        )
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint(_filter_key(filter_))
        after = pagination.decode(request.page_token, fingerprint)
        if request.creator and request.creator != filter_.creator:
            # Someone else's runs, asked by a caller that may only see its own.
            return pb.ListTrainingRunsResponse()
        runs, token = pagination.rendered_page(
            await self._reads.page(filter_, limit=size + 1, after=after),
            size,
            lambda run: pagination.Cursor(run.create_time, str(run.id)),
            fingerprint,
            lambda run: run.message,
        )
        return pb.ListTrainingRunsResponse(training_runs=runs, next_page_token=token)

    async def UpdateTrainingRun(
        self, request: pb.UpdateTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainingRun:
        body = request.training_run
        paths = set(request.update_mask.paths)
        unknown = paths - _UPDATABLE
        if not paths or unknown:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "update_mask",
                        "name the fields to update, of: " + ", ".join(sorted(_UPDATABLE)),
                    )
                ]
            )
        run_id = await self._visible_id(body.name, context, field="training_run.name")
        run = await handlers.update_run(
            self._uow(),
            run_id,
            etag=body.etag,
            display_name=body.display_name if "display_name" in paths else None,
            labels=dict(body.labels) if "labels" in paths else None,
        )
        return run_to_proto(run)

    async def CancelTrainingRun(
        self, request: pb.CancelTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainingRun:
        run_id = await self._visible_id(request.name, context)
        run = await handlers.cancel_run(
            self._uow(),
            run_id,
            reason=request.reason,
            actor=caller_identity(context),
        )
        return run_to_proto(run)

    async def DeleteTrainingRun(
        self, request: pb.DeleteTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteTrainingRunResponse:
        run_id = await self._visible_id(request.name, context)
        await handlers.delete_run(self._uow(), run_id, etag=request.etag, storage=self._storage)
        return pb.DeleteTrainingRunResponse()

    async def RetryTrainingRun(
        self, request: pb.RetryTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainingRun:
        run_id = await self._visible_id(request.name, context)
        run = await handlers.retry_run(
            self._uow(),
            run_id,
            request_id=request.request_id,
            creator=caller_identity(context),
        )
        return run_to_proto(run)

    async def ListTrainingRunEvents(
        self, request: pb.ListTrainingRunEventsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListTrainingRunEventsResponse:
        run_id = await self._visible_id(request.name, context)
        size = pagination.page_size(request.page_size)
        fingerprint = pagination.query_fingerprint({"run": str(run_id)})
        cursor = pagination.decode(request.page_token, fingerprint, time_value=False)
        after = int(cursor.value) if cursor else 0
        events, token = pagination.rendered_page(
            await handlers.list_events(self._uow(), run_id, after_sequence=after, limit=size + 1),
            size,
            lambda event: pagination.Cursor(event.sequence, str(run_id)),
            fingerprint,
            event_to_proto,
        )
        return pb.ListTrainingRunEventsResponse(events=events, next_page_token=token)

    async def GetTrainingRunMetrics(
        self, request: pb.GetTrainingRunMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.TrainingRunMetrics:
        run_id = parse_name(request.name, TRAINING_RUNS)
        run = await handlers.get_run(self._uow(), run_id)
        if not visible(owner_scope(context), run.creator):
            raise missing(TRAINING_RUNS, run_id)
        metrics = pb.TrainingRunMetrics(
            training_run=run_name(run.id), best_epoch=run.best_epoch or 0
        )
        for epoch in run.epoch_metrics:
            metrics.epochs.add(epoch=epoch.epoch, train=dict(epoch.train), val=dict(epoch.val))
        return metrics

    async def ListArchitectures(
        self, request: pb.ListArchitecturesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListArchitecturesResponse:
        return _ARCHITECTURES

    async def WatchTrainingRun(
        self, request: pb.WatchTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TrainingRunEvent]:
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "must not be negative")])
        run_id = await self._visible_id(request.name, context)
        async for event in self._hub.watch(
            self._uow,
            run_id,
            after_sequence=request.after_sequence,
            live_progress=request.live_progress,
        ):
            yield event

    async def _visible_id(
        self, name: str, context: grpc.aio.ServicerContext, *, field: str = "name"
    ) -> uuid.UUID:
        """The id of the run `name` names, which the caller may see (else NOT_FOUND)."""
        run_id = parse_name(name, TRAINING_RUNS, field=field)
        await require_visible(context, TRAINING_RUNS, run_id, self._creator_of)
        return run_id

    async def _creator_of(self, run_id: uuid.UUID) -> str | None:
        try:
            return (await handlers.get_run(self._uow(), run_id)).creator
        except NotFound:
            return None


def _recipe_defaults(architecture: catalog.Architecture, *, fine_tune: bool) -> pb.TrainingSpec:
    recipe = architecture.recipe(fine_tune=fine_tune)
    return pb.TrainingSpec(
        architecture=architecture.key,
        frozen_stages=recipe.frozen_stages,
        optimizer=recipe.optimizer,
        batch_size=catalog.DEFAULT_BATCH_SIZE,
        learning_rate=catalog.default_learning_rate(
            architecture,
            optimizer=recipe.optimizer,
            batch_size=catalog.DEFAULT_BATCH_SIZE,
            fine_tune=fine_tune,
        ),
    )


_ARCHITECTURES = pb.ListArchitecturesResponse(
    architectures=[
        pb.Architecture(
            key=a.key,
            family=a.family,
            backbone_depth=a.depth,
            learning_rate_per_16=a.learning_rate,
            from_scratch=_recipe_defaults(a, fine_tune=False),
            fine_tune=_recipe_defaults(a, fine_tune=True),
        )
        for a in catalog.ARCHITECTURES.values()
    ],
    defaults=pb.TrainingSpec(
        epochs=catalog.DEFAULT_EPOCHS,
        batch_size=catalog.DEFAULT_BATCH_SIZE,
        image_size=catalog.DEFAULT_IMAGE_SIZE,
        val_fraction=catalog.DEFAULT_VAL_FRACTION,
        test_fraction=catalog.DEFAULT_TEST_FRACTION,
        device=pb.TrainingSpec.AUTO,
        deterministic=False,
    ),
)


def _kinds(requested: Any) -> tuple[RunKind, ...]:
    """The kinds asked for; none asked: TRAINING only (KIND_UNSPECIFIED reads as TRAINING)."""
    kinds = {
        RunKind.EVALUATION if k == pb.TrainingRun.EVALUATION else RunKind.TRAINING
        for k in requested
    }
    return tuple(sorted(kinds)) or (RunKind.TRAINING,)


def _filter_key(filter_: RunFilter) -> dict[str, Any]:
    return {k: str(v) for k, v in asdict(filter_).items()}
