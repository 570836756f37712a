"""ensure_infrastructure both ways: servers that answer are used, else embedded ones start."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from shared.db.engine import create_engine
from shared.infra import (
    Infrastructure,
    NatsUnusable,
    create_database,
    drop_database,
    embedded_status,
    ensure_infrastructure,
    stop_embedded,
)
from shared.infra import nats as infra_nats
from shared.infra import postgres as infra_postgres
from shared.infra.postgres import connect_kwargs
from shared.settings import Settings
from tests.support import jetstream_round_trip

pytestmark = pytest.mark.timeout(90)

# Port 1 is never served here: "nothing reachable".
UNREACHABLE = Settings(
    database_url="postgresql+asyncpg://postgres@127.0.0.1:1/raven_infra",
    nats_url="nats://127.0.0.1:1",
)
REPO = Path(__file__).resolve().parents[2]


async def _select_one(database_url: str) -> tuple[str, int]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as connection:
            row = (await connection.execute(text("SELECT current_database(), 1"))).one()
            return row[0], row[1]
    finally:
        await engine.dispose()


async def test_configured_servers_are_used_when_they_answer(tmp_path: Path) -> None:
    defaults = Settings()
    if not infra_postgres.is_reachable(defaults.database_url) or not infra_nats.is_reachable(
        defaults.nats_url
    ):
        pytest.skip("no Postgres/NATS on the configured addresses; the embedded test covers this")
    name = f"raven_infra_{uuid.uuid4().hex[:12]}"
    settings = Settings(database_url=infra_postgres.with_database(defaults.database_url, name))

    infra = ensure_infrastructure(settings, tmp_path, keep_running=False)
    try:
        assert infra == Infrastructure(
            database_url=settings.database_url, nats_url=settings.nats_url, embedded=()
        )
        # The database named in the URL did not exist and was created.
        assert await _select_one(infra.database_url) == (name, 1)
        assert await jetstream_round_trip(infra.nats_url, stream="INFRA_TEST") == 1
        assert not (tmp_path / "postgres").exists()
    finally:
        drop_database(infra.database_url, name)


async def test_embedded_servers_start_when_nothing_answers(tmp_path: Path) -> None:
    try:
        infra = ensure_infrastructure(UNREACHABLE, tmp_path, keep_running=True)
        assert infra.embedded == ("postgres", "nats")
        assert infra.database_url.startswith("postgresql+asyncpg://postgres@/raven_infra?host=/")
        assert await _select_one(infra.database_url) == ("raven_infra", 1)
        assert await jetstream_round_trip(infra.nats_url, stream="INFRA_TEST") == 1

        # Idempotent: a second call finds the running servers.
        assert ensure_infrastructure(UNREACHABLE, tmp_path, keep_running=True) == infra
        # Settings that point at the embedded NATS (a second `stack up` when it took the
        # configured port) still find it embedded, not configured.
        pointed = UNREACHABLE.model_copy(update={"nats_url": infra.nats_url})
        assert ensure_infrastructure(pointed, tmp_path, keep_running=True).embedded == (
            "postgres",
            "nats",
        )

        scratch = create_database(infra.database_url, "raven_scratch")
        assert await _select_one(scratch) == ("raven_scratch", 1)
        drop_database(infra.database_url, "raven_scratch")
        with pytest.raises(asyncpg.InvalidCatalogNameError):
            await asyncpg.connect(**connect_kwargs(scratch))
    finally:
        stopped = stop_embedded(tmp_path)
    assert set(stopped) == {"postgres", "nats"}
    assert embedded_status(tmp_path) == {"postgres": None, "nats": None}


def test_embedded_servers_stop_at_exit_without_keep_running(tmp_path: Path) -> None:
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from shared.infra import ensure_infrastructure, embedded_status\n"
        "from shared.settings import Settings\n"
        f"settings = Settings(database_url={UNREACHABLE.database_url!r},"
        f" nats_url={UNREACHABLE.nats_url!r})\n"
        "infra = ensure_infrastructure(settings, Path(sys.argv[1]), keep_running=False)\n"
        "print(json.dumps(embedded_status(Path(sys.argv[1]))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pids = json.loads(result.stdout.strip().splitlines()[-1])
    assert pids["postgres"] and pids["nats"]
    assert embedded_status(tmp_path) == {"postgres": None, "nats": None}


def test_nats_without_jetstream_is_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(infra_nats.binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"nats://127.0.0.1:{port}"
        deadline = time.monotonic() + 10
        while infra_nats.server_info(url) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(NatsUnusable, match="JetStream"):
            infra_nats.is_reachable(url)
    finally:
        server.terminate()
        server.wait(10)
