"""Driving a real JobConsumer over real JetStream: a worker running for one test, the jobs
it is sent, the WorkerEvents it answers with and a cancel request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from shared.messaging import Subjects, ensure_streams
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from tests.configs import TINY_TRAINING
from trainer_worker.claims import ClaimClient
from trainer_worker.consumer import ConsumerOptions, JobConsumer
from trainer_worker.job import WorkerEnvironment

TERMINAL = {"succeeded", "failed", "cancelled"}


@asynccontextmanager
async def running_consumer(
    nats_url: str,
    *,
    namespace: str,
    worker_id: str,
    environment: WorkerEnvironment,
    claims: dict[str, worker_pb2.ClaimJobResponse] | None = None,
) -> AsyncIterator[tuple[JetStreamContext, Subjects]]:
    """A worker consuming jobs in streams of their own (under `namespace`), until the block
    ends; `claims`: the answers of a stand-in TrainingRunService by run id, None: the
    worker claims nothing."""
    subjects = Subjects(namespace=f"{namespace}{uuid.uuid4().hex[:10]}")
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_streams(js, subjects)

    async def answer(msg: Msg) -> None:
        request = worker_pb2.ClaimJobRequest.FromString(msg.data)
        assert claims is not None
        response = claims[request.training_run.removeprefix("trainingRuns/")]
        await msg.respond(response.SerializeToString())

    if claims is not None:
        await nc.subscribe(subjects.claims, cb=answer)
    consumer = JobConsumer(
        claims=ClaimClient(nc=nc, subjects=subjects, timeout_s=2) if claims is not None else None,
        js=js,
        subjects=subjects,
        environment=environment,
        options=ConsumerOptions(
            worker_id=worker_id, ack_wait_s=8, max_deliver=2, fetch_timeout_s=0.5
        ),
    )
    shutdown = asyncio.Event()
    task = asyncio.create_task(consumer.run(shutdown))
    try:
        yield js, subjects
    finally:
        shutdown.set()
        await asyncio.wait_for(task, 60)
        for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
            await js.delete_stream(stream)
        await nc.close()


def job(run_id: str, dataset_uri: str, *, epochs: int = 1) -> worker_pb2.TrainingJob:
    return worker_pb2.TrainingJob(
        training_run=f"trainingRuns/{run_id}",
        attempt=1,
        spec=training_run_pb2.TrainingSpec(
            **TINY_TRAINING,
            dataset_uri=dataset_uri,
            epochs=epochs,
            val_fraction=0.25,
            seed=3,
            device=training_run_pb2.TrainingSpec.Device.CPU,
        ),
    )


async def submit(
    js: JetStreamContext, subjects: Subjects, training_job: worker_pb2.TrainingJob
) -> str:
    run_id = training_job.training_run.removeprefix("trainingRuns/")
    await js.publish(subjects.job(run_id), training_job.SerializeToString())
    return run_id


async def request_cancel(js: JetStreamContext, subjects: Subjects, run_id: str) -> None:
    """What TrainingRunService publishes when a cancel of the RUNNING run is requested."""
    cancel = training_run_pb2.TrainingRunEvent(
        training_run=f"trainingRuns/{run_id}",
        sequence=5,
        state_changed=training_run_pb2.TrainingRunEvent.StateChanged(
            from_state=training_run_pb2.TrainingRun.State.RUNNING,
            to_state=training_run_pb2.TrainingRun.State.CANCELLING,
            reason="cancel_requested",
        ),
    )
    await js.publish(subjects.run_state(run_id), cancel.SerializeToString())


async def events_until_terminal(
    js: JetStreamContext,
    subjects: Subjects,
    run_id: str,
    *,
    timeout_s: float = 150,
    stop_at: str | None = None,
) -> list[worker_pb2.WorkerEvent]:
    """Reads the run's WorkerEvents (a work queue: each is read once) up to the terminal
    one, or up to the first `stop_at` event."""
    subscription = await js.pull_subscribe(
        subjects.worker_event(run_id), stream=subjects.worker_events_stream
    )
    seen: list[worker_pb2.WorkerEvent] = []
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while asyncio.get_running_loop().time() < deadline:
            try:
                messages = await subscription.fetch(20, timeout=1)
            except TimeoutError:
                continue
            for message in messages:
                await message.ack()
                event = worker_pb2.WorkerEvent.FromString(message.data)
                assert message.headers and message.headers["Nats-Msg-Id"] == event.event_id
                seen.append(event)
                if event.WhichOneof("payload") in TERMINAL | {stop_at}:
                    return seen
    finally:
        # A work-queue stream allows one consumer per subject: make room for the next read.
        info = await subscription.consumer_info()
        await subscription.unsubscribe()
        await js.delete_consumer(subjects.worker_events_stream, info.name)
    raise AssertionError(f"no terminal event for {run_id}; saw {[kinds(seen)]}")


async def queue_empty(js: JetStreamContext, subjects: Subjects) -> bool:
    info = await js.stream_info(subjects.jobs_stream)
    return info.state.messages == 0


def kinds(events: list[worker_pb2.WorkerEvent]) -> list[str]:
    return [e.WhichOneof("payload") or "" for e in events]
