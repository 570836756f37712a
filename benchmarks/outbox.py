"""Figure 3: the transactional outbox. Time from a commit to JetStream's ack of the
relayed message (against a bare JetStream publish round trip), and the relay's
throughput draining a backlog (against bare pipelined JetStream publishes).

Runs on a scratch database of its own with one relay (this process's), so the
services' relays do not take part.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from nats.js import JetStreamContext
from sqlalchemy import text

from benchmarks.plan import Plan
from benchmarks.stack import Stack
from benchmarks.stats import Results
from shared import outbox
from shared.db.engine import create_engine, session_factory
from shared.db.migrate import upgrade
from shared.infra import create_database, drop_database

_BATCH = 256  # OutboxRelay's default batch
_PAYLOAD = b"x" * 200

_BACKLOG = text(
    """
    INSERT INTO outbox (subject, msg_id, payload)
    SELECT :subject, :prefix || g, :payload FROM generate_series(1, :n) AS g
    """
)


class AckClock:
    """A JetStream context for OutboxRelay that notes when each publish is acked."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js
        self.acked: dict[str, float] = {}
        self._waiters: dict[str, asyncio.Future[float]] = {}

    async def publish(self, subject: str, payload: bytes, **kwargs: Any) -> Any:
        ack = await self._js.publish(subject, payload, **kwargs)
        msg_id = kwargs.get("headers", {}).get("Nats-Msg-Id", "")
        now = time.perf_counter()
        waiter = self._waiters.pop(msg_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(now)
        return ack

    def wait_for(self, msg_id: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = future
        return future


@contextlib.asynccontextmanager
async def _scratch_database(stack: Stack) -> AsyncIterator[str]:
    name = f"{stack.database_name}_outbox"
    url = await asyncio.to_thread(create_database, stack.admin_database_url, name)
    try:
        yield url
    finally:
        await asyncio.to_thread(drop_database, stack.admin_database_url, name)


async def measure_outbox(stack: Stack, plan: Plan, results: Results) -> None:
    js = stack.nc.jetstream()
    subject = stack.subjects.run_lifecycle("bench_outbox")
    async with _scratch_database(stack) as url:
        engine = create_engine(url, pool_size=2)
        try:
            await upgrade(engine)
            sessions = session_factory(engine)
            clock = AckClock(js)
            relay = outbox.OutboxRelay(engine=engine, js=clock)  # type: ignore[arg-type]
            relay_task = asyncio.create_task(relay.run())
            try:
                await asyncio.sleep(0.2)  # listening for NOTIFY
                for _ in range(plan.rounds):
                    bare = []
                    for _ in range(plan.outbox_samples):
                        began = time.perf_counter()
                        await js.publish(
                            subject, _PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex}
                        )
                        bare.append(time.perf_counter() - began)
                    results.add_latencies(
                        "outbox.bare_publish_ack",
                        bare,
                        description="bare JetStream publish -> ack (baseline)",
                        baseline=None,
                    )
                    relayed = []
                    for _ in range(plan.outbox_samples):
                        msg_id = uuid.uuid4().hex
                        acked = clock.wait_for(msg_id)
                        async with sessions() as session, session.begin():
                            await outbox.add(
                                session, [outbox.OutboxMessage(subject, _PAYLOAD, msg_id)]
                            )
                        committed = time.perf_counter()
                        relayed.append(await asyncio.wait_for(acked, 30) - committed)
                    results.add_latencies(
                        "outbox.commit_to_ack",
                        relayed,
                        description="outbox commit -> relay publishes -> JetStream ack",
                        baseline="outbox.bare_publish_ack",
                    )
            finally:
                relay_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await relay_task
            for r in range(plan.outbox_rounds):
                await _throughput_round(stack, plan, results, engine, js, subject, r)
        finally:
            await engine.dispose()


async def _throughput_round(
    stack: Stack,
    plan: Plan,
    results: Results,
    engine: Any,
    js: JetStreamContext,
    subject: str,
    round_: int,
) -> None:
    n = plan.outbox_backlog
    relay = outbox.OutboxRelay(engine=engine, js=js)
    while await relay.publish_pending():
        pass  # what the latency rounds left behind
    began = time.perf_counter()
    for start in range(0, n, _BATCH):
        await asyncio.gather(
            *(
                js.publish(subject, _PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})
                for _ in range(min(_BATCH, n - start))
            )
        )
    results.add(
        "outbox.bare_publish_rate",
        n / (time.perf_counter() - began),
        unit="msgs/s",
        description=f"bare JetStream publishes, pipelined {_BATCH} at a time (baseline)",
        lower_is_better=False,
    )
    async with engine.begin() as connection:
        await connection.execute(
            _BACKLOG,
            {
                "subject": subject,
                "prefix": f"{uuid.uuid4().hex}-{round_}-",
                "payload": _PAYLOAD,
                "n": n,
            },
        )
    began = time.perf_counter()
    drained = 0
    while published := await relay.publish_pending():
        drained += published
    elapsed = time.perf_counter() - began
    assert drained == n, f"relayed {drained} of {n}"
    results.add(
        "outbox.relay_rate",
        n / elapsed,
        unit="events/s",
        description=f"OutboxRelay draining a backlog of {n:,} rows",
        baseline="outbox.bare_publish_rate",
        lower_is_better=False,
    )
