"""The system under measurement: a scratch database and NATS namespace on the real
Postgres and NATS, both services as their own processes, and the process helpers
the figures share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import nats
import psutil
from nats.aio.client import Client as NATS

from benchmarks.profiles import profiled
from shared.infra import create_database, drop_database, ensure_infrastructure
from shared.messaging import Subjects, ensure_streams
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(slots=True)
class Child:
    """A process the benchmark started, with its log file."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_bytes(self) -> int:
        """Of the process and its children (a service with several processes)."""
        process = psutil.Process(self.pid)
        return sum(int(p.memory_info().rss) for p in (process, *process.children(recursive=True)))

    async def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def spawn(name: str, args: list[str], *, env: Mapping[str, str], log_dir: Path) -> Child:
    """`python ARGS` from the repository root, its output in `log_dir/NAME.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before a spawn)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log
        )
    return Child(name, process, log_path)


async def wait_for_grpc(child: Child, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        while True:
            if child.process.returncode is not None:
                tail = child.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{child.name} exited ({child.process.returncode}):\n{tail}")
            try:
                await asyncio.wait_for(channel.channel_ready(), 1.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} did not listen on {port}") from None


async def wait_for_processes(child: Child, count: int, timeout_s: float = 60.0) -> None:
    """Until `count` processes of a service log `serving`: connections opened before would
    all go to the processes already listening."""
    deadline = time.monotonic() + timeout_s
    while child.log_path.read_text(errors="replace").count('"event": "serving"') < count:
        if child.process.returncode is not None or time.monotonic() > deadline:
            tail = child.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{child.name}: fewer than {count} processes serve:\n{tail}")
        await asyncio.sleep(0.1)


@dataclass(slots=True)
class Stack:
    settings: Settings
    subjects: Subjects
    admin_database_url: str
    database_name: str
    work_dir: Path
    nc: NATS
    children: dict[str, Child] = field(default_factory=dict)
    # Processes of each service on its port (RAVEN_GRPC_PROCESSES), and the connections the
    # unary load spreads its callers over (SO_REUSEPORT hands each to one process).
    processes: int = 1
    connections: int = 1
    # Where figures profile TrainingRunService (benchmarks.profiles); None: not profiled.
    profile_dir: Path | None = None

    def profiled(
        self, figure: str, *, when: bool = True
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Samples TrainingRunService's processes while the body runs, with --profile (and
        `when`)."""
        folder = self.profile_dir if when else None
        return profiled(self.children["training_runs"].pid, folder, figure)

    @property
    def runs_port(self) -> int:
        return int(self.settings.training_runs_addr.rsplit(":", 1)[1])

    @property
    def artifact_root(self) -> Path:
        return self.settings.resolved_artifact_root()

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            "RAVEN_DATABASE_URL": s.database_url,
            "RAVEN_NATS_URL": s.nats_url,
            "RAVEN_NATS_NAMESPACE": s.nats_namespace,
            "RAVEN_ARTIFACT_ROOT": str(self.artifact_root),
            "RAVEN_TRAINING_RUNS_ADDR": s.training_runs_addr,
            "RAVEN_TRAINED_MODELS_ADDR": s.trained_models_addr,
            "RAVEN_PAGE_TOKEN_KEYS": s.page_token_keys,
            "RAVEN_GRPC_PROCESSES": str(self.processes),
            "RAVEN_LOG_JSON": "true",
            # A free port per process: fixed ones would collide between the services.
            "RAVEN_METRICS_ADDR": "127.0.0.1:0",
            # Runs driven by the benchmark report progress but no heartbeat.
            "RAVEN_WORKER_LOST_TIMEOUT_S": "86400",
            "RAVEN_WORKER_DEVICE": "cpu",
            "RAVEN_WORKER_ID": "bench-worker",
            # Plaintext on loopback; every caller is the development identity.
            "RAVEN_INSECURE_DEV": "true",
        }

    async def start_services(self) -> None:
        """Starts TrainingRunService, then TrainedModelService (one migrates, one waits)."""
        for name, module, addr in (
            ("training_runs", "services.training_runs.main", self.settings.training_runs_addr),
            ("trained_models", "services.trained_models.main", self.settings.trained_models_addr),
        ):
            child = await spawn(name, ["-m", module], env=self.env(), log_dir=self.log_dir)
            self.children[name] = child
            await wait_for_grpc(child, int(addr.rsplit(":", 1)[1]))
            await wait_for_processes(child, self.processes)

    async def start_worker(self, timeout_s: float = 120.0) -> Child:
        """A trainer worker, once it consumes jobs: a fleet's workers are running before a
        run is created, so no figure counts a worker's start."""
        child = await spawn(
            "trainer_worker", ["-m", "trainer_worker"], env=self.env(), log_dir=self.log_dir
        )
        self.children["trainer_worker"] = child
        deadline = time.monotonic() + timeout_s
        while '"trainer worker ready"' not in child.log_path.read_text(errors="replace"):
            if child.process.returncode is not None or time.monotonic() > deadline:
                tail = child.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the trainer worker did not start:\n{tail}")
            await asyncio.sleep(0.1)
        return child

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"

    def runs_channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"127.0.0.1:{self.runs_port}")

    def channels(self, port: int) -> list[grpc.aio.Channel]:
        """`connections` channels to `port`, each with a connection of its own."""
        options = [("grpc.use_local_subchannel_pool", 1)] if self.connections > 1 else []
        return [
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
            for _ in range(self.connections)
        ]


@contextlib.asynccontextmanager
async def open_stack(
    work_dir: Path,
    *,
    processes: int = 1,
    connections: int = 1,
    profile_dir: Path | None = None,
) -> AsyncIterator[Stack]:
    """A stack of its own; everything it created is removed on exit."""
    infra = ensure_infrastructure(Settings(), work_dir / "infra", keep_running=False)
    suffix = uuid.uuid4().hex[:10]
    database = f"raven_bench_{suffix}"
    url = await asyncio.to_thread(create_database, infra.database_url, database)
    settings = Settings(
        database_url=url,
        nats_url=infra.nats_url,
        nats_namespace=f"bench{suffix}",
        artifact_root=work_dir / f"artifacts-{suffix}",
        training_runs_addr=f"127.0.0.1:{free_port()}",
        trained_models_addr=f"127.0.0.1:{free_port()}",
        # Shared with the services: the deep-page benchmark signs its own token.
        page_token_keys=secrets.token_urlsafe(32),
    )
    subjects = Subjects(settings.nats_namespace)
    nc = await nats.connect(infra.nats_url, name="raven-bench")
    await ensure_streams(nc.jetstream(), subjects)
    stack = Stack(
        settings,
        subjects,
        infra.database_url,
        database,
        work_dir,
        nc,
        processes=processes,
        connections=connections,
        profile_dir=profile_dir,
    )
    try:
        yield stack
    finally:
        for child in reversed(list(stack.children.values())):
            await child.stop()
        js = nc.jetstream()
        for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
            with contextlib.suppress(Exception):
                await js.delete_stream(stream)
        await nc.close()
        await asyncio.to_thread(drop_database, infra.database_url, database)

        shutil.rmtree(settings.artifact_root, ignore_errors=True)
