"""Finished runs' attempt folders (`<artifact root>/runs/<run id>/attempt-<n>/`), pruned.

What a worker leaves there: the dataset copied and split for training, a copy of the base
model, mmengine's work dir (logs, scalars, configs, the last checkpoint pointer, dumped
detections), the training log, and the epoch checkpoints it kept. Of these only the files
recorded as artifacts (the run's stored checkpoints and log, its model's files, the
findings of an evaluation job) are still named anywhere: the rest goes, and a folder left
empty goes with it.

A run's folders are pruned once it has been finished for the window and no retry of it
is still active (a retry may resume from its checkpoints, which are recorded anyway).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = structlog.get_logger(__name__)

_TERMINAL = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
# Finished runs whose folders may go, with every artifact list that may name their files.
_FINISHED_RUNS = text(
    "SELECT r.id, r.artifacts,"
    " COALESCE((SELECT jsonb_agg(m.artifacts) FROM trained_models m"
    "           WHERE m.training_run_id = r.id), '[]'::jsonb) AS model_artifacts,"
    " COALESCE((SELECT e.artifacts FROM model_evaluations e WHERE e.id = r.id),"
    "          '[]'::jsonb) AS evaluation_artifacts"
    " FROM training_runs r"
    f" WHERE r.state IN {_TERMINAL} AND r.end_time < :ended_before AND r.id > :after"
    " AND NOT EXISTS (SELECT 1 FROM training_runs x WHERE x.retry_of_id = r.id"
    f"                AND x.state NOT IN {_TERMINAL})"
    " ORDER BY r.id LIMIT :page"
)
_PAGE = 500


@dataclass(slots=True)
class WorkDirPrune:
    """What pruning attempt folders removed."""

    runs: int = 0
    files: int = 0
    bytes: int = 0


async def prune_work_dirs(
    engine: AsyncEngine, artifact_root: Path, *, ended_before: datetime
) -> WorkDirPrune:
    """Prunes the attempt folders of runs finished before `ended_before`."""
    total = WorkDirPrune()
    runs_dir = artifact_root / "runs"
    if not runs_dir.is_dir():
        return total
    after = "00000000-0000-0000-0000-000000000000"
    while True:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    _FINISHED_RUNS, {"ended_before": ended_before, "after": after, "page": _PAGE}
                )
            ).all()
        for row in rows:
            folder = runs_dir / str(row.id)
            if not folder.is_dir():
                continue
            kept = recorded_paths(
                [row.artifacts, row.evaluation_artifacts, *(row.model_artifacts or [])]
            )
            removed = await asyncio.to_thread(prune_folder, folder, kept)
            if removed.files:
                total.runs += 1
                total.files += removed.files
                total.bytes += removed.bytes
                log.info(
                    "pruned a finished run's work files",
                    run_id=str(row.id),
                    files=removed.files,
                    bytes=removed.bytes,
                )
        if len(rows) < _PAGE:
            return total
        after = str(rows[-1].id)


def recorded_paths(artifact_lists: Iterable[Sequence[Any] | None]) -> frozenset[str]:
    """The local files that artifact entries (JSON: {"uri": "file:///..."}) point at."""
    paths: set[str] = set()
    for artifacts in artifact_lists:
        for artifact in artifacts or ():
            uri = str(artifact.get("uri", "")) if isinstance(artifact, dict) else ""
            parsed = urlparse(uri)
            if parsed.scheme == "file":
                paths.add(os.path.realpath(unquote(parsed.path)))
    return frozenset(paths)


def prune_folder(folder: Path, kept: frozenset[str]) -> WorkDirPrune:
    """Removes every file under `folder` whose real path is not in `kept`, then the
    folders left empty (`folder` too). Links are removed, never followed."""
    removed = WorkDirPrune()
    for parent, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path) and os.path.realpath(path) in kept:
                continue
            try:
                size = os.lstat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
            removed.files += 1
            removed.bytes += size
        for name in dirs:
            path = os.path.join(parent, name)
            if os.path.islink(path):
                os.unlink(path)
                removed.files += 1
        try:
            os.rmdir(parent)
        except OSError:
            pass  # not empty: it holds a recorded file
    return removed
