"""The durable JetStream pull consumer loop: the services' event consumers and the
trainer worker's job queue.

At most `concurrency` messages are handled at once. Messages with the same ordering
key (by default: all of them) are handled one at a time, in order; messages with
different keys, or with no key, are handled concurrently, so one busy run does not
hold up the others. A handler that returns acks its message; raising `Retry` naks it
for a redelivery after the given delay; raising `Unprocessable` terminates it (it can
never succeed); any other error naks it for a later retry. With `keep_alive_s`, a
message being handled is marked in progress that often, so a long handler (a training
job) keeps it past AckWait.

A pull subscription can stop after a server restart: the loop subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import BadRequestError
from nats.js.errors import Error as JetStreamError
from opentelemetry.trace import SpanKind

from shared.observability import tracing

log = structlog.get_logger(__name__)

_ACK_ERRORS = (NatsError, JetStreamError, TimeoutError)


class Unprocessable(Exception):
    """The message can never be handled (malformed): retrying is pointless."""


class Retry(Exception):
    """The message is to be delivered again after `delay_s` (0: at once); not an error."""

    def __init__(self, reason: str, *, delay_s: float = 0.0) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


Handler = Callable[[Msg], Awaitable[None]]
OrderingKey = Callable[[Msg], str]


async def consume(
    js: JetStreamContext,
    *,
    stream: str,
    subject: str,
    durable: str,
    handle: Handler,
    batch: int = 64,
    concurrency: int | None = None,
    ack_wait_s: float = 30.0,
    max_deliver: int | None = None,
    retry_delay_s: float = 1.0,
    fetch_timeout_s: float = 1.0,
    ordering_key: OrderingKey | None = lambda msg: "",
    keep_alive_s: float | None = None,
    sync_ack: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Runs until cancelled, or until `stop` is set and the messages being handled are done.

    `concurrency`: messages handled at once (default: `batch`); `ordering_key` None: every
    message on its own. `sync_ack`: each ack waits for the server's confirmation."""
    config = ConsumerConfig(
        durable_name=durable,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliver,
        filter_subject=subject,
        max_ack_pending=10_000,
    )
    loop = _PullLoop(
        handle=handle,
        name=f"consume {durable}",
        capacity=concurrency or batch,
        ordering_key=ordering_key,
        retry_delay_s=retry_delay_s,
        keep_alive_s=keep_alive_s,
        sync_ack=sync_ack,
    )
    stop = stop or asyncio.Event()
    async with asyncio.TaskGroup() as handling:
        while not stop.is_set():
            subscription = await _subscribe(js, stream, config, stop, retry_delay_s)
            if subscription is None:
                continue
            try:
                await loop.serve(subscription, handling, batch, fetch_timeout_s, stop)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("fetch failed; subscribing again", durable=durable, error=repr(error))
                await _sleep_unless(stop, retry_delay_s)
            finally:
                # Leaves nothing for a drain of the connection to wait on.
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()


async def _subscribe(
    js: JetStreamContext,
    stream: str,
    config: ConsumerConfig,
    stop: asyncio.Event,
    retry_delay_s: float,
) -> JetStreamContext.PullSubscription | None:
    durable = config.durable_name
    assert durable is not None
    try:
        try:
            # Creates the durable consumer, or brings an existing one to these settings.
            await js.add_consumer(stream, config)
        except BadRequestError as error:
            # The server refuses some changes to a durable consumer: serve with it as is.
            log.warning("kept the existing consumer", durable=durable, error=error.description)
        return await js.pull_subscribe_bind(durable=durable, stream=stream)
    except asyncio.CancelledError:
        raise
    except Exception as error:
        log.warning("cannot subscribe", durable=durable, error=repr(error))
        await _sleep_unless(stop, retry_delay_s)
        return None


class _PullLoop:
    def __init__(
        self,
        *,
        handle: Handler,
        name: str,
        capacity: int,
        ordering_key: OrderingKey | None,
        retry_delay_s: float,
        keep_alive_s: float | None,
        sync_ack: bool,
    ) -> None:
        self._handle = handle
        self._name = name
        self._free = capacity
        self._freed = asyncio.Event()
        self._ordering_key = ordering_key
        self._retry_delay_s = retry_delay_s
        self._keep_alive_s = keep_alive_s
        self._sync_ack = sync_ack
        # The last message taken of each ordering key: the next one waits for it.
        self._lanes: dict[str, asyncio.Task[None]] = {}

    async def serve(
        self,
        subscription: JetStreamContext.PullSubscription,
        handling: asyncio.TaskGroup,
        batch: int,
        fetch_timeout_s: float,
        stop: asyncio.Event,
    ) -> None:
        while not stop.is_set():
            await self._wait_for_room()
            if stop.is_set():
                return
            try:
                messages = await subscription.fetch(min(batch, self._free), timeout=fetch_timeout_s)
            except TimeoutError:
                continue
            for msg in messages:
                self._take(msg, handling)

    async def _wait_for_room(self) -> None:
        while self._free == 0:
            self._freed.clear()
            await self._freed.wait()

    def _take(self, msg: Msg, handling: asyncio.TaskGroup) -> None:
        self._free -= 1
        if self._ordering_key is None:
            handling.create_task(self._handle_after(None, msg))
            return
        key = self._ordering_key(msg)
        task = handling.create_task(self._handle_after(self._lanes.get(key), msg))
        self._lanes[key] = task
        task.add_done_callback(lambda done: self._leave_lane(key, done))

    def _leave_lane(self, key: str, task: asyncio.Task[None]) -> None:
        if self._lanes.get(key) is task:
            del self._lanes[key]

    async def _handle_after(self, before: asyncio.Task[None] | None, msg: Msg) -> None:
        try:
            if before is not None:
                await asyncio.wait({before})
            await self._handle_one(msg)
        finally:
            self._free += 1
            self._freed.set()

    async def _handle_one(self, msg: Msg) -> None:
        keep_alive = (
            asyncio.create_task(self._keep_alive(msg, self._keep_alive_s))
            if self._keep_alive_s
            else None
        )
        try:
            # A CONSUMER span, child of the publisher's (its traceparent is in the headers).
            with tracing.span(
                self._name,
                kind=SpanKind.CONSUMER,
                parent=msg.headers or {},
                attributes={"messaging.system": "nats", "messaging.destination.name": msg.subject},
                expected=(Retry, asyncio.CancelledError),
            ):
                await self._handle(msg)
        except Unprocessable as error:
            log.error("unprocessable message terminated", subject=msg.subject, error=str(error))
            await _settle(msg.term())
            return
        except Retry as retry:
            await _settle(msg.nak(delay=retry.delay_s or None))
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("message handling failed; will retry", subject=msg.subject)
            await _settle(msg.nak(delay=self._retry_delay_s))
            return
        finally:
            if keep_alive is not None:
                keep_alive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keep_alive
        await _settle(msg.ack_sync() if self._sync_ack else msg.ack())

    @staticmethod
    async def _keep_alive(msg: Msg, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await msg.in_progress()
            except _ACK_ERRORS as error:
                log.warning("in_progress failed", subject=msg.subject, error=repr(error))


async def _settle(acknowledgement: Awaitable[object]) -> None:
    """An ack, nak or term; one that fails is redelivered after AckWait anyway."""
    try:
        await acknowledgement
    except _ACK_ERRORS as error:
        log.warning("message not acknowledged", error=repr(error))


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
