"""The life of every process of the backbone (both services and the trainer worker).

`run_process` configures logging, starts the process's `Service`, waits for SIGTERM
or SIGINT or for a background loop to die, stops the service in order, and exits
non-zero with the reason logged when a loop died. `Supervisor` owns the background
loops (outbox relay, consumers, recovery) in one `asyncio.TaskGroup`: a loop that
raises, or that ends while nobody asked it to, fails the process instead of leaving
it serving half of its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from shared import logs
from shared.observability import tracing
from shared.settings import Settings

log = structlog.get_logger(__name__)

# How long stopping waits before it cancels the loops again: Python 3.11's
# asyncio.wait_for can lose a cancellation (nats-py's fetch waits in one).
_RECANCEL_S = 1.0


@dataclass(frozen=True, slots=True)
class Loop:
    """A background coroutine of a process; `ends`: it finishes by itself (a one-off sweep)."""

    name: str
    run: Coroutine[Any, Any, None]
    ends: bool = False


class LoopDied(Exception):
    """A background loop raised, or returned while it should run until stopped."""


class Supervisor:
    """Runs `Loop`s in one TaskGroup; the first to die cancels the others and sets `failed`."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        self.failed = asyncio.Event()
        self.reason = ""

    def start(self, loops: Sequence[Loop]) -> None:
        self._task = asyncio.create_task(self._run(loops), name="supervisor")

    async def _run(self, loops: Sequence[Loop]) -> None:
        async with asyncio.TaskGroup() as group:
            self._loops = [group.create_task(self._watch(loop), name=loop.name) for loop in loops]

    async def _watch(self, loop: Loop) -> None:
        try:
            await loop.run
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if self._stopping:
                log.exception("background loop failed while stopping", loop=loop.name)
            else:
                self._fail(f"{loop.name} failed: {type(error).__name__}: {error}")
                log.exception("background loop failed; stopping the process", loop=loop.name)
            raise
        if not loop.ends and not self._stopping:
            self._fail(f"{loop.name} ended")
            log.error("background loop ended; stopping the process", loop=loop.name)
            raise LoopDied(self.reason)

    def _fail(self, reason: str) -> None:
        if not self.failed.is_set():
            self.reason = reason
            self.failed.set()

    def stopping(self) -> None:
        """From now on a loop that ends (or fails) is stopping, not dying."""
        self._stopping = True

    async def stop(self, *, cancel: bool = True) -> None:
        """Stops the loops (`cancel` False: waits for them to end by themselves)."""
        self.stopping()
        if self._task is None:
            return
        if cancel:
            self._task.cancel()
            while not self._task.done():
                await asyncio.wait({self._task}, timeout=_RECANCEL_S)
                for loop in self._loops:
                    if not loop.done():
                        loop.cancel()
        # A failure was logged when it happened.
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task


class Service(Protocol):
    supervisor: Supervisor

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


async def serve_until_signalled(service: Service) -> str:
    """Serves until SIGTERM/SIGINT (returns "") or a background loop dies (returns why)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        waits = [
            asyncio.create_task(stop.wait()),
            asyncio.create_task(service.supervisor.failed.wait()),
        ]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return service.supervisor.reason
    finally:
        await service.stop()


def run_process(
    service: Callable[[Settings], Service], *, settings: Settings | None = None
) -> None:
    """Entry point of a process: settings from the environment (unless given), one logging
    setup, serve until signalled; exits with status 1 when a background loop died."""

    async def main() -> str:
        resolved = settings or Settings()
        logs.configure(resolved.log_level, json=resolved.log_json)
        tracing.configure(str(getattr(service, "client_name", "raven")))
        return await serve_until_signalled(service(resolved))

    try:
        reason = asyncio.run(main())
    finally:
        tracing.shutdown()
    if reason:
        log.error("process stopped: a background loop died", reason=reason)
        sys.exit(1)
