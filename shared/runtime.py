"""The life of a service process: connect, migrate, serve, run background loops, stop in order.

Each service subclasses `ServiceApp` and says what it adds (servicers,
consumers); its `main.py` stays a composition root of a few lines. The process
around it (logging, signals, exit status) is `shared.process`. Tests run the
same object in-process on port 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared import messaging, pagination
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

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
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
        relay = OutboxRelay(engine=self._engine, js=js, max_payload=self._nc.max_payload)
        # One process at a time prunes old rows and work files (shared/retention.py).
        retention = RetentionJob(
            engine=self._engine,
            policy=RetentionPolicy.from_settings(self.settings),
            artifact_root=self.settings.resolved_artifact_root(),
            interval_s=self.settings.retention_interval_s,
        )
        self.supervisor.start(
            [*loops, Loop("outbox relay", relay.run()), Loop("retention", retention.run())]
        )
        self.port = self._server.listen(self.address(), credentials)
        await self._server.start()
        metrics_at = metrics_address(self.settings.metrics_addr, self.metrics_default)
        if metrics_at is not None:
            self.metrics.watch_outbox(self._engine)
            self.metrics_port = await self.metrics.server.start(metrics_at)
        log.info(
            "serving", services=list(self.service_names), address=self.address(), port=self.port
        )

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


def run_service(app: Callable[[Settings], ServiceApp]) -> None:
    """Entry point of a service process: serve until SIGTERM; exit 1 when a loop died."""
    run_process(app)
