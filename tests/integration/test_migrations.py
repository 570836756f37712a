"""The migrations build the schema the code declares (shared/db/schema.py), and the newest
one can be undone and redone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import create_engine
from shared.db.migrate import alembic_config, upgrade
from shared.db.schema import metadata
from shared.infra import Infrastructure, create_database, drop_database


@pytest.fixture
async def engine(infrastructure: Infrastructure) -> AsyncIterator[AsyncEngine]:
    name = f"raven_migrations_{uuid.uuid4().hex[:10]}"
    engine = create_engine(create_database(infrastructure.database_url, name), pool_size=1)
    yield engine
    await engine.dispose()
    drop_database(infrastructure.database_url, name)


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


def _step(connection: Connection, direction: str, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    getattr(command, direction)(config, revision)


async def test_the_migrated_database_is_the_declared_schema(engine: AsyncEngine) -> None:
    await upgrade(engine)
    async with engine.connect() as connection:
        differences = await connection.run_sync(_differences)
    assert differences == []


async def test_the_newest_migration_undoes_and_redoes(engine: AsyncEngine) -> None:
    await upgrade(engine)
    async with engine.begin() as connection:
        await connection.run_sync(_step, "downgrade", "-1")
        assert await connection.run_sync(_differences) != []
        await connection.run_sync(_step, "upgrade", "head")
    async with engine.connect() as connection:
        assert await connection.run_sync(_differences) == []
