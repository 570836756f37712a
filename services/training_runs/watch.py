"""Live run history for WatchTrainingRun.

Each process holds ONE NATS subscription to every run's history subject and
fans events out to its watchers in memory; a watcher never polls. A watcher
first subscribes, then replays from Postgres, then follows live, skipping what
it already sent and filling any gap (a dropped or reordered message, a slow
watcher whose buffer overflowed) from Postgres, so it sees every event exactly
once, in order, whatever process wrote it.

A watcher that asks for live progress also gets each progress report the moment
its worker publishes it: the same process subscribes (plain NATS, no JetStream
consumer) to the worker events subjects and hands a report of a watched run to
its watchers, which pass it on when it is of the run's current attempt, the run
is active and the iteration is newer than any progress they sent. Such an event
is `live` and outside the sequence; its recorded entry follows as usual. A live
report that is lost (a slow subscription, a full buffer) costs nothing but its
head start.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator

import structlog
from google.protobuf.message import DecodeError
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.training_runs.domain import TERMINAL, RunState
from services.training_runs.messages import event_to_proto
from services.training_runs.unit_of_work import UnitOfWork
from shared.messaging import Subjects
from shared.names import TRAINING_RUNS, parse_name, run_name
from shared.proto.raven.training.v1.training_run_pb2 import TrainingRun, TrainingRunEvent
from shared.proto.raven.training.v1.worker_pb2 import WorkerEvent

log = structlog.get_logger(__name__)

# The domain's terminal states, as wire values.
_TERMINAL = frozenset(TrainingRun.State.Value(state.value) for state in TERMINAL)
_ACTIVE = frozenset(TrainingRun.State.Value(state.value) for state in RunState if state.is_active)
_REPLAY_PAGE = 500


def is_terminal(event: TrainingRunEvent) -> bool:
    return (
        event.WhichOneof("payload") == "state_changed" and event.state_changed.to_state in _TERMINAL
    )


class _Watcher:
    def __init__(self, buffer: int, *, live: bool) -> None:
        # Recorded events, and the worker's progress reports when `live`.
        self.queue: asyncio.Queue[TrainingRunEvent | WorkerEvent] = asyncio.Queue(maxsize=buffer)
        self.overflowed = False
        self.live = live


class _Position:
    """What a watcher has sent: the last sequence, and what decides whether a live
    progress report may go out (the run's attempt and state, the newest iteration)."""

    def __init__(self, *, after_sequence: int, attempt: int, state: int) -> None:
        self.sequence = after_sequence
        self.attempt = attempt
        self.state = state
        self.iteration = -1

    def recorded(self, event: TrainingRunEvent) -> None:
        self.sequence = event.sequence
        self.attempt = event.attempt
        match event.WhichOneof("payload"):
            case "state_changed":
                self.state = event.state_changed.to_state
            case "progress":
                self.iteration = max(self.iteration, event.progress.iteration)

    def live(self, run_name: str, report: WorkerEvent) -> TrainingRunEvent | None:
        """The report as a live event, or None when it may not go out."""
        if (
            report.attempt != self.attempt
            or self.state not in _ACTIVE
            or report.progress.iteration <= self.iteration
        ):
            return None
        self.iteration = report.progress.iteration
        event = TrainingRunEvent(
            training_run=run_name,
            sequence=self.sequence,
            attempt=report.attempt,
            actor=f"worker:{report.worker_id}",
            live=True,
            progress=report.progress,
        )
        event.time.CopyFrom(report.time)
        return event


class EventHub:
    def __init__(self, *, buffer: int = 1024) -> None:
        self._buffer = buffer
        self._watchers: dict[uuid.UUID, set[_Watcher]] = defaultdict(set)
        # Of each run, how many of its watchers want live progress.
        self._live: dict[uuid.UUID, int] = defaultdict(int)
        self._subscriptions: list[Subscription] = []

    async def start(self, nc: NATS, subjects: Subjects) -> None:
        self._subscriptions = [
            await nc.subscribe(subjects.run_events, cb=self._on_message),
            await nc.subscribe(subjects.worker_events, cb=self._on_worker_message),
        ]

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()

    @property
    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    async def _on_message(self, msg: Msg) -> None:
        # <ns>.training.v1.training_run.<id>.event: a run nobody here watches is not decoded.
        with contextlib.suppress(ValueError, IndexError):
            if uuid.UUID(msg.subject.split(".")[-2]) not in self._watchers:
                return
        try:
            event = TrainingRunEvent.FromString(msg.data)
            run_id = parse_name(event.training_run, TRAINING_RUNS)
        except Exception:
            log.warning("unreadable run event", subject=msg.subject)
            return
        for watcher in self._watchers.get(run_id, ()):
            try:
                watcher.queue.put_nowait(event)
            except asyncio.QueueFull:
                watcher.overflowed = True

    async def _on_worker_message(self, msg: Msg) -> None:
        """A worker's report, straight from its publish: progress goes to live watchers."""
        try:
            run_id = uuid.UUID(msg.subject.rpartition(".")[2])
        except ValueError:
            return
        if not self._live.get(run_id):
            return  # nobody here wants it: not even decoded
        try:
            report = WorkerEvent.FromString(msg.data)
        except DecodeError:
            return  # the worker events consumer terminates it
        if report.WhichOneof("payload") != "progress":
            return
        for watcher in self._watchers.get(run_id, ()):
            if watcher.live:
                # A live report that does not fit is dropped: its entry follows anyway.
                with contextlib.suppress(asyncio.QueueFull):
                    watcher.queue.put_nowait(report)

    @contextlib.contextmanager
    def _subscribe(self, run_id: uuid.UUID, *, live: bool) -> Iterator[_Watcher]:
        watcher = _Watcher(self._buffer, live=live)
        self._watchers[run_id].add(watcher)
        self._live[run_id] += live
        try:
            yield watcher
        finally:
            watchers = self._watchers[run_id]
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[run_id]
            self._live[run_id] -= live
            if not self._live[run_id]:
                del self._live[run_id]

    async def watch(
        self,
        uow_factory: Callable[[], UnitOfWork],
        run_id: uuid.UUID,
        *,
        after_sequence: int = 0,
        live_progress: bool = False,
        idle_check_s: float = 30.0,
    ) -> AsyncIterator[TrainingRunEvent]:
        """Every event after `after_sequence`, in order, until the run has ended; with
        `live_progress`, progress reports too, as they arrive (module docstring)."""
        with self._subscribe(run_id, live=live_progress) as watcher:
            async with uow_factory().reading() as uow:
                run = await uow.runs.require(run_id)
            # Until an entry says otherwise, the run as it was read.
            position = _Position(
                after_sequence=after_sequence,
                attempt=run.attempt,
                state=TrainingRun.State.Value(run.state.value),
            )
            name = run_name(run_id)
            async for replayed in self._replay(uow_factory, run_id, position.sequence):
                yield replayed
                position.recorded(replayed)
                if is_terminal(replayed):
                    return
            if run.state.is_terminal:
                return  # ended, and the caller has seen everything up to its end
            while True:
                event: TrainingRunEvent | WorkerEvent | None = None
                # A timeout scope, not wait_for: no task per watcher per event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle_check_s):
                        event = await watcher.queue.get()
                if isinstance(event, WorkerEvent):
                    live = position.live(name, event)
                    if live is not None:
                        yield live
                    continue
                if event is not None and event.sequence <= position.sequence:
                    continue
                if event is None or watcher.overflowed or event.sequence > position.sequence + 1:
                    watcher.overflowed = False
                    async for missed in self._replay(uow_factory, run_id, position.sequence):
                        yield missed
                        position.recorded(missed)
                        if is_terminal(missed):
                            return
                    continue
                yield event
                position.recorded(event)
                if is_terminal(event):
                    return

    @staticmethod
    async def _replay(
        uow_factory: Callable[[], UnitOfWork],
        run_id: uuid.UUID,
        after: int,
    ) -> AsyncIterator[TrainingRunEvent]:
        while True:
            async with uow_factory().reading() as uow:
                page = await uow.runs.events(run_id, after_sequence=after, limit=_REPLAY_PAGE)
            for event in page:
                yield event_to_proto(event)
                after = event.sequence
            if len(page) < _REPLAY_PAGE:
                return
