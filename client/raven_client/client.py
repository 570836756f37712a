"""RavenClient: the common calls of TrainingRunService and TrainedModelService.

Every unary call has a deadline (`timeout_s` unless the call is given its own `timeout`);
downloads have one only when given, and watching none.
Reads, and writes that carry a request_id (the client adds a fresh one when none is
given), are retried with exponential backoff and jitter while the service is
UNAVAILABLE; other writes are not, since a lost reply may hide a change that happened.
Failures raise the typed exceptions of raven_client.errors.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from raven_client import downloads
from raven_client._proto.raven.training.v1 import (
    common_pb2,
    trained_model_pb2,
    trained_model_pb2_grpc,
    training_run_pb2,
    training_run_pb2_grpc,
)
from raven_client.channel import Tls, open_channel
from raven_client.retry import NO_RETRIES, RetryHook, RetryPolicy, call_with_retries
from raven_client.watch import follow

TrainingRun = training_run_pb2.TrainingRun
TrainingSpec = training_run_pb2.TrainingSpec
TrainedModel = trained_model_pb2.TrainedModel
ModelEvaluation = trained_model_pb2.ModelEvaluation

_RUNS: str = training_run_pb2.DESCRIPTOR.services_by_name["TrainingRunService"].full_name
_MODELS: str = trained_model_pb2.DESCRIPTOR.services_by_name["TrainedModelService"].full_name


class RavenClient:
    """Both services of the training backbone, each on its own address.

        with RavenClient("runs:50051", "models:50052", tls=Tls(ca, cert, key)) as raven:
            spec = TrainingSpec(dataset_uri="s3://b/a.json", architecture="rtmdet_tiny")
            run = raven.create_run(spec, display_name="first")

    `.runs` and `.models` are the raw stubs, for the calls this class has no method for;
    they raise grpc.RpcError (raven_client.errors.from_rpc_error types it)."""

    def __init__(
        self,
        training_runs_addr: str,
        trained_models_addr: str,
        tls: Tls | None = None,
        *,
        timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        on_retry: RetryHook | None = None,
        interceptors: Sequence[Any] = (),
    ) -> None:
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.metadata = tuple(metadata)
        self.on_retry = on_retry
        self._runs_channel = open_channel(training_runs_addr, tls, interceptors)
        self._models_channel = open_channel(trained_models_addr, tls, interceptors)
        self.runs = training_run_pb2_grpc.TrainingRunServiceStub(self._runs_channel)
        self.models = trained_model_pb2_grpc.TrainedModelServiceStub(self._models_channel)

    def close(self) -> None:
        self._runs_channel.close()
        self._models_channel.close()

    def __enter__(self) -> RavenClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Training runs.

    def create_run(
        self,
        spec: training_run_pb2.TrainingSpec,
        *,
        display_name: str,
        labels: Mapping[str, str] | None = None,
        base_model: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> training_run_pb2.TrainingRun:
        """Queues a run. Repeating a request_id returns the run it created."""
        request = training_run_pb2.CreateTrainingRunRequest(
            training_run=TrainingRun(
                display_name=display_name, labels=labels or {}, spec=spec, base_model=base_model
            ),
            request_id=request_id or str(uuid.uuid4()),
        )
        run: TrainingRun = self._call(_RUNS, "CreateTrainingRun", request, timeout, safe=True)
        return run

    def get_run(self, name: str, *, timeout: float | None = None) -> training_run_pb2.TrainingRun:
        request = training_run_pb2.GetTrainingRunRequest(name=name)
        run: TrainingRun = self._call(_RUNS, "GetTrainingRun", request, timeout, safe=True)
        return run

    def list_runs(
        self,
        *,
        states: Iterable[training_run_pb2.TrainingRun.State] = (),
        base_model: str = "",
        dataset_uri: str = "",
        creator: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> training_run_pb2.ListTrainingRunsResponse:
        """One page of runs, newest first; `iter_runs` walks every page."""
        request = training_run_pb2.ListTrainingRunsRequest(
            states=list(states),
            base_model=base_model,
            dataset_uri=dataset_uri,
            creator=creator,
            page_size=page_size,
            page_token=page_token,
        )
        page: training_run_pb2.ListTrainingRunsResponse = self._call(
            _RUNS, "ListTrainingRuns", request, timeout, safe=True
        )
        return page

    def iter_runs(self, **filters: Any) -> Iterator[training_run_pb2.TrainingRun]:
        """Every run `list_runs(**filters)` matches, page after page."""
        token = ""
        while True:
            page = self.list_runs(**filters, page_token=token)
            yield from page.training_runs
            token = page.next_page_token
            if not token:
                return

    def cancel_run(
        self, name: str, *, reason: str = "", timeout: float | None = None
    ) -> training_run_pb2.TrainingRun:
        request = training_run_pb2.CancelTrainingRunRequest(name=name, reason=reason)
        run: TrainingRun = self._call(_RUNS, "CancelTrainingRun", request, timeout, safe=False)
        return run

    def get_metrics(
        self, name: str, *, timeout: float | None = None
    ) -> training_run_pb2.TrainingRunMetrics:
        """Per-epoch training and validation metrics of run `name`."""
        request = training_run_pb2.GetTrainingRunMetricsRequest(name=name)
        metrics: training_run_pb2.TrainingRunMetrics = self._call(
            _RUNS, "GetTrainingRunMetrics", request, timeout, safe=True
        )
        return metrics

    def watch(
        self,
        run_name: str,
        after_sequence: int = 0,
        *,
        live_progress: bool = False,
        reconnect: RetryPolicy | None = None,
    ) -> Iterator[training_run_pb2.TrainingRunEvent]:
        """The run's events after `after_sequence`, live, until the run ends. A dropped
        stream is reopened after the last event seen (`reconnect`: how patiently; the
        count starts again after each event), so no event is missed or repeated.
        `live_progress`: progress reports too, the moment workers send them (events with
        `live` set, each followed by its recorded entry)."""
        return follow(
            lambda after: self.runs.WatchTrainingRun(
                training_run_pb2.WatchTrainingRunRequest(
                    name=run_name, after_sequence=after, live_progress=live_progress
                ),
                metadata=self.metadata,
            ),
            after_sequence,
            reconnect or RetryPolicy(attempts=10, max_backoff_s=5.0),
            on_retry=self.on_retry,
        )

    # Trained models.

    def get_model(
        self, name: str, *, timeout: float | None = None
    ) -> trained_model_pb2.TrainedModel:
        request = trained_model_pb2.GetTrainedModelRequest(name=name)
        model: TrainedModel = self._call(_MODELS, "GetTrainedModel", request, timeout, safe=True)
        return model

    def list_models(
        self,
        *,
        published: bool | None = None,
        base_model: str = "",
        architecture: str = "",
        training_run: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> trained_model_pb2.ListTrainedModelsResponse:
        """One page of models; `iter_models` walks every page."""
        request = trained_model_pb2.ListTrainedModelsRequest(
            base_model=base_model,
            architecture=architecture,
            training_run=training_run,
            order_by=order_by,
            page_size=page_size,
            page_token=page_token,
        )
        if published is not None:
            request.published = published
        page: trained_model_pb2.ListTrainedModelsResponse = self._call(
            _MODELS, "ListTrainedModels", request, timeout, safe=True
        )
        return page

    def iter_models(self, **filters: Any) -> Iterator[trained_model_pb2.TrainedModel]:
        token = ""
        while True:
            page = self.list_models(**filters, page_token=token)
            yield from page.trained_models
            token = page.next_page_token
            if not token:
                return

    def publish_model(
        self,
        name: str,
        channel: str,
        *,
        reason: str = "",
        etag: str = "",
        min_bbox_map: float | None = None,
        beat_incumbent: bool | None = None,
        timeout: float | None = None,
    ) -> trained_model_pb2.TrainedModel:
        """Publishes model `name` to `channel`, replacing the model published there."""
        request = trained_model_pb2.PublishTrainedModelRequest(
            name=name, channel=channel, reason=reason, etag=etag
        )
        if min_bbox_map is not None:
            request.min_bbox_map = min_bbox_map
        if beat_incumbent is not None:
            request.beat_incumbent = beat_incumbent
        model: TrainedModel = self._call(
            _MODELS, "PublishTrainedModel", request, timeout, safe=False
        )
        return model

    def evaluate_model(
        self,
        trained_model: str,
        *,
        dataset_uri: str = "",
        image_root: str = "",
        split_of: str = "",
        split: str = "",
        score_threshold: float | None = None,
        iou_threshold: float | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> trained_model_pb2.ModelEvaluation:
        """Starts an evaluation job; `watch(evaluation.job)` follows it."""
        request = trained_model_pb2.EvaluateTrainedModelRequest(
            trained_model=trained_model,
            dataset_uri=dataset_uri,
            image_root=image_root,
            split_of=split_of,
            split=split,
            request_id=request_id or str(uuid.uuid4()),
        )
        if score_threshold is not None:
            request.score_threshold = score_threshold
        if iou_threshold is not None:
            request.iou_threshold = iou_threshold
        evaluation: ModelEvaluation = self._call(
            _MODELS, "EvaluateTrainedModel", request, timeout, safe=True
        )
        return evaluation

    def get_evaluation(
        self, name: str, *, timeout: float | None = None
    ) -> trained_model_pb2.ModelEvaluation:
        request = trained_model_pb2.GetModelEvaluationRequest(name=name)
        evaluation: ModelEvaluation = self._call(
            _MODELS, "GetModelEvaluation", request, timeout, safe=True
        )
        return evaluation

    def list_evaluations(
        self,
        trained_model: str,
        *,
        split: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> trained_model_pb2.ListModelEvaluationsResponse:
        """One page of a model's evaluations, newest first ("trainedModels/-": every model's)."""
        request = trained_model_pb2.ListModelEvaluationsRequest(
            trained_model=trained_model, split=split, page_size=page_size, page_token=page_token
        )
        page: trained_model_pb2.ListModelEvaluationsResponse = self._call(
            _MODELS, "ListModelEvaluations", request, timeout, safe=True
        )
        return page

    def download_artifact(
        self, parent: str, artifact: str, path: Path | str, *, timeout: float | None = None
    ) -> common_pb2.Artifact:
        """Writes artifact `artifact` (its name, or its kind) of `parent` (a model, a run or
        an evaluation) to `path`, checked against the size and sha256 the server sends
        first; returns that description. When the check fails, `path` is left as it was."""
        request = trained_model_pb2.DownloadArtifactRequest(parent=parent, artifact=artifact)
        return self._download("DownloadArtifact", request, Path(path), timeout)

    def download_model(
        self,
        name: str,
        path: Path | str,
        *,
        artifact_kind: str = "checkpoint",
        timeout: float | None = None,
    ) -> common_pb2.Artifact:
        """Writes model `name`'s checkpoint (or "config") to `path`, checked as
        `download_artifact` checks."""
        request = trained_model_pb2.DownloadTrainedModelRequest(
            name=name, artifact_kind=artifact_kind
        )
        return self._download("DownloadTrainedModel", request, Path(path), timeout)

    # Calls.

    def _call(
        self, service: str, method: str, request: Any, timeout: float | None, *, safe: bool
    ) -> Any:
        rpc = getattr(self.runs if service == _RUNS else self.models, method)
        deadline = self.timeout_s if timeout is None else timeout
        return call_with_retries(
            f"/{service}/{method}",
            lambda: rpc(request, timeout=deadline, metadata=self.metadata),
            self.retry if safe else NO_RETRIES,
            self.on_retry,
        )

    def _download(
        self, method: str, request: Any, path: Path, timeout: float | None
    ) -> common_pb2.Artifact:
        # A whole download may take longer than a unary call: no deadline unless given.
        rpc = getattr(self.models, method)
        return call_with_retries(
            f"/{_MODELS}/{method}",
            lambda: downloads.write(rpc(request, timeout=timeout, metadata=self.metadata), path),
            self.retry,
            self.on_retry,
        )
