"""The supervisor of a process's background loops: a loop that dies fails the process,
stopping ends every loop (also one that loses a cancellation)."""

from __future__ import annotations

import asyncio

import pytest

from shared.process import Loop, Supervisor

pytestmark = pytest.mark.timeout(10)


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_loop_that_raises_fails_the_process_and_stops_the_others() -> None:
    async def breaks() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("disk on fire")

    other = asyncio.Event()

    async def watched() -> None:
        try:
            await _forever()
        except asyncio.CancelledError:
            other.set()
            raise

    supervisor = Supervisor()
    supervisor.start([Loop("relay", breaks()), Loop("consumer", watched())])
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    assert supervisor.reason == "relay failed: RuntimeError: disk on fire"
    await asyncio.wait_for(other.wait(), 5)
    await supervisor.stop()


async def test_a_loop_that_ends_fails_the_process_unless_it_is_a_one_off() -> None:
    async def done() -> None:
        await asyncio.sleep(0)

    supervisor = Supervisor()
    supervisor.start([Loop("sweep", done(), ends=True), Loop("consumer", _forever())])
    await asyncio.sleep(0.05)
    assert not supervisor.failed.is_set()
    await supervisor.stop()

    supervisor = Supervisor()
    supervisor.start([Loop("consumer", done())])
    await asyncio.wait_for(supervisor.failed.wait(), 5)
    assert supervisor.reason == "consumer ended"
    await supervisor.stop()


async def test_stopping_ends_a_loop_that_lost_its_first_cancellation() -> None:
    ended = asyncio.Event()

    async def stubborn() -> None:
        try:
            await _forever()
        except asyncio.CancelledError:
            pass  # Lost, as asyncio.wait_for can lose one in Python 3.11.
        try:
            await _forever()
        finally:
            ended.set()

    supervisor = Supervisor()
    supervisor.start([Loop("consumer", stubborn())])
    await asyncio.sleep(0)
    await asyncio.wait_for(supervisor.stop(), 5)
    assert ended.is_set() and not supervisor.failed.is_set()


async def test_a_graceful_stop_waits_for_the_loops_to_end() -> None:
    shutdown = asyncio.Event()

    async def until_shutdown() -> None:
        await shutdown.wait()

    supervisor = Supervisor()
    supervisor.start([Loop("jobs", until_shutdown())])
    await asyncio.sleep(0)
    supervisor.stopping()
    shutdown.set()
    await asyncio.wait_for(supervisor.stop(cancel=False), 5)
    assert not supervisor.failed.is_set()
