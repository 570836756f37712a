"""Retention on the real stack: what is older than its window goes, what is newer stays,
and the files recorded as artifacts stay with their run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db.engine import create_engine
from shared.names import TRAINING_RUNS, parse_name
from shared.proto.raven.training.v1 import common_pb2, training_run_pb2, worker_pb2
from shared.retention import RETENTION_LOCK, RetentionJob, RetentionPolicy, prune
from shared.settings import Settings
from tests.support import WorkerDriver, create_request, eventually

TrainingRun = training_run_pb2.TrainingRun
pytestmark = pytest.mark.timeout(120)

# Only the kind under test is pruned by each test.
NOTHING = RetentionPolicy(
    processed_messages_days=0, audit_days=0, work_dirs_days=0, progress_events_days=0
)


@pytest.fixture(scope="module")
async def engine(settings: Settings, training_runs: object) -> AsyncIterator[AsyncEngine]:
    """The session's database, migrated by the running service."""
    engine = create_engine(settings.database_url, pool_size=4)
    yield engine
    await engine.dispose()


def days_ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def test_processed_messages_older_than_the_window_go(
    engine: AsyncEngine, settings: Settings
) -> None:
    consumer = f"retention-{uuid.uuid4().hex[:8]}"
    async with engine.begin() as connection:
        for message_id, age in [("old-1", 20), ("old-2", 15), ("new-1", 13), ("new-2", 0)]:
            await connection.execute(
                text(
                    "INSERT INTO processed_messages (consumer, message_id, processed_time)"
                    " VALUES (:c, :m, :t)"
                ),
                {"c": consumer, "m": message_id, "t": days_ago(age)},
            )
    policy = RetentionPolicy(
        processed_messages_days=14, audit_days=0, work_dirs_days=0, progress_events_days=0
    )
    # Small batches: the loop over batches is exercised too.
    report = await prune(engine, policy, settings.resolved_artifact_root(), batch=1)
    assert report.processed_messages >= 2
    async with engine.connect() as connection:
        left = (
            await connection.execute(
                text("SELECT message_id FROM processed_messages WHERE consumer = :c"),
                {"c": consumer},
            )
        ).scalars()
        assert sorted(left) == ["new-1", "new-2"]


async def _audit(engine: AsyncEngine, identity: str, ages: list[float]) -> None:
    async with engine.begin() as connection:
        for age in ages:
            await connection.execute(
                text(
                    "INSERT INTO audit_records (time, identity, rpc, outcome)"
                    " VALUES (:t, :i, 'Test/Retention', 'ok')"
                ),
                {"t": days_ago(age), "i": identity},
            )


async def _audit_ages(engine: AsyncEngine, identity: str) -> list[int]:
    async with engine.connect() as connection:
        times = (
            await connection.execute(
                text("SELECT time FROM audit_records WHERE identity = :i ORDER BY time"),
                {"i": identity},
            )
        ).scalars()
        return sorted(round((datetime.now(UTC) - t) / timedelta(days=1)) for t in times)


async def test_audit_records_go_only_through_the_retention_path(
    engine: AsyncEngine, settings: Settings
) -> None:
    identity = f"spiffe://retention.test/{uuid.uuid4().hex[:8]}"
    await _audit(engine, identity, [400, 40, 31, 29, 3])
    # Still append-only for every other statement: plain DELETE, UPDATE, a cutoff inside
    # the floor, and a hand-set cutoff for a young row.
    refused = [
        "DELETE FROM audit_records WHERE identity = :i",
        "UPDATE audit_records SET detail = 'x' WHERE identity = :i",
        "SELECT prune_audit_records(now() - interval '1 day', 100)",
        "SELECT set_config('raven.audit_prune_cutoff', (now() - interval '30 days')::text, true),"
        " (SELECT count(*) FROM (DELETE FROM audit_records WHERE identity = :i RETURNING 1) d)",
    ]
    for statement in refused:
        with pytest.raises(DBAPIError):
            async with engine.begin() as connection:
                await connection.execute(text(statement), {"i": identity})
    assert await _audit_ages(engine, identity) == [3, 29, 31, 40, 400]

    policy = RetentionPolicy(
        processed_messages_days=0, audit_days=30, work_dirs_days=0, progress_events_days=0
    )
    report = await prune(engine, policy, settings.resolved_artifact_root(), batch=2)
    assert report.audit_records >= 3
    assert await _audit_ages(engine, identity) == [3, 29]


async def test_the_settings_refuse_an_audit_window_under_a_week() -> None:
    with pytest.raises(ValueError, match="retention_audit_days"):
        Settings(retention_audit_days=3)
    assert Settings(retention_audit_days=0).retention_audit_days == 0


def _write(path: Path, size: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


def _attempt_files(folder: Path) -> dict[str, Path]:
    """What a worker leaves in an attempt folder (trainer_worker.job.Attempt)."""
    return {
        "config": _write(folder / "config.py"),
        "log": _write(folder / "train.log"),
        "train.json": _write(folder / "dataset" / "train.json", 5000),
        "split": _write(folder / "dataset" / "split.json"),
        "base": _write(folder / "work" / "base_model.pth", 200_000),
        "checkpoint": _write(folder / "work" / "epoch_2.pth", 100_000),
        "stale": _write(folder / "work" / "epoch_1.pth", 100_000),
        "scalars": _write(folder / "work" / "20261203_141312" / "vis_data" / "scalars.json"),
        "detections": _write(folder / "work" / "detections" / "val_epoch_2.bbox.json"),
        "last": _write(folder / "work" / "last_checkpoint"),
    }


def _artifact(kind: str, path: Path) -> common_pb2.Artifact:
    return common_pb2.Artifact(kind=kind, uri=path.as_uri(), size_bytes=path.stat().st_size)


async def _finished_run(
    runs, js, subjects, dataset_uri: str, root: Path, *, ending: str
) -> tuple[TrainingRun, dict[str, Path]]:
    """A run that trained two epochs (progress, a stored checkpoint) and then failed with
    its log (which replaces its recorded checkpoints) or was cancelled (which keeps them)."""
    run = await runs.CreateTrainingRun(create_request(dataset_uri))
    run_id = parse_name(run.name, TRAINING_RUNS)
    files = _attempt_files(root / "runs" / str(run_id) / "attempt-1")
    worker = WorkerDriver(js, subjects, run)
    await worker.send(preparing=worker_pb2.WorkerEvent.Preparing())
    await worker.send(running=worker_pb2.WorkerEvent.Running(device="cpu"))
    for iteration in (1, 2, 3):
        await worker.send(
            progress=training_run_pb2.Progress(epoch=1, max_epochs=2, iteration=iteration)
        )
    await worker.send(
        checkpoint_saved=worker_pb2.WorkerEvent.CheckpointSaved(
            epoch=2, iteration=6, checkpoint=_artifact("checkpoint", files["checkpoint"])
        )
    )
    if ending == "failed":
        failure = training_run_pb2.Failure(reason="training_crashed", message="a test crash")
        failure.artifacts.append(_artifact("log", files["log"]))
        await worker.send(failed=failure)
        state = TrainingRun.FAILED
    else:

        async def recorded() -> set[str] | None:
            found = await _recorded_uris_of(runs, run.name)
            return found or None

        await eventually(recorded)
        await runs.CancelTrainingRun(training_run_pb2.CancelTrainingRunRequest(name=run.name))
        await worker.send(cancelled=worker_pb2.WorkerEvent.Cancelled())
        state = TrainingRun.CANCELLED

    async def ended() -> TrainingRun | None:
        found = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        return found if found.state == state else None

    return await eventually(ended), files


async def _recorded_uris_of(runs, name: str) -> set[str]:
    found = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))
    return {a.uri for a in found.artifacts}


async def _event_kinds(engine: AsyncEngine, run_id: uuid.UUID) -> list[str]:
    async with engine.connect() as connection:
        kinds = (
            await connection.execute(
                text("SELECT kind FROM training_run_events WHERE run_id = :r ORDER BY sequence"),
                {"r": run_id},
            )
        ).scalars()
        return list(kinds)


async def _recorded_uris(engine: AsyncEngine, run_id: uuid.UUID) -> set[str]:
    async with engine.connect() as connection:
        artifacts = (
            await connection.execute(
                text("SELECT artifacts FROM training_runs WHERE id = :r"), {"r": run_id}
            )
        ).scalar_one()
    return {a["uri"] for a in artifacts}


async def test_finished_runs_lose_their_work_files_and_progress_but_keep_what_is_recorded(
    engine: AsyncEngine, settings: Settings, runs, js, subjects, dataset_uri: str
) -> None:
    root = settings.resolved_artifact_root()
    failed, failed_files = await _finished_run(
        runs, js, subjects, dataset_uri, root, ending="failed"
    )
    cancelled, cancelled_files = await _finished_run(
        runs, js, subjects, dataset_uri, root, ending="cancelled"
    )
    new, new_files = await _finished_run(runs, js, subjects, dataset_uri, root, ending="failed")
    failed_id = parse_name(failed.name, TRAINING_RUNS)
    cancelled_id = parse_name(cancelled.name, TRAINING_RUNS)
    new_id = parse_name(new.name, TRAINING_RUNS)
    # An active run's folder is never touched, however old the run.
    active = await runs.CreateTrainingRun(create_request(dataset_uri))
    active_id = parse_name(active.name, TRAINING_RUNS)
    active_files = _attempt_files(root / "runs" / str(active_id) / "attempt-1")
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE training_runs SET end_time = :t WHERE id IN (:a, :b)"),
            {"t": days_ago(40), "a": failed_id, "b": cancelled_id},
        )
        await connection.execute(
            text("UPDATE training_runs SET create_time = :t WHERE id = :r"),
            {"t": days_ago(40), "r": active_id},
        )
    assert await _recorded_uris(engine, failed_id) == {failed_files["log"].as_uri()}
    assert await _recorded_uris(engine, cancelled_id) == {cancelled_files["checkpoint"].as_uri()}
    assert "progress" in await _event_kinds(engine, failed_id)
    new_history = await _event_kinds(engine, new_id)

    policy = RetentionPolicy(
        processed_messages_days=0, audit_days=0, work_dirs_days=7, progress_events_days=30
    )
    report = await prune(engine, policy, root)

    # The old runs: only their recorded files stay; their histories keep all but the
    # progress entries.
    assert {name for name, path in failed_files.items() if path.exists()} == {"log"}
    assert {name for name, path in cancelled_files.items() if path.exists()} == {"checkpoint"}
    assert not failed_files["train.json"].parent.exists()
    assert not failed_files["checkpoint"].parent.exists()
    for run_id in (failed_id, cancelled_id):
        history = await _event_kinds(engine, run_id)
        assert "state_changed" in history and "progress" not in history
    assert report.work_dirs.runs >= 2 and report.work_dirs.files >= 18
    assert report.work_dirs.bytes >= 2 * 300_000
    assert report.progress_events >= 2
    # Newer and active runs: untouched.
    assert all(path.exists() for path in new_files.values())
    assert all(path.exists() for path in active_files.values())
    assert await _event_kinds(engine, new_id) == new_history
    # The runs still read as before, their recorded files where they were.
    got = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=failed.name))
    assert got.state == TrainingRun.FAILED and got.failure.reason == "training_crashed"
    assert await _recorded_uris_of(runs, cancelled.name) == {cancelled_files["checkpoint"].as_uri()}

    # A second pass finds nothing more to do.
    again = await prune(engine, policy, root)
    assert again.work_dirs.files == 0 and again.progress_events == 0


async def test_one_process_prunes_at_a_time(engine: AsyncEngine, settings: Settings) -> None:
    job = RetentionJob(
        engine=engine,
        policy=NOTHING,
        artifact_root=settings.resolved_artifact_root(),
        interval_s=3600,
    )
    async with engine.connect() as holder:
        await holder.execute(text("SELECT pg_advisory_lock(:k)"), {"k": RETENTION_LOCK})
        await holder.commit()
        assert await job.run_once() is None
        await holder.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": RETENTION_LOCK})
        await holder.commit()
    assert await job.run_once() is not None
    assert job.passes == 1


async def test_the_entry_point_runs_one_pass(settings: Settings, engine: AsyncEngine) -> None:
    env = {
        **os.environ,
        "RAVEN_DATABASE_URL": settings.database_url,
        "RAVEN_ARTIFACT_ROOT": str(settings.artifact_root),
    }
    help_text = (
        await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shared.retention", "--help"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    ).stdout
    assert "RAVEN_RETENTION_" in help_text
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "shared.retention"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report) == {"processed_messages", "audit_records", "progress_events", "work_dirs"}
