"""The JetStream side of the worker: fetch jobs, keep them alive, ack them when done.

A job is acked only after its terminal event is stored, so a worker that dies
mid-job leaves it to be redelivered (after AckWait, up to MaxDeliver times). A
worker that shuts down gives its job back (a `released` event) and the service
queues it again at once.
While a job runs, `in_progress()` resets AckWait and a heartbeat event tells the
service the worker is alive.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import structlog
from google.protobuf.message import DecodeError
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError
from nats.js.errors import Error as JetStreamError

from shared.messaging import Subjects
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from trainer_worker.cancellation import cancel_watch
from trainer_worker.claims import ClaimClient
from trainer_worker.events import EventPublisher, JobIdentity
from trainer_worker.pipeline import (
    InvalidJob,
    JobControl,
    JobOutcome,
    ResumePoint,
    StopReason,
    WorkerEnvironment,
    execute_job,
    run_id_of,
)

log = structlog.get_logger(__name__)

_RESUBSCRIBE_DELAY_S = 1.0
# How long an unclaimed job waits before it is offered again.
_UNCLAIMED_RETRY_S = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumerOptions:
    worker_id: str
    concurrency: int = 1
    ack_wait_s: float = 60.0
    max_deliver: int = 3
    # How long one fetch waits for a job; bounds how fast a shutdown is noticed.
    fetch_timeout_s: float = 2.0


class JobConsumer:
    """Trains up to `concurrency` jobs at once from the durable trainer consumer."""

    def __init__(
        self,
        *,
        js: JetStreamContext,
        subjects: Subjects,
        environment: WorkerEnvironment,
        options: ConsumerOptions,
        claims: ClaimClient | None = None,
    ) -> None:
        """Without `claims` the worker trusts the attempt in the job message (a worker with
        no TrainingRunService to answer claims, as in tests of the worker alone)."""
        self._js = js
        self._claims = claims
        self._subjects = subjects
        self._environment = environment
        self._options = options
        self._active: dict[str, JobControl] = {}
        self._shutdown = asyncio.Event()

    async def run(self, shutdown: asyncio.Event) -> None:
        """Serves jobs until `shutdown` is set, then stops the running ones (they are
        redelivered) and returns."""
        self._shutdown = shutdown
        slots = asyncio.Semaphore(self._options.concurrency)
        async with asyncio.TaskGroup() as jobs:
            jobs.create_task(self._stop_jobs_on(shutdown))
            subscription = None
            while not shutdown.is_set():
                if subscription is None:
                    subscription = await self._subscribe(shutdown)
                    continue
                await slots.acquire()
                if shutdown.is_set():
                    slots.release()
                    break
                try:
                    messages = await subscription.fetch(1, timeout=self._options.fetch_timeout_s)
                except TimeoutError:
                    slots.release()
                    continue
                except (NatsError, JetStreamError) as error:
                    # A pull subscription can stop after a server restart: make a new one.
                    slots.release()
                    log.warning("fetch failed; subscribing again", error=repr(error))
                    with contextlib.suppress(NatsError, JetStreamError):
                        await subscription.unsubscribe()
                    subscription = None
                    await _sleep_unless(shutdown, _RESUBSCRIBE_DELAY_S)
                    continue
                for message in messages:
                    jobs.create_task(self._serve(message, slots))
                if not messages:
                    slots.release()
            if subscription is not None:
                with contextlib.suppress(NatsError, JetStreamError):
                    await subscription.unsubscribe()

    async def _stop_jobs_on(self, shutdown: asyncio.Event) -> None:
        await shutdown.wait()
        log.info("stopping", running_jobs=len(self._active))
        for control in self._active.values():
            control.request(StopReason.SHUTDOWN)

    async def _subscribe(self, shutdown: asyncio.Event) -> JetStreamContext.PullSubscription | None:
        config = ConsumerConfig(
            durable_name=self._subjects.trainer_consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._options.ack_wait_s,
            max_deliver=self._options.max_deliver,
            filter_subject=self._subjects.jobs,
        )
        try:
            try:
                # Creates the durable consumer, or brings an existing one to these settings.
                await self._js.add_consumer(self._subjects.jobs_stream, config)
            except BadRequestError as error:
                # The server refuses some changes to a durable consumer: serve with it as is.
                log.warning("kept the existing jobs consumer", error=error.description)
            return await self._js.pull_subscribe_bind(
                durable=self._subjects.trainer_consumer, stream=self._subjects.jobs_stream
            )
        except (NatsError, JetStreamError) as error:
            log.warning("cannot subscribe to jobs", error=repr(error))
            await _sleep_unless(shutdown, _RESUBSCRIBE_DELAY_S)
            return None

    async def _serve(self, msg: Msg, slots: asyncio.Semaphore) -> None:
        try:
            await self._handle(msg)
        except Exception:
            # Whatever went wrong, the job goes back to the queue and the worker lives on.
            log.exception("job handling failed")
            with contextlib.suppress(NatsError, JetStreamError):
                await msg.nak()
        finally:
            slots.release()

    async def _handle(self, msg: Msg) -> None:
        job = worker_pb2.TrainingJob()
        try:
            job.ParseFromString(msg.data)
            run_id = run_id_of(job)
        except (DecodeError, InvalidJob) as error:
            log.error("dropped a job no worker can run", subject=msg.subject, error=str(error))
            await msg.term()
            return
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        log.info("job received", run=run_id, attempt=job.attempt, delivery=delivered)
        resume: ResumePoint | None = None
        if self._claims is not None:
            claim = await self._claims.claim(
                training_run=job.training_run,
                attempt=job.attempt,
                worker_id=self._options.worker_id,
                delivery=delivered,
            )
            if claim is None:
                await msg.nak(delay=_UNCLAIMED_RETRY_S)
                return
            if not claim.granted:
                log.info("job not granted", run=run_id, refusal=claim.refusal)
                await msg.ack()
                return
            job.attempt = claim.attempt
            if claim.resume_from is not None:
                resume = ResumePoint(
                    checkpoint=claim.resume_from,
                    epoch=claim.resume_epoch,
                    best_checkpoint=claim.best_checkpoint,
                    best_epoch=claim.best_epoch,
                )
        identity = JobIdentity(
            training_run=job.training_run,
            run_id=run_id,
            attempt=job.attempt,
            worker_id=self._options.worker_id,
        )
        publisher = EventPublisher(js=self._js, subjects=self._subjects, job=identity)
        control = JobControl()
        key = f"{run_id}/{job.attempt}"
        self._active[key] = control
        if self._shutdown.is_set():
            control.request(StopReason.SHUTDOWN)
        heartbeat = asyncio.create_task(self._heartbeat(msg, publisher))
        try:
            async with cancel_watch(self._js, self._subjects, run_id, control):
                try:
                    outcome = await execute_job(
                        job,
                        publisher=publisher,
                        environment=self._environment,
                        control=control,
                        resume=resume,
                    )
                except (NatsError, JetStreamError, TimeoutError):
                    raise
                except Exception as error:
                    log.exception("job crashed in the worker", run=run_id)
                    await publisher.publish(
                        critical=True,
                        failed=training_run_pb2.Failure(
                            reason="worker_error", message=f"the worker failed: {error!r}"
                        ),
                    )
                    outcome = JobOutcome.FAILED
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._active.pop(key, None)
        try:
            if outcome is JobOutcome.INTERRUPTED and self._claims is not None:
                # The redelivered message would name the attempt this one took over from,
                # and the service would refuse it as superseded: the service queues a new
                # job for the next attempt instead.
                await publisher.publish(
                    critical=True,
                    released=worker_pb2.WorkerEvent.Released(reason="worker_shutdown"),
                )
                await msg.ack_sync()
            elif outcome is JobOutcome.INTERRUPTED:
                await msg.nak()
            else:
                await msg.ack_sync()
        except (NatsError, JetStreamError, TimeoutError) as error:
            # The terminal event is stored; a redelivery is fenced by the service.
            log.warning("job not acknowledged", run=run_id, error=repr(error))
        log.info("job done", run=run_id, attempt=job.attempt, outcome=str(outcome))

    async def _heartbeat(self, msg: Msg, publisher: EventPublisher) -> None:
        interval = max(1.0, self._options.ack_wait_s / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except (NatsError, JetStreamError) as error:
                log.warning("in_progress failed", error=repr(error))
            await publisher.publish(heartbeat=worker_pb2.WorkerEvent.Heartbeat())


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
