"""The JetStream side of the worker: fetch jobs, keep them alive, ack them when done.

A job is acked only after its terminal event is stored, so a worker that dies
mid-job leaves it to be redelivered (after AckWait, up to MaxDeliver times). A
worker that shuts down gives its job back (a `released` event) and the service
queues it again at once.
While a job runs, the pull loop (shared.consumer) marks it in progress, resetting
AckWait, and a heartbeat event tells the service the worker is alive.
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
from nats.js.errors import Error as JetStreamError
from opentelemetry import trace

from shared.consumer import Retry, Unprocessable, consume
from shared.messaging import Subjects
from shared.observability import tracing
from shared.proto.raven.training.v1 import training_run_pb2, worker_pb2
from trainer_worker.cancellation import cancel_watch
from trainer_worker.claims import ClaimClient
from trainer_worker.job import (
    InvalidJob,
    JobControl,
    JobOutcome,
    ResumePoint,
    StopReason,
    WorkerEnvironment,
    run_id_of,
)
from trainer_worker.pipeline import execute_job
from trainer_worker.publisher import EventPublisher, JobIdentity

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

    @property
    def heartbeat_s(self) -> float:
        return max(1.0, self.ack_wait_s / 4)


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
        options = self._options
        async with asyncio.TaskGroup() as tasks:
            stopper = tasks.create_task(self._stop_jobs_on(shutdown))
            await consume(
                self._js,
                stream=self._subjects.jobs_stream,
                subject=self._subjects.jobs,
                durable=self._subjects.trainer_consumer,
                handle=self._handle,
                batch=1,
                concurrency=options.concurrency,
                ack_wait_s=options.ack_wait_s,
                max_deliver=options.max_deliver,
                retry_delay_s=_RESUBSCRIBE_DELAY_S,
                fetch_timeout_s=options.fetch_timeout_s,
                # Jobs are independent: each is trained as soon as a slot is free.
                ordering_key=None,
                keep_alive_s=options.heartbeat_s,
                # The terminal event is stored; a lost ack leaves a redelivery the
                # service fences.
                sync_ack=True,
                stop=shutdown,
            )
            stopper.cancel()

    async def _stop_jobs_on(self, shutdown: asyncio.Event) -> None:
        await shutdown.wait()
        log.info("stopping", running_jobs=len(self._active))
        for control in self._active.values():
            control.request(StopReason.SHUTDOWN)

    async def _handle(self, msg: Msg) -> None:
        """Claims and trains one job; returns to have its message acked."""
        job = worker_pb2.TrainingJob()
        try:
            job.ParseFromString(msg.data)
            run_id = run_id_of(job)
        except (DecodeError, InvalidJob) as error:
            raise Unprocessable(f"a job no worker can run: {error}") from None
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        # Every log line of the job carries these (the task of the job is its own context).
        with structlog.contextvars.bound_contextvars(
            run_id=run_id, attempt=job.attempt, worker_id=self._options.worker_id
        ):
            trace.get_current_span().set_attributes(
                {"raven.run_id": run_id, "raven.attempt": job.attempt, "raven.delivery": delivered}
            )
            await self._handle_job(job, run_id, delivered)

    async def _handle_job(self, job: worker_pb2.TrainingJob, run_id: str, delivered: int) -> None:
        log.info("job received", delivery=delivered)
        resume = await self._claim(job, run_id, delivered) if self._claims is not None else None
        if isinstance(resume, _NotGranted):
            return
        structlog.contextvars.bind_contextvars(attempt=job.attempt)
        identity = JobIdentity(
            training_run=job.training_run,
            run_id=run_id,
            attempt=job.attempt,
            worker_id=self._options.worker_id,
        )
        publisher = EventPublisher(js=self._js, subjects=self._subjects, job=identity)
        if self._claims is None:
            # No claim moved the run to PREPARING (the claim says it for the service).
            await publisher.publish(preparing=worker_pb2.WorkerEvent.Preparing())
        with tracing.span("run job", attributes={"raven.attempt": job.attempt}) as span:
            outcome = await self._train(job, run_id, publisher, resume)
            span.set_attribute("raven.outcome", str(outcome))
        log.info("job done", outcome=str(outcome))
        if outcome is not JobOutcome.INTERRUPTED:
            return
        if self._claims is None:
            raise Retry("interrupted by a shutdown")
        # The redelivered message would name the attempt this one took over from, and the
        # service would refuse it as superseded: the service queues a new job for the next
        # attempt instead.
        await publisher.publish(
            critical=True, released=worker_pb2.WorkerEvent.Released(reason="worker_shutdown")
        )

    async def _claim(
        self, job: worker_pb2.TrainingJob, run_id: str, delivered: int
    ) -> ResumePoint | _NotGranted | None:
        """Claims the job from the service (the claim moves the run to PREPARING) and sets
        the attempt it grants; where to resume from, if anywhere."""
        assert self._claims is not None
        claim = await self._claims.claim(
            training_run=job.training_run,
            attempt=job.attempt,
            worker_id=self._options.worker_id,
            delivery=delivered,
        )
        if claim is None:
            raise Retry("the service did not answer the claim", delay_s=_UNCLAIMED_RETRY_S)
        if not claim.granted:
            log.info("job not granted", refusal=claim.refusal)
            return _NOT_GRANTED
        job.attempt = claim.attempt
        if claim.resume_from is None:
            return None
        return ResumePoint(
            checkpoint=claim.resume_from,
            epoch=claim.resume_epoch,
            best_checkpoint=claim.best_checkpoint,
            best_epoch=claim.best_epoch,
        )

    async def _train(
        self,
        job: worker_pb2.TrainingJob,
        run_id: str,
        publisher: EventPublisher,
        resume: ResumePoint | None,
    ) -> JobOutcome:
        control = JobControl()
        key = f"{run_id}/{job.attempt}"
        self._active[key] = control
        if self._shutdown.is_set():
            control.request(StopReason.SHUTDOWN)
        heartbeat = asyncio.create_task(self._heartbeat(publisher))
        metrics = self._environment.metrics
        try:
            with metrics.job(run_id) if metrics else contextlib.nullcontext():
                async with cancel_watch(self._js, self._subjects, run_id, control):
                    return await execute_job(
                        job,
                        publisher=publisher,
                        environment=self._environment,
                        control=control,
                        resume=resume,
                    )
        except (NatsError, JetStreamError, TimeoutError):
            raise
        except Exception as error:
            log.exception("job crashed in the worker", run_id=run_id)
            await publisher.publish(
                critical=True,
                failed=training_run_pb2.Failure(
                    reason="worker_error", message=f"the worker failed: {error!r}"
                ),
            )
            return JobOutcome.FAILED
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._active.pop(key, None)

    async def _heartbeat(self, publisher: EventPublisher) -> None:
        while True:
            await asyncio.sleep(self._options.heartbeat_s)
            await publisher.publish(heartbeat=worker_pb2.WorkerEvent.Heartbeat())


class _NotGranted:
    """The service refused the claim: the job is acked and not trained."""


_NOT_GRANTED = _NotGranted()
