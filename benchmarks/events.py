"""Figure 2: event latency from a worker publishing a progress event to WatchTrainingRun
clients receiving it, against a bare NATS publish -> subscribe with the same fan-out.

Also figure 6's second half: the services' resident memory with 1,000 open watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable
from typing import Any

import grpc
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from benchmarks.plan import Plan
from benchmarks.stack import Stack
from benchmarks.stats import Results
from benchmarks.unary import create_request, write_dataset_stub
from shared.proto.raven.training.v1 import training_run_pb2 as pb
from shared.proto.raven.training.v1 import training_run_pb2_grpc, worker_pb2

_WATCHERS_PER_CHANNEL = 100
_DRAIN_TIMEOUT_S = 20.0
# Watchers opened at once: each replays the run's history from Postgres first.
_OPEN_BATCH = 50
# The latency figures of each event path.
_STATS = ("p50", "p99", "max")
# Publishes in flight at once in the sustained-throughput figure (the outbox relay's batch).
_PUBLISH_WINDOW = 256


class Tracker:
    """Publish times of expected events and the latencies of their arrivals."""

    def __init__(self) -> None:
        self._sent: dict[Hashable, float] = {}
        self._pending: dict[Hashable, int] = defaultdict(int)
        self._outstanding = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self.latencies: list[float] = []
        # Deliveries that never came (a watcher failed or an event was lost).
        self.missing = 0

    def expect(self, key: Hashable, receivers: int) -> None:
        self._pending[key] += receivers
        self._outstanding += receivers
        self._drained.clear()
        self._sent[key] = time.perf_counter()

    def received(self, key: Hashable) -> None:
        now = time.perf_counter()
        if self._pending.get(key, 0) <= 0:
            return  # replayed history or a duplicate, not a measured delivery
        self.latencies.append(now - self._sent[key])
        self._pending[key] -= 1
        self._outstanding -= 1
        if self._outstanding == 0:
            self._drained.set()

    async def drained(self) -> None:
        """Waits for every expected delivery; gives up on the missing ones after a while."""
        try:
            await asyncio.wait_for(self._drained.wait(), _DRAIN_TIMEOUT_S)
        except TimeoutError:
            self.missing += self._outstanding
            self._pending.clear()
            self._outstanding = 0
            self._drained.set()

    def take(self) -> list[float]:
        taken, self.latencies = self.latencies, []
        return taken


class WorkerSide:
    """Publishes WorkerEvents like a trainer worker (tests/support.py's WorkerDriver)."""

    def __init__(self, stack: Stack) -> None:
        self._js = stack.nc.jetstream()
        self._subjects = stack.subjects
        self._iterations: dict[str, itertools.count[int]] = defaultdict(lambda: itertools.count(1))

    async def send(self, run: pb.TrainingRun, **payload: object) -> None:
        event = worker_pb2.WorkerEvent(
            event_id=uuid.uuid4().hex,
            training_run=run.name,
            attempt=run.attempt,
            worker_id="bench-worker",
            **payload,  # type: ignore[arg-type]
        )
        event.time.GetCurrentTime()
        await self._js.publish(
            self._subjects.worker_event(run.name.split("/")[1]),
            event.SerializeToString(),
            headers={"Nats-Msg-Id": uuid.uuid4().hex},
        )

    def next_iteration(self, run: pb.TrainingRun) -> int:
        return next(self._iterations[run.name])

    async def progress(self, run: pb.TrainingRun, iteration: int) -> None:
        await self.send(
            run,
            progress=pb.Progress(epoch=1, iteration=iteration, max_iterations=10**9, loss=0.5),
        )


async def running_runs(
    stack: Stack, runs: training_run_pb2_grpc.TrainingRunServiceStub, worker: WorkerSide, n: int
) -> list[pb.TrainingRun]:
    created = await asyncio.gather(*(runs.CreateTrainingRun(create_request()) for _ in range(n)))
    for run in created:
        await worker.send(run, preparing=worker_pb2.WorkerEvent.Preparing())
        await worker.send(run, running=worker_pb2.WorkerEvent.Running(device="cpu"))
    deadline = time.monotonic() + 60
    while True:
        states = await asyncio.gather(
            *(runs.GetTrainingRun(pb.GetTrainingRunRequest(name=r.name)) for r in created)
        )
        if all(s.state == pb.TrainingRun.RUNNING for s in states):
            return list(states)
        if time.monotonic() > deadline:
            raise RuntimeError("runs did not reach RUNNING")
        await asyncio.sleep(0.1)


class Watchers:
    """WatchTrainingRun streams, a channel per hundred, reporting progress to a tracker:
    its first arrival, live (`live_progress`, the default) or as the recorded entry."""

    def __init__(self, stack: Stack, tracker: Tracker, *, live: bool = True) -> None:
        self._stack = stack
        self._tracker = tracker
        self._live = live
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.per_run: dict[str, int] = defaultdict(int)
        # Status codes of watch streams that ended with an error.
        self.failures: list[str] = []

    async def open(self, run: pb.TrainingRun, count: int) -> None:
        """Opens `count` watchers, a batch at a time, each once it has replayed history."""
        for start in range(0, count, _OPEN_BATCH):
            ready = []
            for _ in range(min(_OPEN_BATCH, count - start)):
                if len(self._tasks) % _WATCHERS_PER_CHANNEL == 0:
                    self._channels.append(self._stack.runs_channel())
                stub = training_run_pb2_grpc.TrainingRunServiceStub(self._channels[-1])
                first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                ready.append(first)
                self._tasks.append(asyncio.create_task(self._watch(stub, run.name, first)))
                self.per_run[run.name] += 1
            await asyncio.wait_for(asyncio.gather(*ready), 120)

    async def _watch(
        self,
        stub: training_run_pb2_grpc.TrainingRunServiceStub,
        name: str,
        first: asyncio.Future[None],
    ) -> None:
        try:
            request = pb.WatchTrainingRunRequest(name=name, live_progress=self._live)
            async for event in stub.WatchTrainingRun(request):
                if not first.done():
                    first.set_result(None)
                if event.WhichOneof("payload") == "progress":
                    self._tracker.received((name, event.progress.iteration))
        except grpc.aio.AioRpcError as error:
            self.failures.append(error.code().name)
            if not first.done():
                first.set_result(None)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task
        for channel in self._channels:
            await channel.close()


class Subscribers:
    """The baseline: plain NATS subscriptions with the same fan-out as the watchers."""

    def __init__(self, nc: NATS, namespace: str, tracker: Tracker) -> None:
        self._nc = nc
        self._namespace = namespace
        self._tracker = tracker
        self.per_run: dict[str, int] = defaultdict(int)

    def subject(self, run: str) -> str:
        return f"{self._namespace}.bench.rtt.{run.split('/')[-1]}"

    async def open(self, run: pb.TrainingRun, count: int) -> None:
        async def on_message(msg: Msg) -> None:
            self._tracker.received((run.name, int(msg.data)))

        for _ in range(count):
            await self._nc.subscribe(self.subject(run.name), cb=on_message)
            self.per_run[run.name] += 1
        await self._nc.flush()

    async def publish(self, run: pb.TrainingRun, iteration: int, publisher: NATS) -> None:
        await publisher.publish(self.subject(run.name), str(iteration).encode())


async def measure_events(stack: Stack, plan: Plan, results: Results, *, memory: bool) -> None:
    write_dataset_stub(stack)  # the runs' dataset, also when figure 1 was not measured
    worker = WorkerSide(stack)
    async with stack.runs_channel() as channel, _connection(stack) as sub_nc:
        runs = training_run_pb2_grpc.TrainingRunServiceStub(channel)
        system, base = Tracker(), Tracker()
        # One run, more and more watchers.
        (run,) = await running_runs(stack, runs, worker, 1)
        watchers, subscribers = (
            Watchers(stack, system),
            Subscribers(sub_nc, stack.subjects.namespace, base),
        )
        try:
            for count in plan.watcher_counts:
                await watchers.open(run, count - watchers.per_run[run.name])
                await subscribers.open(run, count - subscribers.per_run[run.name])
                most = count == max(plan.watcher_counts)
                async with stack.profiled(f"events.run1.w{count}", when=most):
                    await _one_run_rounds(
                        stack,
                        plan,
                        results,
                        worker,
                        run,
                        count,
                        system,
                        base,
                        watchers,
                        subscribers,
                    )
                if memory and count >= 1000:
                    for name in ("training_runs", "trained_models"):
                        results.add(
                            f"memory.{name}.w{count}",
                            stack.children[name].rss_bytes() / 2**20,
                            unit="MiB",
                            description=f"RSS of the {name} service process with {count} open "
                            "WatchTrainingRun streams",
                            baseline=f"memory.{name}.idle",
                        )
        finally:
            await watchers.close()
            _note(results, "events.run1", system, watchers)
        async with stack.profiled("events.recorded.w1"):
            await _recorded_rounds(stack, plan, results, runs, worker)
        # Many runs, a few watchers each, events paced like training runs reporting.
        fleet = await running_runs(stack, runs, worker, plan.fanout_runs)
        system, base = Tracker(), Tracker()
        watchers, subscribers = (
            Watchers(stack, system),
            Subscribers(sub_nc, stack.subjects.namespace, base),
        )
        try:
            for r in fleet:
                await watchers.open(r, plan.watchers_per_run)
                await subscribers.open(r, plan.watchers_per_run)
            async with stack.profiled("events.fleet"):
                await _fleet_rounds(stack, plan, results, worker, fleet, system, base, subscribers)
        finally:
            await watchers.close()
            _note(results, "events.fleet", system, watchers)
        async with stack.profiled("events.apply"):
            await _apply_rounds(stack, plan, results, worker, fleet)


def _note(results: Results, scenario: str, tracker: Tracker, watchers: Watchers) -> None:
    """Deliveries that never came are reported, not hidden in the latencies."""
    results.notes[scenario] = (
        f"{tracker.missing} expected deliveries missing; "
        f"{len(watchers.failures)} watch streams failed"
        + (f" ({', '.join(sorted(set(watchers.failures)))})" if watchers.failures else "")
    )


@contextlib.asynccontextmanager
async def _connection(stack: Stack) -> AsyncIterator[NATS]:
    nc = await nats.connect(stack.settings.nats_url, name="raven-bench-subscribers")
    try:
        yield nc
    finally:
        await nc.close()


async def _one_run_rounds(
    stack: Stack,
    plan: Plan,
    results: Results,
    worker: WorkerSide,
    run: pb.TrainingRun,
    count: int,
    system: Tracker,
    base: Tracker,
    watchers: Watchers,
    subscribers: Subscribers,
) -> None:
    # Warm-up, and proof that every watcher is subscribed.
    for _ in range(2):
        it = worker.next_iteration(run)
        system.expect((run.name, it), count)
        await worker.progress(run, it)
        await system.drained()
    system.take()
    for _ in range(plan.event_rounds):
        for _ in range(plan.events_per_round):
            it = worker.next_iteration(run)
            base.expect((run.name, it), count)
            await subscribers.publish(run, it, stack.nc)
            await base.drained()
        results.add_latencies(
            f"events.nats.w{count}",
            base.take(),
            what=f"bare NATS publish -> {count} subscriber(s) of one subject (baseline)",
            baseline=None,
            stats=_STATS,
        )
        for _ in range(plan.events_per_round):
            it = worker.next_iteration(run)
            system.expect((run.name, it), count)
            await worker.progress(run, it)
            await system.drained()
        results.add_latencies(
            f"events.run1.w{count}",
            system.take(),
            what=f"worker progress event -> {count} WatchTrainingRun client(s) of one run",
            baseline=f"events.nats.w{count}",
            stats=_STATS,
        )


async def _recorded_rounds(
    stack: Stack,
    plan: Plan,
    results: Results,
    runs: training_run_pb2_grpc.TrainingRunServiceStub,
    worker: WorkerSide,
) -> None:
    """One watcher that did not ask for live progress: the recorded path alone (consumer,
    transaction, outbox relay, events stream), against the same bare NATS baseline."""
    (run,) = await running_runs(stack, runs, worker, 1)
    tracker = Tracker()
    watchers = Watchers(stack, tracker, live=False)
    try:
        await watchers.open(run, 1)
        for _ in range(2):  # warm-up
            it = worker.next_iteration(run)
            tracker.expect((run.name, it), 1)
            await worker.progress(run, it)
            await tracker.drained()
        tracker.take()
        for _ in range(plan.event_rounds):
            for _ in range(plan.events_per_round):
                it = worker.next_iteration(run)
                tracker.expect((run.name, it), 1)
                await worker.progress(run, it)
                await tracker.drained()
            results.add_latencies(
                "events.recorded.w1",
                tracker.take(),
                what="worker progress event -> its recorded entry at 1 WatchTrainingRun client "
                "without live progress",
                # Its latest round, measured just before.
                baseline="events.nats.w1",
                stats=_STATS,
            )
    finally:
        await watchers.close()
        _note(results, "events.recorded", tracker, watchers)


async def _fleet_rounds(
    stack: Stack,
    plan: Plan,
    results: Results,
    worker: WorkerSide,
    fleet: list[pb.TrainingRun],
    system: Tracker,
    base: Tracker,
    subscribers: Subscribers,
) -> None:
    per_run = plan.watchers_per_run
    n = len(fleet)
    for r in fleet:  # Warm-up, and proof that every watcher is subscribed.
        it = worker.next_iteration(r)
        system.expect((r.name, it), per_run)
        await worker.progress(r, it)
    await system.drained()
    system.take()
    interval = 1 / plan.fanout_rate_per_s
    label = f"{n} runs x {per_run} watchers, {plan.fanout_rate_per_s:g} events/s"
    count = n * plan.fanout_events_per_run

    async def bare(i: int) -> None:
        r = fleet[i % n]
        it = worker.next_iteration(r)
        base.expect((r.name, it), per_run)
        await subscribers.publish(r, it, stack.nc)

    async def through_the_system(i: int) -> None:
        r = fleet[i % n]
        it = worker.next_iteration(r)
        system.expect((r.name, it), per_run)
        await worker.progress(r, it)

    for _ in range(plan.event_rounds):
        await _paced(bare, count, interval)
        await base.drained()
        results.add_latencies(
            "events.nats.fleet",
            base.take(),
            what=f"bare NATS publish -> subscribers, {label} (baseline)",
            baseline=None,
            stats=_STATS,
        )
        sent = await _paced(through_the_system, count, interval)
        await system.drained()
        results.add_latencies(
            "events.fleet",
            system.take(),
            what=f"worker progress event -> WatchTrainingRun clients, {label}",
            baseline="events.nats.fleet",
            stats=_STATS,
        )
        results.add(
            "events.fleet.sent_per_s",
            count / sent,
            unit="events/s",
            description=f"the rate the workers' progress was published at, {label}",
            lower_is_better=False,
        )
        results.add(
            "events.fleet.backlog_s",
            await _backlog_s(stack),
            unit="s",
            description="from the last progress published to every report recorded (the "
            "worker events consumer with nothing pending or unacknowledged): the backlog",
        )


async def _backlog_s(stack: Stack) -> float:
    """Seconds until the worker events consumer has nothing pending or unacknowledged."""
    js = stack.nc.jetstream()
    start = time.perf_counter()
    while True:
        info = await js.consumer_info(
            stack.subjects.worker_events_stream, stack.subjects.worker_events_consumer
        )
        if info.num_pending == 0 and info.num_ack_pending == 0:
            return time.perf_counter() - start
        await asyncio.sleep(0.01)


async def _apply_rounds(
    stack: Stack, plan: Plan, results: Results, worker: WorkerSide, fleet: list[pb.TrainingRun]
) -> None:
    """Sustained throughput of the worker-event path: progress of every run of the fleet,
    round robin, published as fast as JetStream takes it (pipelined, a window at a time),
    then the time until TrainingRunService has recorded them all. Baseline: the rate of
    the publishing alone, in the same round."""
    count = plan.apply_events
    for _ in range(plan.event_rounds):
        start = time.perf_counter()
        window: list[Awaitable[None]] = []
        for i in range(count):
            r = fleet[i % len(fleet)]
            window.append(worker.progress(r, worker.next_iteration(r)))
            if len(window) == _PUBLISH_WINDOW:
                await asyncio.gather(*window)
                window = []
        await asyncio.gather(*window)
        published = time.perf_counter() - start
        await _backlog_s(stack)
        recorded = time.perf_counter() - start
        results.add(
            "events.apply.publish_rate",
            count / published,
            unit="events/s",
            description=f"{count:,} progress reports of {len(fleet):,} runs published to the "
            f"worker events stream, {_PUBLISH_WINDOW} at a time (baseline)",
            lower_is_better=False,
        )
        results.add(
            "events.apply.rate",
            count / recorded,
            unit="events/s",
            description=f"the same {count:,} reports recorded by TrainingRunService (from the "
            "first publish to the consumer drained)",
            baseline="events.apply.publish_rate",
            lower_is_better=False,
        )


async def _paced(
    send: Callable[[int], Coroutine[Any, Any, None]], count: int, interval: float
) -> float:
    """send(0) .. send(count - 1), the i-th started at `i * interval` seconds from the
    start, without waiting for the ones before (a fleet's workers do not wait for each
    other); returns the seconds until all were sent."""
    start = time.perf_counter()
    sending: set[asyncio.Task[None]] = set()
    for i in range(count):
        task = asyncio.create_task(send(i))
        sending.add(task)
        task.add_done_callback(sending.discard)
        await asyncio.sleep(max(0.0, start + (i + 1) * interval - time.perf_counter()))
    if sending:
        await asyncio.gather(*sending)
    return time.perf_counter() - start
