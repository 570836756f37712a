"""One log format: a service process whose output is no terminal writes JSON lines only,
with one access-log line per call; a worker's lines of a run all name the run. Real
processes, as they run in production."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest

from shared.messaging import Subjects
from shared.observability.tracing_grpc import ObservedCalls
from shared.proto.raven.training.v1 import training_run_pb2, training_run_pb2_grpc
from shared.settings import Settings
from tests.support import create_request, eventually, running_worker

pytestmark = pytest.mark.timeout(120)

ACCESS_KEYS = {"rpc", "code", "duration_ms", "request_id", "trace_id"}


def _lines(text: str) -> list[dict[str, Any]]:
    """Every line as JSON; fails on the first that is not."""
    parsed = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"line {number} is not JSON: {line!r}\n{text[-3000:]}")
    return parsed


@pytest.fixture
async def namespace(settings: Settings, nc: nats.NATS) -> AsyncIterator[str]:
    name = f"{settings.nats_namespace}logs{uuid.uuid4().hex[:6]}"
    yield name
    js = nc.jetstream()
    subjects = Subjects(name)
    for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)


@contextlib.asynccontextmanager
async def _service(settings: Settings, namespace: str) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("RAVEN_LOG_JSON", "GRPC_VERBOSITY")},
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_NATS_URL": settings.nats_url,
        "RAVEN_NATS_NAMESPACE": namespace,
        "RAVEN_ARTIFACT_ROOT": str(settings.artifact_root),
        "RAVEN_TRAINING_RUNS_ADDR": "127.0.0.1:0",
        "RAVEN_INSECURE_DEV": "true",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.training_runs.main",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_service_writes_json_lines_with_an_access_line_per_call(
    settings: Settings, namespace: str
) -> None:
    async with _service(settings, namespace) as process:
        assert process.stdout is not None
        head: list[str] = []

        async def serving() -> bool:
            line = (await process.stdout.readline()).decode()  # type: ignore[union-attr]
            head.append(line)
            return '"serving"' in line or not line

        await eventually(serving, timeout=60, interval=0)
        port = json.loads(head[-1])["port"]
        trace_id = uuid.uuid4().hex
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            runs = training_run_pb2_grpc.TrainingRunServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await runs.GetTrainingRun(
                    training_run_pb2.GetTrainingRunRequest(name=f"trainingRuns/{uuid.uuid4()}"),
                    metadata=(
                        ("x-request-id", "req-logs-1"),
                        ("traceparent", f"00-{trace_id}-{'1' * 16}-01"),
                    ),
                )
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
            # The same method again: its line has this call's ids, not the first one's.
            with pytest.raises(grpc.aio.AioRpcError):
                await runs.GetTrainingRun(
                    training_run_pb2.GetTrainingRunRequest(name=f"trainingRuns/{uuid.uuid4()}"),
                    metadata=(("x-request-id", "req-logs-2"),),
                )
            await runs.ListTrainingRuns(training_run_pb2.ListTrainingRunsRequest())
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    lines = _lines("".join(head) + rest.decode())
    # The standard library's loggers (alembic's migration context) in the same format.
    assert any(str(line.get("logger", "")).startswith("alembic") for line in lines), lines
    access = [line for line in lines if line["event"] == "rpc"]
    assert len(access) == 3, access
    get, get_again, listed = access
    assert ACCESS_KEYS <= get.keys() and ACCESS_KEYS <= listed.keys(), access
    assert get["rpc"] == "/raven.training.v1.TrainingRunService/GetTrainingRun"
    assert get["code"] == "NOT_FOUND" and get["request_id"] == "req-logs-1"
    assert get["trace_id"] == trace_id
    assert get_again["request_id"] == "req-logs-2" and get_again["trace_id"] != trace_id
    assert listed["code"] == "OK" and listed["request_id"] not in ("", "req-logs-1")
    assert listed["trace_id"] != trace_id
    assert isinstance(listed["duration_ms"], float) and listed["duration_ms"] >= 0


async def test_a_workers_lines_of_a_run_all_carry_its_run_id(
    runs: training_run_pb2_grpc.TrainingRunServiceStub,
    settings: Settings,
    nc: nats.NATS,
    subjects: Subjects,
    tmp_path: Path,
) -> None:
    broken = Path(settings.artifact_root) / "datasets" / "logs-broken" / "annotations.json"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_text('{"images": [')
    async with running_worker(settings, nc, subjects, tmp_path, "logs-worker", RAVEN_LOG_JSON=""):
        run = await runs.CreateTrainingRun(create_request("datasets/logs-broken/annotations.json"))
        get = training_run_pb2.GetTrainingRunRequest(name=run.name)

        async def failed() -> bool:
            done = await runs.GetTrainingRun(get)
            return done.state == training_run_pb2.TrainingRun.FAILED

        await eventually(failed, timeout=60, interval=0.2)
        await asyncio.sleep(0.5)
    lines = _lines((tmp_path / "worker.log").read_text())
    run_id = run.name.split("/")[1]
    events = [line["event"] for line in lines]
    start, end = events.index("job received"), events.index("job done")
    of_the_run = lines[start : end + 1]
    assert len(of_the_run) >= 3, of_the_run
    for line in of_the_run:
        assert line.get("run_id") == run_id, line
        assert line.get("worker_id") == "logs-worker" and line.get("attempt") == 1, line
        assert len(line.get("trace_id", "")) == 32, line
    assert "run" not in {key for line in lines for key in line}


async def test_a_stream_closed_while_suspended_logs_its_end_and_no_error(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client that goes away while the server's stream waits to write (flow control)
    leaves the server's generator suspended at a message, closed later from elsewhere: the
    call still ends with one CANCELLED access line and no error of a context left wrongly."""
    method = "/raven.test.Flood/Flood"
    chunk = b"x" * 16_384
    closed = asyncio.Event()

    async def flood(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            for _ in range(10_000):
                yield chunk
        finally:
            closed.set()

    handler = grpc.method_handlers_generic_handler(
        "raven.test.Flood", {"Flood": grpc.unary_stream_rpc_method_handler(flood)}
    )
    server = grpc.aio.server(interceptors=[ObservedCalls()])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_stream(method)(b"")
            assert await call.read() == chunk
            # The server fills the connection's window and waits; the client goes away.
            await asyncio.sleep(0.5)
            call.cancel()
        await asyncio.wait_for(closed.wait(), 10)
    finally:
        await server.stop(None)
    gc.collect()
    await asyncio.sleep(0.1)
    # The access line, in whichever format the test session's logging renders.
    access = [line for line in capsys.readouterr().out.splitlines() if method in line]
    assert len(access) == 1 and "CANCELLED" in access[0], access
    # gRPC core's own line about the failed write is its own; ours must not add one.
    errors = [
        r for r in caplog.records if r.levelno >= logging.ERROR and not r.name.startswith("grpc")
    ]
    assert not errors, [(r.name, r.getMessage()) for r in errors]
