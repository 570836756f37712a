"""Outages of the servers the stack depends on, with real processes: a private embedded
Postgres is killed under both running services and started again; an embedded NATS is
killed and comes back where its clients were told it is."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import nats as nats_client
import psutil
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from services.trained_models.main import TrainedModelsApp
from services.training_runs.main import TrainingRunsApp
from shared import logs
from shared.infra import (
    Infrastructure,
    create_database,
    drop_database,
    ensure_infrastructure,
)
from shared.infra import nats as infra_nats
from shared.infra import postgres as infra_postgres
from shared.messaging import Subjects
from shared.proto.raven.training.v1 import (
    audit_pb2,
    audit_pb2_grpc,
    trained_model_pb2,
    trained_model_pb2_grpc,
    training_run_pb2,
    training_run_pb2_grpc,
)
from shared.settings import Settings
from tests import pki as test_pki
from tests.support import create_request, jetstream_round_trip

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(180)

DATABASE = "raven_outage"
UNAVAILABLE_MESSAGE = "the database is unavailable; retry"
# How long the killed server stays down, as in the outage this reproduces.
DOWN_S = 3.0
RECOVERY_S = 60.0


@dataclass
class PrivatePostgres:
    pgdata: Path
    url: str

    def pid(self) -> int:
        pid = infra_postgres.embedded_pid(self.pgdata)
        assert pid is not None, "the private postgres is not running"
        return pid

    def kill(self) -> None:
        """SIGKILL to the postmaster: no shutdown, no cleanup. Its backends notice and exit:
        the server is down once they are gone."""
        postmaster = psutil.Process(self.pid())
        backends = postmaster.children(recursive=True)
        postmaster.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs([postmaster, *backends], timeout=15)
        assert not alive, f"still running after the postmaster's death: {alive}"

    def start(self) -> None:
        """Starts it again on the same data folder (crash recovery runs), once the backends
        the killed postmaster left behind have noticed and exited."""
        deadline = time.monotonic() + 30
        while True:
            try:
                url = infra_postgres.start_embedded(
                    self.pgdata, database=DATABASE, keep_running=True
                )
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert url == self.url, "the server came back where its clients look for it"


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    # Outside pytest's private tmp folders: the server runs as its own system user.
    base = Path(tempfile.mkdtemp(prefix="raven-outage-"))
    base.chmod(0o755)
    pgdata = base / "postgres"
    url = infra_postgres.start_embedded(pgdata, database=DATABASE, keep_running=True)
    try:
        yield PrivatePostgres(pgdata, create_database(url, DATABASE))
    finally:
        infra_postgres.stop_embedded(pgdata)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class Stack:
    runs: training_run_pb2_grpc.TrainingRunServiceStub
    models: trained_model_pb2_grpc.TrainedModelServiceStub
    audit: audit_pb2_grpc.AuditServiceStub


@pytest.fixture
async def outage_stack(
    private_postgres: PrivatePostgres,
    settings: Settings,
    infrastructure: Infrastructure,
    pki: test_pki.Pki,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    """Both services on the private Postgres and the session's NATS (its own namespace)."""
    # The services' own log format: their loops log each failed retry while the server is
    # down, and the development renderer's rich tracebacks would hold the event loop.
    logs.configure("INFO")
    artifact_root = tmp_path / "artifacts"
    annotations = artifact_root / "datasets" / "placeholder" / "annotations.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    own = settings.model_copy(
        update={
            "database_url": private_postgres.url,
            "nats_namespace": f"outage{uuid.uuid4().hex[:8]}",
            "artifact_root": artifact_root,
        }
    )
    apps = [TrainingRunsApp(own), TrainedModelsApp(own)]
    for app in apps:
        await app.start()
    runs_channel = pki.channel(apps[0].port, test_pki.ADMIN)
    models_channel = pki.channel(apps[1].port, test_pki.ADMIN)
    try:
        yield Stack(
            runs=training_run_pb2_grpc.TrainingRunServiceStub(runs_channel),
            models=trained_model_pb2_grpc.TrainedModelServiceStub(models_channel),
            audit=audit_pb2_grpc.AuditServiceStub(runs_channel),
        )
    finally:
        await runs_channel.close()
        await models_channel.close()
        for app in reversed(apps):
            await app.stop(grace_s=1)
        async with await nats_client.connect(infrastructure.nats_url) as nc:
            js = nc.jetstream()
            subjects = Subjects(own.nats_namespace)
            for stream in (
                subjects.jobs_stream,
                subjects.worker_events_stream,
                subjects.events_stream,
            ):
                try:
                    await js.delete_stream(stream)
                except Exception:
                    pass


Call = Callable[[], Awaitable[Any]]


def calls(stack: Stack, run: TrainingRun) -> dict[str, Call]:
    """One call of every RPC that reads or writes the database, on a run that exists and
    a model that does not."""
    model = f"trainedModels/{uuid.uuid4()}"
    runs, models = stack.runs, stack.models

    async def watch() -> list[Any]:
        stream = runs.WatchTrainingRun(
            training_run_pb2.WatchTrainingRunRequest(name=run.name), timeout=5
        )
        async for event in stream:
            stream.cancel()
            return [event]
        return []

    async def download() -> list[Any]:
        request = trained_model_pb2.DownloadTrainedModelRequest(
            name=model, artifact_kind="checkpoint"
        )
        return [chunk async for chunk in models.DownloadTrainedModel(request, timeout=5)]

    async def download_artifact() -> list[Any]:
        request = trained_model_pb2.DownloadArtifactRequest(parent=run.name, artifact="log")
        return [chunk async for chunk in models.DownloadArtifact(request, timeout=5)]

    return {
        "CreateTrainingRun": lambda: runs.CreateTrainingRun(
            create_request("datasets/placeholder/annotations.json"), timeout=5
        ),
        "GetTrainingRun": lambda: runs.GetTrainingRun(
            training_run_pb2.GetTrainingRunRequest(name=run.name), timeout=5
        ),
        "ListTrainingRuns": lambda: runs.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(), timeout=5
        ),
        "UpdateTrainingRun": lambda: runs.UpdateTrainingRun(
            training_run_pb2.UpdateTrainingRunRequest(
                training_run=TrainingRun(name=run.name, display_name="renamed"),
                update_mask=FieldMask(paths=["display_name"]),
            ),
            timeout=5,
        ),
        "RetryTrainingRun": lambda: runs.RetryTrainingRun(
            training_run_pb2.RetryTrainingRunRequest(name=run.name, request_id=str(uuid.uuid4())),
            timeout=5,
        ),
        "ListTrainingRunEvents": lambda: runs.ListTrainingRunEvents(
            training_run_pb2.ListTrainingRunEventsRequest(name=run.name), timeout=5
        ),
        "GetTrainingRunMetrics": lambda: runs.GetTrainingRunMetrics(
            training_run_pb2.GetTrainingRunMetricsRequest(name=run.name), timeout=5
        ),
        "WatchTrainingRun": watch,
        "ListAuditRecords": lambda: stack.audit.ListAuditRecords(
            audit_pb2.ListAuditRecordsRequest(), timeout=5
        ),
        "GetTrainedModel": lambda: models.GetTrainedModel(
            trained_model_pb2.GetTrainedModelRequest(name=model), timeout=5
        ),
        "ListTrainedModels": lambda: models.ListTrainedModels(
            trained_model_pb2.ListTrainedModelsRequest(), timeout=5
        ),
        "PublishTrainedModel": lambda: models.PublishTrainedModel(
            trained_model_pb2.PublishTrainedModelRequest(name=model, channel="production"),
            timeout=5,
        ),
        "ListPublicationEvents": lambda: models.ListPublicationEvents(
            trained_model_pb2.ListPublicationEventsRequest(), timeout=5
        ),
        "GetTrainedModelLineage": lambda: models.GetTrainedModelLineage(
            trained_model_pb2.GetTrainedModelLineageRequest(name=model), timeout=5
        ),
        "DownloadTrainedModel": download,
        "DownloadArtifact": download_artifact,
        "CompareTrainedModels": lambda: models.CompareTrainedModels(
            trained_model_pb2.CompareTrainedModelsRequest(
                trained_models=[model, f"trainedModels/{uuid.uuid4()}"]
            ),
            timeout=5,
        ),
        "DeleteTrainedModel": lambda: models.DeleteTrainedModel(
            trained_model_pb2.DeleteTrainedModelRequest(name=model), timeout=5
        ),
        # Last: it ends the run's life.
        "CancelTrainingRun": lambda: runs.CancelTrainingRun(
            training_run_pb2.CancelTrainingRunRequest(name=run.name), timeout=5
        ),
    }


async def outcome(call: Call) -> tuple[grpc.StatusCode, str]:
    try:
        await call()
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


async def test_rpcs_answer_unavailable_while_postgres_is_down_and_recover(
    outage_stack: Stack, private_postgres: PrivatePostgres
) -> None:
    run = await outage_stack.runs.CreateTrainingRun(
        create_request("datasets/placeholder/annotations.json")
    )
    table = calls(outage_stack, run)
    # With the database up, each call gets its ordinary answer (the model does not exist).
    before = {
        name: (await outcome(call))[0]
        for name, call in table.items()
        if name != "CancelTrainingRun"
    }
    assert grpc.StatusCode.UNAVAILABLE not in before.values(), before
    assert grpc.StatusCode.INTERNAL not in before.values(), before

    private_postgres.kill()
    down = {name: await outcome(call) for name, call in table.items()}
    assert down == {name: (grpc.StatusCode.UNAVAILABLE, UNAVAILABLE_MESSAGE) for name in table}
    # Still down a while later: pooled connections and new ones both fail the same way.
    await asyncio.sleep(DOWN_S)
    still = {name: (await outcome(call))[0] for name, call in table.items()}
    assert set(still.values()) == {grpc.StatusCode.UNAVAILABLE}, still

    await asyncio.to_thread(private_postgres.start)
    # Back: every call answers as before (the first use of a dead pooled connection may
    # still be UNAVAILABLE; none is INTERNAL).
    deadline = time.monotonic() + RECOVERY_S
    recovered: dict[str, grpc.StatusCode] = {}
    while time.monotonic() < deadline:
        recovered = {}
        for name in before:
            code, _ = await outcome(table[name])
            assert code != grpc.StatusCode.INTERNAL, (name, code)
            recovered[name] = code
        if grpc.StatusCode.UNAVAILABLE not in recovered.values():
            break
        await asyncio.sleep(0.5)
    assert recovered == before
    assert await outcome(table["CancelTrainingRun"]) == (grpc.StatusCode.OK, "")
    run = await outage_stack.runs.GetTrainingRun(
        training_run_pb2.GetTrainingRunRequest(name=run.name)
    )
    assert run.state == TrainingRun.CANCELLED


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _connected_client(port: int) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert client.recv(4096).startswith(b"INFO ")
    return client


def _kill(pid: int, signum: int) -> None:
    process = psutil.Process(pid)
    process.send_signal(signum)
    process.wait(15)


def _plain_bind_fails(port: int) -> bool:
    with socket.socket() as plain:
        try:
            plain.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_a_dead_embedded_nats_comes_back_on_the_port_its_clients_were_given(
    tmp_path: Path, signum: int
) -> None:
    port = _free_port()
    configured = Settings().database_url
    if not infra_postgres.is_reachable(configured):
        pytest.skip("no Postgres on the configured address")
    name = f"raven_outage_{uuid.uuid4().hex[:12]}"
    # As `make up` does: the configured NATS does not answer, an embedded server starts.
    settings = Settings(
        database_url=infra_postgres.with_database(configured, name),
        nats_url=f"nats://127.0.0.1:{port}",
    )
    data_dir = tmp_path / "data"
    infra = await asyncio.to_thread(ensure_infrastructure, settings, data_dir, keep_running=True)
    try:
        assert infra.nats_url == f"nats://127.0.0.1:{port}"
        pid = infra_nats.embedded_pid(data_dir.resolve())
        assert pid is not None
        client = _connected_client(port)
        _kill(pid, signum)
        # The server closed its side first: the port lingers in TIME_WAIT (or FIN_WAIT).
        assert client.recv(4096) == b""
        client.close()
        assert _plain_bind_fails(port), "the port is still held by the dead server's connection"

        again = await asyncio.to_thread(
            ensure_infrastructure, settings, data_dir, keep_running=True
        )
        assert again.nats_url == infra.nats_url
        assert await jetstream_round_trip(again.nats_url, stream="OUTAGE") == 1
    finally:
        await asyncio.to_thread(infra_nats.stop_embedded, data_dir.resolve())
        await asyncio.to_thread(drop_database, configured, name)


async def test_a_dead_embedded_nats_whose_port_was_taken_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The port its clients were given is served by someone else now: an error naming the
    port, not a server somewhere the clients never look."""
    monkeypatch.setattr(infra_nats, "REBIND_TIMEOUT_S", 1.0)
    port = _free_port()
    url = infra_nats.start_embedded(tmp_path, preferred_port=port, keep_running=True)
    pid = infra_nats.embedded_pid(tmp_path)
    assert pid is not None
    _kill(pid, signal.SIGKILL)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", port))
    squatter.listen(1)
    try:
        with pytest.raises(OSError, match=f"port {port} .* taken"):
            infra_nats.start_embedded(tmp_path, preferred_port=port, keep_running=True)
    finally:
        squatter.close()
    # Once it is free again, the server returns there.
    assert infra_nats.start_embedded(tmp_path, preferred_port=port, keep_running=True) == url
    assert infra_nats.stop_embedded(tmp_path)
    # Stopped on purpose: the next start may take another port.
    assert not (tmp_path / "nats.url").exists()


def test_a_stopped_embedded_nats_starts_afresh_on_the_preferred_port(tmp_path: Path) -> None:
    first, second = _free_port(), _free_port()
    assert infra_nats.start_embedded(tmp_path, preferred_port=first, keep_running=True).endswith(
        f":{first}"
    )
    assert infra_nats.stop_embedded(tmp_path)
    try:
        url = infra_nats.start_embedded(tmp_path, preferred_port=second, keep_running=True)
        assert url == f"nats://127.0.0.1:{second}"
    finally:
        infra_nats.stop_embedded(tmp_path)
    assert os.listdir(tmp_path)
