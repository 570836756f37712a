"""Runs whose worker went silent: queued for another attempt, or failed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import structlog

from services.training_runs.domain import RunState, TrainingRun
from services.training_runs.handlers.common import Clock, publish_job, utcnow
from services.training_runs.unit_of_work import UnitOfWork

log = structlog.get_logger(__name__)


async def recover_lost_runs(
    uow: UnitOfWork,
    *,
    timeout_s: float,
    max_attempts: int,
    clock: Clock = utcnow,
    batch: int = 100,
) -> list[TrainingRun]:
    """Requeues (or fails) active runs whose worker went silent. Returns the changed runs."""
    now = clock()
    async with uow:
        silent = await uow.runs.silent_runs(since=now - timedelta(seconds=timeout_s), limit=batch)
        for run in silent:
            assert run.heartbeat_time is not None
            silent_s = (now - run.heartbeat_time).total_seconds()
            run.lose_worker(max_attempts=max_attempts, silent_s=silent_s, now=now)
            if run.state is RunState.QUEUED:
                await publish_job(uow, run)
            log.warning(
                "worker lost", run_id=str(run.id), state=run.state.value, attempt=run.attempt
            )
        await uow.commit()
    return list(silent)


async def recover_lost_runs_forever(
    uow_factory: Callable[[], UnitOfWork],
    *,
    timeout_s: float,
    max_attempts: int,
    on_recovered: Callable[[list[TrainingRun]], None] | None = None,
) -> None:
    """Checks a few times per timeout; cheap: an index holds only active runs.
    `on_recovered` is told the runs each check requeued or failed (the metrics)."""
    while True:
        try:
            changed = await recover_lost_runs(
                uow_factory(), timeout_s=timeout_s, max_attempts=max_attempts
            )
            if on_recovered is not None and changed:
                on_recovered(changed)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recovering lost runs failed")
        await asyncio.sleep(max(timeout_s / 4, 0.2))
