"""The Python client (client/, raven_client) against the real services over mTLS.

The client is synchronous and the servers run on this test's event loop, so every
client call runs in a thread (asyncio.to_thread)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import random
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from raven_client import (
    ChecksumMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RavenClient,
    RavenError,
    RetryPolicy,
    Tls,
    TrainedModel,
    TrainingRun,
    TrainingSpec,
    Unavailable,
    downloads,
)
from raven_client.pb import trained_model_pb2, training_run_pb2

from services.training_runs.main import TrainingRunsApp
from shared.proto.raven.training.v1 import common_pb2, worker_pb2
from shared.settings import Settings
from tests import pki as test_pki
from tests.support import WorkerDriver, eventually

pytestmark = pytest.mark.timeout(90)

Retry = tuple[str, int, RavenError, float]


@pytest.fixture(scope="module")
def tls(pki: test_pki.Pki) -> Tls:
    cert, key = pki.client_files(test_pki.ADMIN)
    return Tls(ca=pki.ca_file, cert=cert, key=key, server_name="localhost")


@pytest.fixture
def raven(training_runs, trained_models, tls: Tls) -> Iterator[RavenClient]:
    with RavenClient(
        f"127.0.0.1:{training_runs.port}", f"127.0.0.1:{trained_models.port}", tls=tls
    ) as client:
        yield client


def _spec(dataset_uri: str, **fields: object) -> TrainingSpec:
    fields = {"architecture": "retinanet_r18_fpn", "epochs": 2, "batch_size": 4, **fields}
    return TrainingSpec(dataset_uri=dataset_uri, **fields)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def _runs_server(settings: Settings, port: int) -> AsyncIterator[TrainingRunsApp]:
    """Another TrainingRunsApp on the session's database and NATS, listening on `port`."""
    app = TrainingRunsApp(settings.model_copy(update={"training_runs_addr": f"127.0.0.1:{port}"}))
    await app.start()
    try:
        yield app
    finally:
        await app.stop(grace_s=0.2)


class _WatchRequests(grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Records the after_sequence of every WatchTrainingRun the client opens."""

    def __init__(self) -> None:
        self.after: list[int] = []

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        if details.method.endswith("/WatchTrainingRun"):
            self.after.append(request.after_sequence)
        return continuation(details, request)


async def test_create_a_run_and_read_it_back(raven, dataset_uri):
    request_id = str(uuid.uuid4())
    run = await asyncio.to_thread(
        raven.create_run,
        _spec(dataset_uri, epochs=3),
        display_name="from the client",
        labels={"team": "backend"},
        request_id=request_id,
    )
    assert run.name.startswith("trainingRuns/") and run.state == TrainingRun.QUEUED
    assert run.spec.epochs == 3 and run.creator == test_pki.ADMIN

    read = await asyncio.to_thread(raven.get_run, run.name)
    assert read.name == run.name and read.display_name == "from the client"
    assert dict(read.labels) == {"team": "backend"} and read.spec.dataset_uri == dataset_uri

    # The same request id is the same run, however often it is sent.
    again = await asyncio.to_thread(
        raven.create_run,
        _spec(dataset_uri, epochs=3),
        display_name="from the client",
        labels={"team": "backend"},
        request_id=request_id,
    )
    assert again.name == run.name
    listed = await asyncio.to_thread(
        lambda: [r.name for r in raven.iter_runs(dataset_uri=dataset_uri, page_size=2)]
    )
    assert listed.count(run.name) == 1
    metrics = await asyncio.to_thread(raven.get_metrics, run.name)
    assert metrics.training_run == run.name and not metrics.epochs


async def test_a_field_violation_is_an_invalid_argument_naming_the_field(raven, dataset_uri):
    retries: list[Retry] = []
    raven.on_retry = lambda *retry: retries.append(retry)
    with pytest.raises(InvalidArgument) as caught:
        await asyncio.to_thread(
            raven.create_run, _spec(dataset_uri, epochs=0, batch_size=0), display_name="bad"
        )
    error = caught.value
    assert {v.field for v in error.field_violations} == {
        "training_run.spec.epochs",
        "training_run.spec.batch_size",
    }
    assert "between 1 and 500" in error.fields["training_run.spec.epochs"]
    assert "training_run.spec.epochs" in str(error)
    assert retries == [], "an invalid request is not repeated"


async def test_unknown_resources_are_not_found(raven):
    missing = f"trainingRuns/{uuid.uuid4()}"
    with pytest.raises(NotFound) as caught:
        await asyncio.to_thread(raven.get_run, missing)
    assert caught.value.code.name == "NOT_FOUND"
    with pytest.raises(NotFound):
        await asyncio.to_thread(raven.get_model, f"trainedModels/{uuid.uuid4()}")
    with pytest.raises(InvalidArgument) as malformed:
        await asyncio.to_thread(raven.get_run, "runs/nothing")
    assert "name" in malformed.value.fields


async def test_a_watch_resumes_after_its_server_went_away(
    raven, settings, tls, trained_models, dataset_uri
):
    """The watched server stops mid-stream; a new one comes up on its port; the client
    reopens the stream after the last event it yielded and ends with the run."""
    run = await asyncio.to_thread(raven.create_run, _spec(dataset_uri), display_name="watched")
    port = _free_port()
    events: queue.Queue[training_run_pb2.TrainingRunEvent | BaseException | None] = queue.Queue()
    retries: list[Retry] = []

    def follow(client: RavenClient) -> None:
        try:
            for event in client.watch(run.name):
                events.put(event)
            events.put(None)
        except BaseException as error:
            events.put(error)

    async def next_event() -> training_run_pb2.TrainingRunEvent | BaseException | None:
        return await asyncio.to_thread(events.get, timeout=30)

    opened = _WatchRequests()
    watcher = RavenClient(
        f"127.0.0.1:{port}",
        f"127.0.0.1:{trained_models.port}",
        tls=tls,
        on_retry=lambda *retry: retries.append(retry),
        interceptors=[opened],
    )
    with watcher:
        async with _runs_server(settings, port):
            thread = threading.Thread(target=follow, args=(watcher,), daemon=True)
            thread.start()
            first = await next_event()
            assert isinstance(first, training_run_pb2.TrainingRunEvent), first
            assert first.sequence == 1 and first.state_changed.to_state == TrainingRun.QUEUED
        # The stream is cut. The run ends meanwhile, through the session's server.
        cancelled = await asyncio.to_thread(raven.cancel_run, run.name, reason="resume test")
        assert cancelled.state in (TrainingRun.CANCELLED, TrainingRun.CANCELLING)
        assert events.empty(), "nothing arrives while no server is there"
        async with _runs_server(settings, port):
            rest = []
            while (event := await next_event()) is not None:
                assert isinstance(event, training_run_pb2.TrainingRunEvent), event
                rest.append(event)
            await asyncio.to_thread(thread.join, 10)
    sequences = [first.sequence, *(e.sequence for e in rest)]
    assert sequences == list(range(1, len(sequences) + 1)), "each event once, in order"
    assert rest[-1].state_changed.to_state == TrainingRun.CANCELLED
    assert retries and all(isinstance(error, Unavailable) for _, _, error, _ in retries)
    assert {method for method, *_ in retries} == {
        "/raven.training.v1.TrainingRunService/WatchTrainingRun"
    }
    # Opened from the start, then reopened (while the port was closed too) after event 1.
    assert opened.after[0] == 0 and len(opened.after) >= 2 and set(opened.after[1:]) == {1}


async def test_a_safe_call_is_retried_until_the_server_is_up(
    raven, settings, tls, trained_models, dataset_uri
):
    run = await asyncio.to_thread(raven.create_run, _spec(dataset_uri), display_name="watched")
    port = _free_port()
    failed_once = threading.Event()
    retries: list[Retry] = []

    def on_retry(*retry: object) -> None:
        retries.append(retry)  # type: ignore[arg-type]
        failed_once.set()

    patient = RetryPolicy(attempts=40, initial_backoff_s=0.05, max_backoff_s=0.5)
    with RavenClient(
        f"127.0.0.1:{port}",
        f"127.0.0.1:{trained_models.port}",
        tls=tls,
        retry=patient,
        on_retry=on_retry,
    ) as client:
        reading = asyncio.create_task(asyncio.to_thread(client.get_run, run.name))
        assert await asyncio.to_thread(failed_once.wait, 20), "the first attempt did not fail"
        assert not reading.done()
        async with _runs_server(settings, port):
            read = await reading
    assert read.name == run.name
    assert retries and all(isinstance(error, Unavailable) for _, _, error, _ in retries)
    assert [attempt for _, attempt, *_ in retries] == list(range(1, len(retries) + 1))
    assert {method for method, *_ in retries} == {
        "/raven.training.v1.TrainingRunService/GetTrainingRun"
    }


async def test_an_unsafe_call_is_not_retried_and_raises_unavailable(
    raven, tls, trained_models, dataset_uri
):
    run = await asyncio.to_thread(raven.create_run, _spec(dataset_uri), display_name="watched")
    retries: list[Retry] = []
    with RavenClient(
        f"127.0.0.1:{_free_port()}",
        f"127.0.0.1:{trained_models.port}",
        tls=tls,
        on_retry=lambda *retry: retries.append(retry),
    ) as client:
        with pytest.raises(Unavailable):
            await asyncio.to_thread(client.cancel_run, run.name)
        # A read gives up too once its attempts are spent.
        client.retry = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)
        with pytest.raises(Unavailable):
            await asyncio.to_thread(client.get_run, run.name)
    assert [(method, attempt) for method, attempt, *_ in retries] == [
        ("/raven.training.v1.TrainingRunService/GetTrainingRun", 1),
        ("/raven.training.v1.TrainingRunService/GetTrainingRun", 2),
    ]
    still = await asyncio.to_thread(raven.get_run, run.name)
    assert still.state == TrainingRun.QUEUED


async def _trained_model(raven: RavenClient, js, subjects, settings, dataset_uri) -> TrainedModel:
    """A run driven to SUCCEEDED by worker reports on the real stream, and its model."""
    run = await asyncio.to_thread(raven.create_run, _spec(dataset_uri), display_name="to model")
    worker = WorkerDriver(js, subjects, run)
    folder = Path(settings.artifact_root) / "models" / run.name.split("/")[1]
    folder.mkdir(parents=True)
    (folder / "config.py").write_text("model = dict(type='RetinaNet')\n")
    (folder / "checkpoint.pth").write_bytes(uuid.uuid4().bytes * 200_000)  # 3.2 MB: chunks
    artifacts = [
        common_pb2.Artifact(
            kind=kind,
            uri=path.as_uri(),
            size_bytes=path.stat().st_size,
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for kind, path in (
            ("config", folder / "config.py"),
            ("checkpoint", folder / "checkpoint.pth"),
        )
    ]
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(
        dataset_prepared=common_pb2.DatasetSummary(
            fingerprint=f"fp-{run.name[-6:]}", image_count=8, classes=["dump", "tire"]
        )
    )
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    await worker.send(
        succeeded=worker_pb2.WorkerEvent.Succeeded(
            artifacts=artifacts,
            facts=common_pb2.TrainingFacts(epochs_trained=2, best_epoch=2, device="cpu"),
            evaluation=common_pb2.Evaluation(
                epoch=2, split="val", metrics={"coco/bbox_mAP": 0.4}, image_count=4
            ),
        )
    )

    async def listed() -> TrainedModel | None:
        page = await asyncio.to_thread(raven.list_models, training_run=run.name)
        return page.trained_models[0] if page.trained_models else None

    return await eventually(listed, timeout=15)


async def test_models_read_publish_evaluate_and_download(
    raven, js, subjects, settings, dataset_uri, tmp_path
):
    model = await _trained_model(raven, js, subjects, settings, dataset_uri)
    read = await asyncio.to_thread(raven.get_model, model.name)
    assert read.name == model.name and read.evaluation.metrics["coco/bbox_mAP"] == 0.4
    models = await asyncio.to_thread(lambda: [m.name for m in raven.iter_models(page_size=1)])
    assert model.name in models

    channel = f"client-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FailedPrecondition):
        await asyncio.to_thread(raven.publish_model, model.name, channel, min_bbox_map=0.9)
    published = await asyncio.to_thread(
        raven.publish_model, model.name, channel, reason="client test", min_bbox_map=0.3
    )
    assert published.publication.published and published.publication.channel == channel

    evaluation = await asyncio.to_thread(raven.evaluate_model, model.name, dataset_uri=dataset_uri)
    assert evaluation.name.startswith(f"{model.name}/evaluations/") and evaluation.job
    again = await asyncio.to_thread(raven.get_evaluation, evaluation.name)
    assert again.job == evaluation.job
    page = await asyncio.to_thread(raven.list_evaluations, model.name)
    assert [e.name for e in page.evaluations] == [evaluation.name]

    stored = next(a for a in model.artifacts if a.kind == "checkpoint")
    target = tmp_path / "out" / "checkpoint.pth"
    header = await asyncio.to_thread(raven.download_model, model.name, target)
    assert header.sha256 == stored.sha256
    assert hashlib.sha256(target.read_bytes()).hexdigest() == stored.sha256
    config = await asyncio.to_thread(
        raven.download_artifact, model.name, "config", tmp_path / "config.py"
    )
    assert config.kind == "config"
    assert (tmp_path / "config.py").read_text() == "model = dict(type='RetinaNet')\n"

    # A stored file that changed is refused; nothing is written where it was asked for.
    stored_path = Path(stored.uri.removeprefix("file://"))
    await asyncio.to_thread(stored_path.write_bytes, b"not the checkpoint")
    with pytest.raises(FailedPrecondition) as refused:
        await asyncio.to_thread(raven.download_model, model.name, tmp_path / "tampered.pth")
    assert "recorded size" in refused.value.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.py", "out"]


def test_a_download_that_does_not_match_its_announced_sha256_leaves_nothing(tmp_path):
    data = b"checkpoint bytes"

    def stream(sha256: str) -> list[trained_model_pb2.DownloadTrainedModelResponse]:
        announced = common_pb2.Artifact(kind="checkpoint", size_bytes=len(data), sha256=sha256)
        return [
            trained_model_pb2.DownloadTrainedModelResponse(artifact=announced),
            trained_model_pb2.DownloadTrainedModelResponse(chunk=data[:5]),
            trained_model_pb2.DownloadTrainedModelResponse(chunk=data[5:]),
        ]

    target = tmp_path / "checkpoint.pth"
    with pytest.raises(ChecksumMismatch, match="expected 16 with"):
        downloads.write(stream(hashlib.sha256(b"other").hexdigest()), target)
    assert list(tmp_path.iterdir()) == []
    header = downloads.write(stream(hashlib.sha256(data).hexdigest()), target)
    assert header.size_bytes == len(data) and target.read_bytes() == data
    assert list(tmp_path.iterdir()) == [target]


def test_backoff_grows_exponentially_with_jitter_up_to_its_cap():
    policy = RetryPolicy(attempts=8, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(7)
    for failures, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0], start=1):
        waits = [policy.backoff_s(failures, rng) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits), (failures, min(waits), max(waits))
        assert max(waits) - min(waits) > ceiling / 4, "the waits are spread, not fixed"
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
