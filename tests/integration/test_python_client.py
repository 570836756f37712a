"""The Python client (client/, raven_client) against the real services over mTLS.

The client is synchronous and the servers run on this test's event loop, so every
client call runs in a thread (asyncio.to_thread)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from raven_client import (
    InvalidArgument,
    NotFound,
    RavenClient,
    RavenError,
    RetryPolicy,
    Tls,
    TrainingRun,
    TrainingSpec,
    Unavailable,
)
from raven_client.pb import training_run_pb2

from services.training_runs.main import TrainingRunsApp
from shared.settings import Settings
from tests import pki as test_pki

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

    watcher = RavenClient(
        f"127.0.0.1:{port}",
        f"127.0.0.1:{trained_models.port}",
        tls=tls,
        on_retry=lambda *retry: retries.append(retry),
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
    assert [attempt for _, attempt, *_ in retries] == [1, 2]
    still = await asyncio.to_thread(raven.get_run, run.name)
    assert still.state == TrainingRun.QUEUED
