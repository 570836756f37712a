"""Which dependency an exception says is down: Postgres, NATS, or none.

A call that fails because the database or the message bus cannot be reached is
not a bug of ours: the caller is told UNAVAILABLE and to retry. Everything else
stays an internal error. The exception's cause chain is searched, since the
database drivers wrap the socket error they met.
"""

from __future__ import annotations

import asyncpg
import nats.errors
import nats.js.errors
import sqlalchemy.exc

DATABASE = "the database"
MESSAGE_BUS = "the message bus"

# Raised when a connection to Postgres is refused, lost or not yet accepted (startup,
# recovery, shutdown): sqlalchemy wraps asyncpg's, which wrap the OS's.
_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
    # The pool waited for a connection that never came back.
    sqlalchemy.exc.TimeoutError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)
_NATS_ERRORS: tuple[type[BaseException], ...] = (
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.ConnectionDrainingError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
# Packages whose frames, when an OSError is raised through them, mean a server of theirs.
_DATABASE_MODULES = ("asyncpg", "sqlalchemy")
_NATS_MODULES = ("nats",)
_CHAIN_LIMIT = 8


def unavailable_dependency(error: BaseException) -> str | None:
    """DATABASE or MESSAGE_BUS when `error` (or what caused it) says that server cannot be
    reached; None for everything else."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < _CHAIN_LIMIT:
        seen.add(id(current))
        found = _classify(current)
        if found is not None:
            return found
        current = current.__cause__ or current.__context__
    return None


def _classify(error: BaseException) -> str | None:
    if isinstance(error, sqlalchemy.exc.DBAPIError) and error.connection_invalidated:
        return DATABASE
    if isinstance(error, _DATABASE_ERRORS):
        return DATABASE
    if isinstance(error, _NATS_ERRORS):
        return MESSAGE_BUS
    if isinstance(error, (OSError, TimeoutError)):
        # A refused or reset socket, or a connect that timed out: whose socket it was
        # shows in where it was raised.
        return _raised_in(error)
    return None


def _raised_in(error: BaseException) -> str | None:
    traceback = error.__traceback__
    found: str | None = None
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", "")).split(".", 1)[0]
        if module in _DATABASE_MODULES:
            found = DATABASE
        elif module in _NATS_MODULES:
            found = MESSAGE_BUS
        traceback = traceback.tb_next
    return found
