"""Live run history for WatchTrainingRun.

Each process holds ONE NATS subscription to every run's history subject and
fans events out to its watchers in memory; a watcher never polls. A watcher
first subscribes, then replays from Postgres, then follows live, skipping what
it already sent and filling any gap (a dropped or reordered message, a slow
watcher whose buffer overflowed) from Postgres, so it sees every event exactly
once, in order, whatever process wrote it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator

import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from services.training_runs.domain import TERMINAL
from services.training_runs.messages import event_to_proto
from services.training_runs.unit_of_work import UnitOfWork
from shared.messaging import Subjects
from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1.training_run_pb2 import TrainingRun, TrainingRunEvent

log = structlog.get_logger(__name__)

# The domain's terminal states, as wire values.
_TERMINAL = frozenset(TrainingRun.State.Value(state.value) for state in TERMINAL)
_REPLAY_PAGE = 500


def is_terminal(event: TrainingRunEvent) -> bool:
    return (
        event.WhichOneof("payload") == "state_changed" and event.state_changed.to_state in _TERMINAL
    )


class _Watcher:
    def __init__(self, buffer: int) -> None:
        self.queue: asyncio.Queue[TrainingRunEvent] = asyncio.Queue(maxsize=buffer)
        self.overflowed = False


class EventHub:
    def __init__(self, *, buffer: int = 1024) -> None:
        self._buffer = buffer
        self._watchers: dict[uuid.UUID, set[_Watcher]] = defaultdict(set)
        self._subscription: Subscription | None = None

    async def start(self, nc: NATS, subjects: Subjects) -> None:
        self._subscription = await nc.subscribe(subjects.run_events, cb=self._on_message)

    async def stop(self) -> None:
        if self._subscription is not None:
            with contextlib.suppress(Exception):
                await self._subscription.unsubscribe()

    @property
    def watcher_count(self) -> int:
        return sum(len(w) for w in self._watchers.values())

    async def _on_message(self, msg: Msg) -> None:
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

    @contextlib.contextmanager
    def _subscribe(self, run_id: uuid.UUID) -> Iterator[_Watcher]:
        watcher = _Watcher(self._buffer)
        self._watchers[run_id].add(watcher)
        try:
            yield watcher
        finally:
            watchers = self._watchers[run_id]
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[run_id]

    async def watch(
        self,
        uow_factory: Callable[[], UnitOfWork],
        run_id: uuid.UUID,
        *,
        after_sequence: int = 0,
        idle_check_s: float = 30.0,
    ) -> AsyncIterator[TrainingRunEvent]:
        """Every event after `after_sequence`, in order, until the run has ended."""
        with self._subscribe(run_id) as watcher:
            async with uow_factory().reading() as uow:
                run = await uow.runs.require(run_id)
            last = after_sequence
            async for replayed in self._replay(uow_factory, run_id, last):
                yield replayed
                last = replayed.sequence
                if is_terminal(replayed):
                    return
            if run.state.is_terminal:
                return  # ended, and the caller has seen everything up to its end
            while True:
                event: TrainingRunEvent | None = None
                # A timeout scope, not wait_for: no task per watcher per event.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(idle_check_s):
                        event = await watcher.queue.get()
                if event is not None and event.sequence <= last:
                    continue
                if event is None or watcher.overflowed or event.sequence > last + 1:
                    watcher.overflowed = False
                    async for missed in self._replay(uow_factory, run_id, last):
                        yield missed
                        last = missed.sequence
                        if is_terminal(missed):
                            return
                    continue
                yield event
                last = event.sequence
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
