"""TrainingRunService as two processes on one port (RAVEN_GRPC_PROCESSES=2, shared/prefork.py):
both answer on the port, a watcher on either sees what the other and the workers caused, a
child that dies is replaced, SIGTERM stops them all. Real processes on the real stack.

Which child served a call is read from the children's own `/metrics` (child i on the
metrics port + i): the Health/Check count of exactly one of them grows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import nats
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.messaging import Subjects
from shared.prefork import reserve_port
from shared.proto.raven.training.v1 import training_run_pb2, training_run_pb2_grpc, worker_pb2
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually

pytestmark = pytest.mark.timeout(120)

TrainingRun = training_run_pb2.TrainingRun
_CHECKS = 'raven_grpc_server_handled_total{grpc_code="OK",grpc_method="Check"'
# Fresh connections tried to reach a given child: the kernel picks one of two for each,
# so 64 all landing on the same child would be a 2**-63 chance, or a broken child.
_TRIES = 64


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on loopback (the two children's `/metrics`)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            with contextlib.suppress(OSError):
                second.bind(("127.0.0.1", port + 1))
                return port
    raise RuntimeError("no two adjacent free ports")


@dataclass(slots=True)
class Forked:
    """The parent process, the port its children share and where each serves metrics."""

    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving(self) -> dict[int, int]:
        """The pid of each child index, from the latest `serving` line of each."""
        pids: dict[int, int] = {}
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("event") == "serving":
                    pids[int(record["process"])] = int(record["pid"])
        return pids

    def children(self) -> set[int]:
        return {child.pid for child in psutil.Process(self.process.pid).children()}

    async def checks_served(self, index: int) -> float:
        """Health/Check calls child `index` answered, from its `/metrics`."""
        url = f"http://127.0.0.1:{self.metrics_port + index}/metrics"

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())

        text = await asyncio.to_thread(scrape)
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if _CHECKS in line)

    async def served_by(self, channel: grpc.aio.Channel) -> int:
        """The index of the child that answers on `channel` (one connection)."""
        before = [await self.checks_served(i) for i in (0, 1)]
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True
        )
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        after = [await self.checks_served(i) for i in (0, 1)]
        grown = [i for i in (0, 1) if after[i] > before[i]]
        assert len(grown) == 1, (before, after)
        return grown[0]

    def channel(self) -> grpc.aio.Channel:
        # A subchannel pool of its own: a new connection, not one shared with other channels.
        return grpc.aio.insecure_channel(
            f"127.0.0.1:{self.port}", options=[("grpc.use_local_subchannel_pool", 1)]
        )

    async def channel_to(self, index: int) -> grpc.aio.Channel:
        """A channel whose connection child `index` accepted."""
        for _ in range(_TRIES):
            channel = self.channel()
            if await self.served_by(channel) == index:
                return channel
            await channel.close()
        raise AssertionError(f"no connection reached child {index} in {_TRIES} tries")

    async def children_seen(self) -> set[int]:
        """The children that answered fresh connections, until both did (or _TRIES)."""
        seen: set[int] = set()
        for _ in range(_TRIES):
            async with self.channel() as channel:
                seen.add(await self.served_by(channel))
            if seen == {0, 1}:
                break
        return seen


async def _gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped holds no socket either)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
async def namespace(settings: Settings, nc: nats.NATS) -> AsyncIterator[str]:
    """A NATS namespace of its own: the children's consumers take nobody else's messages."""
    name = f"{settings.nats_namespace}fork"
    yield name
    js = nc.jetstream()
    subjects = Subjects(name)
    for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
        with contextlib.suppress(Exception):
            await js.delete_stream(stream)


def _env(settings: Settings, namespace: str, *, port: int, metrics_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_NATS_URL": settings.nats_url,
        "RAVEN_NATS_NAMESPACE": namespace,
        "RAVEN_ARTIFACT_ROOT": str(settings.artifact_root),
        "RAVEN_TRAINING_RUNS_ADDR": f"127.0.0.1:{port}",
        "RAVEN_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
        "RAVEN_GRPC_PROCESSES": "2",
        "RAVEN_INSECURE_DEV": "true",
        "RAVEN_LOG_JSON": "true",
    }


@pytest.fixture
async def forked(
    settings: Settings, namespace: str, tmp_path: Path, dataset_uri: str
) -> AsyncIterator[Forked]:
    """`python -m services.training_runs.main` with two processes, both serving."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    metrics_port = _free_port_pair()
    env = _env(settings, namespace, port=port, metrics_port=metrics_port)
    log_path = tmp_path / "service.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.training_runs.main", env=env, stdout=log, stderr=log
        )
    service = Forked(process, port, metrics_port, log_path)
    try:

        async def both_serving() -> bool:
            assert process.returncode is None, service.log()[-3000:]
            return len(service.serving()) == 2

        await eventually(both_serving, timeout=60)
        yield service
    finally:
        if process.returncode is None:
            for pid in service.children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            await process.wait()
        print(f"--- service.log\n{service.log()[-4000:]}")


async def test_both_processes_answer_on_the_one_port(forked: Forked) -> None:
    pids = forked.serving()
    assert len(set(pids.values())) == 2
    assert set(pids.values()) == forked.children()
    assert await forked.children_seen() == {0, 1}


async def test_watchers_on_either_process_see_what_the_other_and_the_workers_caused(
    forked: Forked, nc: nats.NATS, namespace: str, dataset_uri: str
) -> None:
    lead, other = await forked.channel_to(0), await forked.channel_to(1)
    on_lead = training_run_pb2_grpc.TrainingRunServiceStub(lead)
    on_other = training_run_pb2_grpc.TrainingRunServiceStub(other)
    try:
        run = await on_other.CreateTrainingRun(create_request(dataset_uri))

        async def watch(stub: training_run_pb2_grpc.TrainingRunServiceStub) -> list[int]:
            request = training_run_pb2.WatchTrainingRunRequest(name=run.name)
            return [e.sequence async for e in stub.WatchTrainingRun(request)]

        watchers = [asyncio.create_task(watch(on_lead)), asyncio.create_task(watch(on_other))]
        await asyncio.sleep(0.2)
        # The reports are applied by child 0 (the consumer runs there); the cancel goes
        # through child 1.
        worker = WorkerDriver(nc.jetstream(), Subjects(namespace), run)
        await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
        for iteration in range(1, 4):
            await worker.send(progress=training_run_pb2.Progress(epoch=1, iteration=iteration))

        async def running() -> bool:
            got = await on_other.GetTrainingRun(
                training_run_pb2.GetTrainingRunRequest(name=run.name)
            )
            return got.state == TrainingRun.RUNNING and got.progress.iteration == 3

        await eventually(running)
        await on_other.CancelTrainingRun(
            training_run_pb2.CancelTrainingRunRequest(name=run.name, reason="enough")
        )
        await worker.send(cancelled=worker_pb2.WorkerEvent.Cancelled())
        # Well within the watchers' 30 s idle check: what they saw came live through each
        # child's own NATS subscription, not from a replay after a silence.
        seen = await asyncio.wait_for(asyncio.gather(*watchers), 20)
        page = await on_lead.ListTrainingRunEvents(
            training_run_pb2.ListTrainingRunEventsRequest(name=run.name, page_size=100)
        )
        history = [e.sequence for e in page.events]
        assert page.events[-1].state_changed.to_state == TrainingRun.CANCELLED
        assert seen == [history, history]
    finally:
        await lead.close()
        await other.close()


async def test_a_page_token_of_one_child_is_good_on_the_other(
    forked: Forked, dataset_uri: str
) -> None:
    # Without RAVEN_PAGE_TOKEN_KEYS each process signs with a random key: the children
    # share the parent's (shared/prefork.py).
    lead, other = await forked.channel_to(0), await forked.channel_to(1)
    try:
        on_lead = training_run_pb2_grpc.TrainingRunServiceStub(lead)
        on_other = training_run_pb2_grpc.TrainingRunServiceStub(other)
        for _ in range(2):
            await on_lead.CreateTrainingRun(create_request(dataset_uri))
        first = await on_lead.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(page_size=1)
        )
        assert first.next_page_token
        second = await on_other.ListTrainingRuns(
            training_run_pb2.ListTrainingRunsRequest(page_size=1, page_token=first.next_page_token)
        )
        assert len(second.training_runs) == 1
        assert second.training_runs[0].name != first.training_runs[0].name
    finally:
        await lead.close()
        await other.close()


async def test_a_child_that_dies_is_replaced_while_the_other_answers(
    forked: Forked, nc: nats.NATS, namespace: str, dataset_uri: str
) -> None:
    for index in (1, 0):
        killed = forked.serving()[index]
        os.kill(killed, signal.SIGKILL)
        await eventually(lambda pid=killed: _gone(pid))
        # A connection that reaches a child as it leaves or joins the port can be reset
        # (docs/scaling.md): a client that retries (wait_for_ready) is answered throughout.
        for _ in range(5):
            async with forked.channel() as channel:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True
                )
            assert response.status == health_pb2.HealthCheckResponse.SERVING

        async def replaced(index: int = index, killed: int = killed) -> bool:
            return forked.serving().get(index, killed) != killed

        await eventually(replaced, timeout=60)
        assert forked.process.returncode is None
        assert await forked.children_seen() == {0, 1}
    # The new child 0 runs the consumer of the workers' reports again.
    async with forked.channel() as channel:
        runs = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        run = await runs.CreateTrainingRun(create_request(dataset_uri))
        await WorkerDriver(nc.jetstream(), Subjects(namespace), run).send(
            preparing=worker_pb2.WorkerEvent.Preparing()
        )

        async def preparing() -> bool:
            got = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
            return got.state == TrainingRun.PREPARING

        await eventually(preparing)
    assert "service process died" in forked.log()


async def test_sigterm_on_the_parent_stops_every_child_cleanly(forked: Forked) -> None:
    children = forked.children()
    assert len(children) == 2
    forked.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(forked.process.wait(), 60) == 0, forked.log()[-3000:]
    assert not [pid for pid in children if psutil.pid_exists(pid)]
    log = forked.log()
    assert "Traceback" not in log
    assert '"exit_code": 0' in log and "service processes stopped" in log
    # Nothing holds the port any more: a socket without SO_REUSEPORT binds it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", forked.port))


async def test_children_that_keep_dying_stop_the_parent_with_an_error(
    settings: Settings, namespace: str, tmp_path: Path
) -> None:
    metrics_port = _free_port_pair()
    log_path = tmp_path / "service.log"
    # Child 1's metrics port is taken: it can never start.
    with socket.socket() as taken, log_path.open("wb") as log:
        taken.bind(("127.0.0.1", metrics_port + 1))
        taken.listen()
        env = _env(settings, namespace, port=0, metrics_port=metrics_port)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.training_runs.main", env=env, stdout=log, stderr=log
        )
        try:
            code = await asyncio.wait_for(process.wait(), 90)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    text = log_path.read_text(errors="replace")
    assert code == 1, text[-3000:]
    assert "service processes keep dying; stopping" in text
    assert "address already in use" in text.lower(), "the child's reason is logged"
    assert text.count('"event": "service process died"') == 6
    assert "service processes stopped" in text


def test_the_reserved_port_admits_reuseport_listeners_only() -> None:
    with reserve_port("127.0.0.1:0") as reserved:
        port = reserved.getsockname()[1]
        with socket.socket() as sharing:
            sharing.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sharing.bind(("127.0.0.1", port))
            sharing.listen()
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port))
            except OSError:
                pass
            else:
                raise AssertionError("a socket without SO_REUSEPORT took the reserved port")
