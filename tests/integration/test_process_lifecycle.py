"""A service process stops, and says why, when a background loop dies; SIGTERM stops it
cleanly. Real processes, as they run in production."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator

import nats
import pytest

from shared.messaging import Subjects
from shared.settings import Settings
from tests.support import eventually

pytestmark = pytest.mark.timeout(90)

# TrainingRunService with one more background loop, which breaks after a moment.
_BREAKING_SERVICE = """
import asyncio

from services.training_runs.main import TrainingRunsApp
from shared.process import Loop
from shared.runtime import run_service


async def breaks():
    await asyncio.sleep(0.5)
    raise RuntimeError("the loop broke")


class BreakingApp(TrainingRunsApp):
    async def setup(self, wiring):
        return [*await super().setup(wiring), Loop("breaking loop", breaks())]


run_service(BreakingApp)
"""


def _env(settings: Settings, namespace: str) -> dict[str, str]:
    return {
        **os.environ,
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_NATS_URL": settings.nats_url,
        "RAVEN_NATS_NAMESPACE": namespace,
        "RAVEN_ARTIFACT_ROOT": str(settings.artifact_root),
        "RAVEN_TRAINING_RUNS_ADDR": "127.0.0.1:0",
        "RAVEN_INSECURE_DEV": "true",
    }


@pytest.fixture
async def namespace(settings: Settings, nc: nats.NATS):
    """A NATS namespace of its own: the process's consumers take nobody else's messages."""
    name = f"{settings.nats_namespace}proc"
    yield name
    js = nc.jetstream()
    subjects = Subjects(name)
    for stream in (subjects.jobs_stream, subjects.worker_events_stream, subjects.events_stream):
        try:
            await js.delete_stream(stream)
        except Exception:
            pass


@contextlib.asynccontextmanager
async def _running(code: list[str], env: dict[str, str]) -> AsyncIterator[Process]:
    """The process, killed at the end if it is still running (a failed test leaves none)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *code,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_background_loop_that_raises_stops_the_process_with_an_error(
    settings: Settings, namespace: str
) -> None:
    async with _running(["-c", _BREAKING_SERVICE], _env(settings, namespace)) as process:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    text = output.decode()
    assert process.returncode == 1, text[-3000:]
    assert "serving" in text
    assert "background loop failed; stopping the process" in text and "breaking loop" in text
    assert "process stopped: a background loop died" in text
    assert "the loop broke" in text


async def test_sigterm_stops_the_process_cleanly(settings: Settings, namespace: str) -> None:
    lines: list[str] = []
    async with _running(
        ["-m", "services.training_runs.main"], _env(settings, namespace)
    ) as process:
        assert process.stdout is not None

        async def serving() -> bool:
            line = (await process.stdout.readline()).decode()  # type: ignore[union-attr]
            lines.append(line)
            return "serving" in line or not line

        await eventually(serving, timeout=60, interval=0)
        assert "serving" in lines[-1], "".join(lines)[-3000:]
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, ("".join(lines) + output.decode())[-3000:]
