"""A durable JetStream pull consumer loop, shared by the services' consumers.

Messages with the same ordering key (by default: all of them) are handled one
at a time, in order; different keys in a fetched batch are handled
concurrently, so one busy run does not hold up the others. The handler returns
normally to ack; raising `Unprocessable` terminates the message (it can never
succeed); any other error naks it for a later retry.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = structlog.get_logger(__name__)


class Unprocessable(Exception):
    """The message can never be handled (malformed): retrying is pointless."""


Handler = Callable[[Msg], Awaitable[None]]


async def consume(
    js: JetStreamContext,
    *,
    stream: str,
    subject: str,
    durable: str,
    handle: Handler,
    batch: int = 64,
    ack_wait_s: float = 30.0,
    retry_delay_s: float = 1.0,
    ordering_key: Callable[[Msg], str] = lambda msg: "",
) -> None:
    """Runs until cancelled."""
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        filter_subject=subject,
        max_ack_pending=10_000,
    )
    while True:
        try:
            subscription = await js.pull_subscribe(
                subject, durable=durable, stream=stream, config=config
            )
            try:
                while True:
                    try:
                        messages = await subscription.fetch(batch, timeout=1.0)
                    except TimeoutError:
                        continue
                    lanes: dict[str, list[Msg]] = defaultdict(list)
                    for msg in messages:
                        lanes[ordering_key(msg)].append(msg)
                    await asyncio.gather(
                        *(_handle_in_order(lane, handle, retry_delay_s) for lane in lanes.values())
                    )
            finally:
                # Leaves nothing for a drain of the connection to wait on.
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A pull subscription can stop after a server restart: subscribe again.
            log.exception("consumer failed; subscribing again", durable=durable)
            await asyncio.sleep(retry_delay_s)


async def _handle_in_order(messages: list[Msg], handle: Handler, retry_delay_s: float) -> None:
    for msg in messages:
        await _handle_one(msg, handle, retry_delay_s)


async def _handle_one(msg: Msg, handle: Handler, retry_delay_s: float) -> None:
    try:
        await handle(msg)
    except Unprocessable:
        log.error("unprocessable message terminated", subject=msg.subject)
        await msg.term()
        return
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("message handling failed; will retry", subject=msg.subject)
        await msg.nak(delay=retry_delay_s)
        return
    await msg.ack()
