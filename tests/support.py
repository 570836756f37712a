"""Helpers for tests: bounded waiting, tiny datasets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import TypeVar

import grpc
import nats
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from shared.messaging import Subjects
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from shared.settings import Settings

TrainingRun = training_run_pb2.TrainingRun

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 10.0,  # noqa: ASYNC109 (a deadline for the probing, not for one await)
    interval: float = 0.05,
) -> T:
    """Awaits `probe` until it returns something truthy; fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await probe()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {last!r})")


async def jetstream_round_trip(url: str, *, stream: str) -> int:
    """Publishes one message to a new stream (named `stream` and a random suffix) of the
    server at `url` and deletes the stream; returns the message's sequence: 1."""
    connection = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = connection.jetstream()
        name = f"{stream}_{uuid.uuid4().hex[:8].upper()}"
        await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
        ack = await js.publish(f"{name.lower()}.hello", b"hi", headers={"Nats-Msg-Id": "one"})
        await js.delete_stream(name)
        return ack.seq
    finally:
        await connection.close()


def create_request(dataset_uri: str, **spec: object) -> training_run_pb2.CreateTrainingRunRequest:
    spec = {"architecture": "retinanet_r18_fpn", "epochs": 2, "batch_size": 4, **spec}
    return training_run_pb2.CreateTrainingRunRequest(
        training_run=TrainingRun(
            display_name="tiny run",
            spec=training_run_pb2.TrainingSpec(dataset_uri=dataset_uri, **spec),  # type: ignore[arg-type]
        ),
        request_id=str(uuid.uuid4()),
    )


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no rich status in the error"
    found: dict[str, str] = {}
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found.update({v.field: v.description for v in bad_request.field_violations})
    return found


class WorkerDriver:
    """Publishes WorkerEvents for one run on the real stream, like a trainer worker."""

    def __init__(self, js: nats.js.JetStreamContext, subjects: Subjects, run: TrainingRun) -> None:
        self._js = js
        self._subjects = subjects
        self.run = run
        self.attempt = run.attempt

    async def send(
        self, event_id: str | None = None, *, attempt: int | None = None, **payload: object
    ) -> str:
        event = worker_pb2.WorkerEvent(
            event_id=event_id or uuid.uuid4().hex,
            training_run=self.run.name,
            attempt=attempt or self.attempt,
            worker_id="test-worker",
            **payload,  # type: ignore[arg-type]
        )
        event.time.GetCurrentTime()
        # A fresh Nats-Msg-Id each time: a repeated event_id models a redelivery,
        # which JetStream's own deduplication would not catch.
        await self._js.publish(
            self._subjects.worker_event(self.run.name.split("/")[1]),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": uuid.uuid4().hex},
        )
        return event.event_id


def worker_env(settings: Settings, worker_id: str, **overrides: str) -> dict[str, str]:
    """The environment of a `python -m trainer_worker` process on the test session's stack."""
    return {
        **os.environ,
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_NATS_URL": settings.nats_url,
        "RAVEN_NATS_NAMESPACE": settings.nats_namespace,
        "RAVEN_ARTIFACT_ROOT": str(settings.artifact_root),
        "RAVEN_JOB_ACK_WAIT_S": str(settings.job_ack_wait_s),
        "RAVEN_WORKER_ID": worker_id,
        **overrides,
    }


async def start_worker_process(
    env: Mapping[str, str], log_path: Path
) -> asyncio.subprocess.Process:
    """`python -m trainer_worker` as its own process, as it runs in production; its output
    goes to `log_path`."""
    with log_path.open("wb") as log:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "trainer_worker", env=dict(env), stdout=log, stderr=log
        )


async def stop_worker_process(
    process: asyncio.subprocess.Process, log_path: Path, *, tail: int = 4000
) -> None:
    """SIGTERM, then SIGKILL after 30 s; prints the end of its log for a failing test."""
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
    text = await asyncio.to_thread(log_path.read_text)
    print(f"--- {log_path.name}\n{text[-tail:]}")


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings,
    nc: nats.NATS,
    subjects: Subjects,
    folder: Path,
    worker_id: str,
    **overrides: str,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A `python -m trainer_worker` process on an empty job queue (jobs that other tests
    queued name datasets that exist only for the service's checks), stopped at the end."""
    await nc.jetstream().purge_stream(subjects.jobs_stream)
    log_path = folder / "worker.log"
    process = await start_worker_process(worker_env(settings, worker_id, **overrides), log_path)
    try:
        yield process
    finally:
        await stop_worker_process(process, log_path)
