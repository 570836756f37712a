"""Retention: what the backbone keeps only for a while, and the job that removes it.

Four things grow with use: consumers' records of applied messages (processed_messages),
audit records, the progress entries of finished runs' histories, and finished runs'
attempt folders under the artifact root (datasets copied for training, a copy of the base
model, logs, detections: hundreds of MB for small runs). `prune` removes what is older
than the policy's windows; a window of 0 keeps that kind forever. From attempt folders it
removes every file but those recorded as artifacts (of the run, of its model, of an
evaluation it ran), so resuming, downloads and the registry keep working.

Every service process runs a `RetentionJob`; one at a time prunes: the one whose
connection holds the advisory lock `RETENTION_LOCK` for the pass (as the outbox relay
elects its publisher). `python -m shared.retention` runs one pass now.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import structlog
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.retention_files import WorkDirPrune, prune_work_dirs
from shared.settings import Settings

log = structlog.get_logger(__name__)

# The advisory lock whose holder prunes ("rvrt").
RETENTION_LOCK = 0x72767274
# Rows one statement deletes: short transactions, however large the backlog.
BATCH = 10_000
_TERMINAL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Days each kind is kept; 0: forever."""

    processed_messages_days: int = 14
    audit_days: int = 365
    work_dirs_days: int = 7
    progress_events_days: int = 30

    @classmethod
    def from_settings(cls, settings: Settings) -> RetentionPolicy:
        return cls(
            processed_messages_days=settings.retention_processed_messages_days,
            audit_days=settings.retention_audit_days,
            work_dirs_days=settings.retention_work_dirs_days,
            progress_events_days=settings.retention_progress_events_days,
        )


@dataclass(slots=True)
class PruneReport:
    """What one pass removed."""

    processed_messages: int = 0
    audit_records: int = 0
    progress_events: int = 0
    work_dirs: WorkDirPrune = field(default_factory=WorkDirPrune)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


async def prune(
    engine: AsyncEngine,
    policy: RetentionPolicy,
    artifact_root: Path,
    *,
    now: datetime | None = None,
    batch: int = BATCH,
) -> PruneReport:
    """Removes what is older than the policy's windows (no lock taken: see RetentionJob)."""
    now = now or datetime.now(UTC)
    report = PruneReport()
    if policy.processed_messages_days:
        report.processed_messages = await _delete_batches(
            engine,
            "DELETE FROM processed_messages WHERE (consumer, message_id) IN ("
            " SELECT consumer, message_id FROM processed_messages"
            " WHERE processed_time < :cutoff LIMIT :batch)",
            now - timedelta(days=policy.processed_messages_days),
            batch,
        )
    if policy.audit_days:
        # The only delete the append-only trigger lets through (migration 0009).
        report.audit_records = await _delete_batches(
            engine,
            "SELECT prune_audit_records(:cutoff, :batch)",
            now - timedelta(days=policy.audit_days),
            batch,
        )
    if policy.progress_events_days:
        report.progress_events = await _delete_batches(
            engine,
            "DELETE FROM training_run_events WHERE (run_id, sequence) IN ("
            " SELECT e.run_id, e.sequence FROM training_run_events e"
            " JOIN training_runs r ON r.id = e.run_id"
            f" WHERE e.kind = 'progress' AND r.state IN {_TERMINAL}"
            " AND r.end_time < :cutoff LIMIT :batch)",
            now - timedelta(days=policy.progress_events_days),
            batch,
        )
    if policy.work_dirs_days:
        report.work_dirs = await prune_work_dirs(
            engine, artifact_root, ended_before=now - timedelta(days=policy.work_dirs_days)
        )
    return report


async def _delete_batches(engine: AsyncEngine, statement: str, cutoff: datetime, batch: int) -> int:
    """Runs `statement` (a DELETE, or a function returning its count) until a batch
    comes back short; returns how many rows went."""
    removed = 0
    while True:
        async with engine.begin() as connection:
            result = await connection.execute(text(statement), {"cutoff": cutoff, "batch": batch})
            count = result.scalar_one() if result.returns_rows else result.rowcount
        removed += int(count)
        if count < batch:
            return removed


class RetentionJob:
    """Prunes every `interval_s` while this process holds the retention lock."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        policy: RetentionPolicy,
        artifact_root: Path,
        interval_s: float,
        first_delay_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._artifact_root = artifact_root
        self._interval_s = interval_s
        self._first_delay_s = min(first_delay_s, interval_s)
        self.passes = 0

    async def run(self) -> None:
        """Until cancelled; a failed pass is logged and tried again next interval."""
        await asyncio.sleep(self._first_delay_s)
        while True:
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("retention pass failed; trying again next interval")
            await asyncio.sleep(self._interval_s)

    async def run_once(self) -> PruneReport | None:
        """One pass, if no other process is pruning (None then)."""
        async with self._engine.connect() as connection:
            taken = (
                await connection.execute(select(func.pg_try_advisory_lock(RETENTION_LOCK)))
            ).scalar_one()
            await connection.commit()
            if not taken:
                return None
            try:
                report = await prune(self._engine, self._policy, self._artifact_root)
            finally:
                # Closing the connection releases the lock whatever state it is in.
                await connection.invalidate()
        self.passes += 1
        log.info("retention pass", **report.to_json())
        return report


async def _main(settings: Settings) -> int:
    from shared.db.engine import create_engine

    engine = create_engine(settings.database_url)
    try:
        job = RetentionJob(
            engine=engine,
            policy=RetentionPolicy.from_settings(settings),
            artifact_root=settings.resolved_artifact_root(),
            interval_s=settings.retention_interval_s,
        )
        report = await job.run_once()
    finally:
        await engine.dispose()
    if report is None:
        print("another process is pruning now; nothing done", file=sys.stderr)
        return 3
    print(json.dumps(report.to_json()))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.retention",
        description=(
            "Run one retention pass now with the RAVEN_RETENTION_* settings and print what "
            "it removed as JSON. Exits 3 when another process is pruning."
        ),
    )
    parser.parse_args(argv)
    return asyncio.run(_main(Settings()))


if __name__ == "__main__":
    sys.exit(main())
