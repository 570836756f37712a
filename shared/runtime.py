"""The life of a service process: connect, migrate, serve, run background loops, stop in order.

Each service subclasses `ServiceApp` and says what it adds (servicers,
consumers); its `main.py` stays a composition root of a few lines. Tests run
the same object in-process on port 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared import auth, logs, messaging, pagination
from shared.auth import transport
from shared.auth.audit_service import SERVICE_NAME as AUDIT_SERVICE
from shared.auth.audit_service import AuditServicer
from shared.db.engine import create_engine, read_session_factory, session_factory
from shared.db.migrate import upgrade
from shared.grpc_server import Server
from shared.outbox import OutboxRelay
from shared.process import serve_until_signalled
from shared.proto.raven.training.v1 import audit_pb2_grpc
from shared.settings import Settings

log = structlog.get_logger(__name__)


class ServiceApp:
    service_names: Sequence[str] = ()
    client_name = "raven"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subjects = messaging.Subjects(settings.nats_namespace)
        self.port = 0
        self._engine: AsyncEngine | None = None
        self._nc: NATS | None = None
        self._server: Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def address(self) -> str:
        raise NotImplementedError

    async def setup(
        self,
        server: Server,
        sessions: async_sessionmaker[AsyncSession],
        nc: NATS,
        js: JetStreamContext,
    ) -> list[Coroutine[Any, Any, None]]:
        """Registers servicers on `server`; returns the background loops to run."""
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
        self.read_sessions = read_session_factory(self._engine)
        audit = auth.audit_log(sessions, self.subjects)
        self._server = Server(
            (*self.service_names, AUDIT_SERVICE),
            interceptors=[auth.build_interceptor(self.settings, audit)],
        )
        audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit), self._server.server)
        loops = await self.setup(self._server, sessions, self._nc, js)
        loops.append(
            OutboxRelay(engine=self._engine, js=js, max_payload=self._nc.max_payload).run()
        )
        self._tasks = [asyncio.create_task(loop) for loop in loops]
        self.port = self._server.listen(self.address(), credentials)
        await self._server.start()
        log.info(
            "serving", services=list(self.service_names), address=self.address(), port=self.port
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.teardown()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._engine is not None:
            await self._engine.dispose()


def run_service(app: Callable[[Settings], ServiceApp]) -> None:
    """Entry point of a service process: settings from the environment, serve until SIGTERM."""

    async def main() -> None:
        settings = Settings()
        logs.configure(settings.log_level, json=settings.log_json)
        await serve_until_signalled(app(settings))

    asyncio.run(main())
