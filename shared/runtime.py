"""The life of a service process: connect, migrate, serve, run background loops, stop in order.

Each service subclasses `ServiceApp` and says what it adds (servicers,
consumers); its `main.py` stays a composition root of a few lines. The process
around it (logging, signals, exit status) is `shared.process`; with
RAVEN_GRPC_PROCESSES above 1, `shared.prefork` runs several such processes on one
port. Tests run the same object in-process on port 0.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared import messaging, pagination, prefork
from shared.auth import transport
from shared.auth.admission import build_admission
from shared.auth.audit import AuditLog
from shared.auth.audit_service import SERVICE_NAME as AUDIT_SERVICE
from shared.auth.audit_service import AuditServicer
from shared.db.engine import create_engine, read_session_factory, session_factory
from shared.db.migrate import upgrade
from shared.grpc_server import Server
from shared.observability.metrics_addresses import TRAINING_RUNS_METRICS_ADDR, metrics_address
from shared.observability.service_metrics import ServiceMetrics
from shared.outbox import OutboxRelay, Wakeup
from shared.process import Loop, Supervisor, run_process
from shared.proto.raven.training.v1 import audit_pb2_grpc
from shared.retention import RetentionJob, RetentionPolicy
from shared.settings import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Wiring:
    """What a service's `setup` builds on: the server and the connections of the process."""

    server: Server
    sessions: async_sessionmaker[AsyncSession]
    read_sessions: async_sessionmaker[AsyncSession]
    nc: NATS
    js: JetStreamContext
    # For reads that go to the driver's connection (services.training_runs.reads).
    engine: AsyncEngine
    # What units of work wake the outbox relay with, after their commits.
    wakeup: Wakeup


class ServiceApp:
    service_names: Sequence[str] = ()
    client_name = "raven"
    # The Settings field with this service's listen address.
    address_setting = ""
    # Where `/metrics` is served when RAVEN_METRICS_ADDR is unset.
    metrics_default = TRAINING_RUNS_METRICS_ADDR

    def __init__(self, settings: Settings, *, child: prefork.Child | None = None) -> None:
        self.settings = settings
        # One of several processes on one port (shared/prefork.py); None: the only one.
        self.child = child
        self.subjects = messaging.Subjects(settings.nats_namespace)
        self.port = 0
        # The process's series; `setup` adds the service's own. The port `/metrics` is
        # served on once started (0: metrics off).
        self.metrics = ServiceMetrics()
        self.metrics_port = 0
        self.supervisor = Supervisor()
        self._engine: AsyncEngine | None = None
        self._nc: NATS | None = None
        self._server: Server | None = None
        self._wakeup: Wakeup | None = None
        self._set_up = False

    def address(self) -> str:
        return str(getattr(self.settings, self.address_setting))

    async def setup(self, wiring: Wiring) -> list[Loop]:
        """Registers servicers on `wiring.server`; returns the background loops to run."""
        raise NotImplementedError

    async def teardown(self) -> None:
        """Releases what `setup` acquired, after the server and loops stopped."""

    async def start(self) -> None:
        # Refuse a bad transport configuration before touching anything else.
        credentials = transport.server_credentials(self.settings, self.address())
        pagination.use_keys(self.settings.page_token_key_list())
        self._engine = create_engine(self.settings.database_url)
        await upgrade(self._engine)
        self._nc = await messaging.connect(
            self.settings.nats_url,
            name=self.client_name,
            security=messaging.NatsSecurity.from_settings(self.settings),
        )
        js = self._nc.jetstream()
        await messaging.ensure_streams(js, self.subjects)
        sessions = session_factory(self._engine)
        self._wakeup = Wakeup(self._engine)
        self.read_sessions = read_session_factory(self._engine)
        audit = AuditLog(sessions, self.subjects)
        self._server = Server(
            (*self.service_names, AUDIT_SERVICE),
            admission=build_admission(self.settings, audit),
            metrics=self.metrics.rpc,
            share_port=self.child is not None,
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit), self._server.server)
        loops = await self.setup(
            Wiring(
                self._server,
                sessions,
                self.read_sessions,
                self._nc,
                js,
                self._engine,
                self._wakeup,
            )
        )
        self._set_up = True
        self.supervisor.start(self._background(loops, self._engine, js))
        self.port = self._server.listen(self.address(), credentials)
        await self._server.start()
        metrics_at = metrics_address(self.settings.metrics_addr, self.metrics_default)
        if metrics_at is not None:
            self.metrics.watch_outbox(self._engine)
            self.metrics_port = await self.metrics.server.start(metrics_at)
        log.info(
            "serving",
            services=list(self.service_names),
            address=self.address(),
            port=self.port,
            pid=os.getpid(),
            process=0 if self.child is None else self.child.index,
        )

    def _background(
        self, loops: list[Loop], engine: AsyncEngine, js: JetStreamContext
    ) -> list[Loop]:
        """The service's loops, the outbox relay and retention; with several processes on the
        port, in one of them only (shared/prefork.py), and every child watches its parent."""
        watch = (
            [] if self.child is None else [Loop("watch of the parent", self.child.watch_parent())]
        )
        if self.child is not None and not self.child.runs_background_loops:
            for loop in loops:
                loop.run.close()  # never started: child 0 runs them
            return watch
        relay = OutboxRelay(
            engine=engine, js=js, max_payload=self._nc.max_payload if self._nc else None
        )
        # One process at a time prunes old rows and work files (shared/retention.py).
        retention = RetentionJob(
            engine=engine,
            policy=RetentionPolicy.from_settings(self.settings),
            artifact_root=self.settings.resolved_artifact_root(),
            interval_s=self.settings.retention_interval_s,
        )
        return [
            *loops,
            Loop("outbox relay", relay.run()),
            Loop("retention", retention.run()),
            *watch,
        ]

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.metrics.server.stop()
        if self._server is not None:
            await self._server.stop(grace_s)
        await self.supervisor.stop()
        if self._set_up:
            await self.teardown()
        if self._wakeup is not None:
            await self._wakeup.close()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._engine is not None:
            await self._engine.dispose()


def run_service(app: type[ServiceApp]) -> None:
    """Entry point of a service process: serve until SIGTERM; exit 1 when a loop died.
    With RAVEN_GRPC_PROCESSES above 1, that many processes share the port."""
    settings = Settings()
    if settings.grpc_processes > 1:
        prefork.serve(app, settings)
    else:
        run_process(app, settings=settings)
