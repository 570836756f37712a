"""Cancel requests: the service records them as state changes; the worker follows them.

While a job runs, the worker follows the run's state subject, which carries the run's
state changes alone, from its last message (an ordered, ephemeral JetStream consumer
with DeliverPolicy.LAST): the run's state when the job begins, so a cancel requested
before then is seen too, and every change after. A CANCELLING (or CANCELLED) state
stops the job.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import structlog
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import Error as JetStreamError

from shared.messaging import Subjects
from trainer_worker.job import JobControl, StopReason, is_cancel_request

log = structlog.get_logger(__name__)


@contextlib.asynccontextmanager
async def cancel_watch(
    js: JetStreamContext, subjects: Subjects, run_id: str, control: JobControl
) -> AsyncIterator[None]:
    """Requests `control` to stop when the run is cancelled, for the duration of the block.
    Without the events stream the job runs uncancellable, and says so in the log."""

    async def on_event(msg: Msg) -> None:
        if is_cancel_request(msg.data):
            log.info("cancel requested", run_id=run_id)
            control.request(StopReason.CANCEL)

    subscription = None
    try:
        subscription = await js.subscribe(
            subjects.run_state(run_id),
            stream=subjects.events_stream,
            cb=on_event,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST,
        )
    except (NatsError, JetStreamError) as error:
        log.warning("cancel requests will not be seen", run_id=run_id, error=repr(error))
    try:
        yield
    finally:
        if subscription is not None:
            with contextlib.suppress(NatsError, JetStreamError):
                await subscription.unsubscribe()
