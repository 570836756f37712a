"""TrainingRunService's own series: runs by state and the lost-worker recoveries.

Runs by state are counted in Postgres on every scrape (one GROUP BY over the runs
table), not kept in memory: every replica reports the same truth, whatever changed
the runs, and a restart loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.training_runs.domain import RunState, TrainingRun
from shared.db.schema import training_runs
from shared.observability.metrics_server import Source
from shared.observability.service_metrics import ServiceMetrics

_KINDS = ("training", "evaluation")


class RunMetrics:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self.runs = Gauge(
            "raven_training_runs",
            "Runs (training and evaluation jobs) by state and kind, counted in Postgres on scrape.",
            ["state", "kind"],
            registry=metrics.registry,
        )
        self.recoveries = Counter(
            "raven_lost_worker_recoveries_total",
            "Active runs whose worker went silent, by what became of them "
            "(requeued: queued for another attempt; failed: out of attempts).",
            ["outcome"],
            registry=metrics.registry,
        )
        for outcome in ("requeued", "failed"):
            self.recoveries.labels(outcome)
        self.progress_batches = Histogram(
            "raven_progress_batch_reports",
            "Progress reports recorded per transaction (many runs' ticks are recorded "
            "together under load).",
            buckets=(1, 2, 5, 10, 25, 50, 100, 256),
            registry=metrics.registry,
        )

    def count_runs(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async def refresh() -> None:
            c = training_runs.c
            query = select(c.state, c.kind, func.count()).group_by(c.state, c.kind)
            async with sessions() as session:
                found = {(s, k): n for s, k, n in (await session.execute(query)).all()}
            for state in RunState:
                for kind in _KINDS:
                    self.runs.labels(state.value, kind).set(found.pop((state.value, kind), 0))
            for (state, kind), count in found.items():
                self.runs.labels(state, kind).set(count)

        self._metrics.server.add(Source("runs by state", refresh))

    def progress_batch(self, reports: int) -> None:
        self.progress_batches.observe(reports)

    def recovered(self, runs: Sequence[TrainingRun]) -> None:
        for run in runs:
            outcome = "requeued" if run.state is RunState.QUEUED else "failed"
            self.recoveries.labels(outcome).inc()
