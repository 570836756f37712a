"""TrainingRun aggregates for tests of the domain, made as the service makes them."""

from __future__ import annotations

from datetime import UTC, datetime

from services.training_runs.domain import TrainingRun

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def queued() -> TrainingRun:
    return TrainingRun.create(
        display_name="run",
        labels={},
        spec={"architecture": "retinanet_r18_fpn", "dataset_uri": "d.json"},
        base_model_id=None,
        creator="user",
        request_id=None,
        request_hash=None,
        now=NOW,
    )


def running() -> TrainingRun:
    """A run that worker `w` claimed and started on the CPU."""
    run = queued()
    run.start_preparing(worker_id="w", actor="worker:w", now=NOW)
    run.start_running(device="cpu", actor="worker:w", now=NOW)
    return run
