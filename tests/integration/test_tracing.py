"""One training run is one trace: from the CreateTrainingRun call through the outbox row,
the JetStream job message, the worker's claim and preparation, to the service's consumer
of the worker's reports (a real TrainingRunService, a real JobConsumer, real NATS)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import nats
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.training_runs.main import TrainingRunsApp
from shared.messaging import Subjects
from shared.observability.tracing_grpc import client_interceptors
from shared.proto.raven.training.v1 import training_run_pb2, training_run_pb2_grpc
from shared.settings import Settings
from tests import pki as test_pki
from tests.support import create_request, eventually
from trainer_worker.claims import ClaimClient
from trainer_worker.consumer import ConsumerOptions, JobConsumer
from trainer_worker.job import WorkerEnvironment

pytestmark = pytest.mark.timeout(120)

CREATE = "raven.training.v1.TrainingRunService/CreateTrainingRun"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """Every span of this process, kept in memory."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


class Stack:
    def __init__(self, app: TrainingRunsApp, subjects: Subjects, channel: grpc.aio.Channel):
        self.app = app
        self.subjects = subjects
        self.runs = training_run_pb2_grpc.TrainingRunServiceStub(channel)


@pytest.fixture
async def stack(
    settings: Settings, pki: test_pki.Pki, tmp_path: Path, exporter: InMemorySpanExporter
) -> AsyncIterator[Stack]:
    """TrainingRunService and a worker on streams of their own, the worker's claims
    answered by the service."""
    own = settings.model_copy(
        update={"nats_namespace": f"trace{uuid.uuid4().hex[:8]}", "artifact_root": tmp_path}
    )
    app = TrainingRunsApp(own)
    await app.start()
    subjects = Subjects(own.nats_namespace)
    nc = await nats.connect(own.nats_url)
    consumer = JobConsumer(
        js=nc.jetstream(),
        subjects=subjects,
        environment=WorkerEnvironment(artifact_root=tmp_path, device="cpu"),
        options=ConsumerOptions(worker_id="trace-worker", ack_wait_s=8, fetch_timeout_s=0.5),
        claims=ClaimClient(nc=nc, subjects=subjects, timeout_s=5),
    )
    shutdown = asyncio.Event()
    worker = asyncio.create_task(consumer.run(shutdown))
    channel = grpc.aio.secure_channel(
        f"127.0.0.1:{app.port}",
        pki.credentials(test_pki.ADMIN),
        interceptors=client_interceptors(),
    )
    try:
        yield Stack(app, subjects, channel)
    finally:
        shutdown.set()
        await asyncio.wait_for(worker, 30)
        await channel.close()
        await nc.close()
        await app.stop(grace_s=1)


def _one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind is kind]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def _child(spans: list[ReadableSpan], parent: ReadableSpan, name: str) -> ReadableSpan:
    found = [s for s in _children(spans, parent) if s.name == name]
    assert len(found) == 1, (parent.name, [s.name for s in _children(spans, parent)])
    return found[0]


def _descendants(spans: list[ReadableSpan], root: ReadableSpan) -> list[ReadableSpan]:
    found, frontier = [], [root]
    while frontier:
        below = [c for p in frontier for c in _children(spans, p)]
        found += below
        frontier = below
    return found


async def test_a_run_is_one_trace_from_the_call_to_the_workers_reports(
    stack: Stack, exporter: InMemorySpanExporter, tmp_path: Path
) -> None:
    # A dataset the worker cannot read: the run goes through claim and preparation, and
    # the worker reports its failure.
    broken = tmp_path / "datasets" / "broken" / "annotations.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"images": [')
    exporter.clear()
    run = await stack.runs.CreateTrainingRun(create_request("datasets/broken/annotations.json"))
    get = training_run_pb2.GetTrainingRunRequest(name=run.name)
    events_durable = f"consume {stack.subjects.worker_events_consumer}"

    async def failed_and_reported() -> bool:
        done = await stack.runs.GetTrainingRun(get)
        spans = exporter.get_finished_spans()
        return done.state == training_run_pb2.TrainingRun.FAILED and any(
            s.name == events_durable for s in spans
        )

    await eventually(failed_and_reported, timeout=60, interval=0.2)
    spans = list(exporter.get_finished_spans())
    client = _one(spans, CREATE, SpanKind.CLIENT)
    assert client.context is not None
    trace_id = client.context.trace_id
    in_trace = [s for s in spans if s.context is not None and s.context.trace_id == trace_id]

    server = _child(in_trace, client, CREATE)
    assert server.kind is SpanKind.SERVER
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0
    job_subject = stack.subjects.job(run.name.removeprefix("trainingRuns/"))
    publish = _child(in_trace, server, f"publish {job_subject}")
    assert publish.kind is SpanKind.PRODUCER
    job = _child(in_trace, publish, f"consume {stack.subjects.trainer_consumer}")
    assert job.kind is SpanKind.CONSUMER
    assert job.attributes is not None and job.attributes["raven.run_id"] == run.name.split("/")[1]
    claim = _child(in_trace, job, "claim job")
    _child(in_trace, claim, "answer job claim")
    below_job = _descendants(in_trace, job)
    assert "prepare dataset" in {s.name for s in below_job}
    reports = [s for s in below_job if s.name == events_durable]
    assert reports, [s.name for s in below_job]
    assert all(s.kind is SpanKind.CONSUMER for s in reports)
    # Every span of the run's story is in the one trace, under the client's call.
    assert {s.context.trace_id for s in [server, publish, job, claim, *reports] if s.context} == {
        trace_id
    }
