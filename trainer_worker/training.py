"""Runs one training in a child process (trainer_worker.child) and turns its end into an
outcome: on a clean exit, the model's files collected into the run's artifact folder
(trainer_worker.outcomes); otherwise why it failed or that it was cancelled.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import structlog

from trainer_worker import storage_faults
from trainer_worker.child import EventCallback, child_command, free_port, run_child, tail
from trainer_worker.failures import describe_crash
from trainer_worker.outcomes import (
    ArtifactFile,
    EpochRecord,
    Observed,
    TrainingCancelled,
    TrainingFailed,
    TrainingOutcome,
    TrainingSucceeded,
    collect,
)
from trainer_worker.protocol import EXIT_CANCELLED, EXIT_DIVERGED, ChildEvent, checkpoint_epochs

__all__ = [
    "ArtifactFile",
    "EpochRecord",
    "TrainingCancelled",
    "TrainingFailed",
    "TrainingOutcome",
    "TrainingSucceeded",
    "place_checkpoint",
    "run_training",
]

log = structlog.get_logger(__name__)

_CHECKOUT = Path(__file__).resolve().parents[1]


async def run_training(
    *,
    config_path: Path,
    work_dir: Path,
    artifact_dir: Path,
    split_path: Path,
    log_path: Path,
    on_event: EventCallback,
    stop: asyncio.Event | None = None,
    env: Mapping[str, str] | None = None,
    processes: int = 1,
) -> TrainingOutcome:
    """Trains with the mmengine config at `config_path` (whose work_dir is `work_dir`).

    `on_event` sees every child event as it arrives. Setting `stop` asks the child
    to stop at its next iteration; a child that finished first still succeeds.
    Cancelling the calling task kills the child. With `processes` > 1, torch's
    distributed launcher starts that many ranks, one per GPU of `env`'s
    CUDA_VISIBLE_DEVICES, and rank 0 reports.
    """
    started = time.monotonic()
    await asyncio.to_thread(work_dir.mkdir, parents=True, exist_ok=True)
    # Checkpoints in the work dir before training are earlier epochs' (place_checkpoint).
    placed = await asyncio.to_thread(checkpoint_epochs, work_dir)
    observed = Observed()

    async def record(event: ChildEvent) -> None:
        observed.record(event)
        await on_event(event)

    returncode = await run_child(
        child_command(config_path, processes=processes, port=free_port() if processes > 1 else 0),
        env={
            **os.environ,
            **(env or {}),
            # mmengine checkpoints hold pickled objects; the only checkpoints a child loads
            # are the ones this system wrote or verified by sha256 before the run.
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
            "PYTHONUNBUFFERED": "1",
        },
        log_path=log_path,
        on_event=record,
        stop=stop,
    )
    duration = time.monotonic() - started
    log.info(
        "training ended", config=str(config_path), returncode=returncode, seconds=round(duration, 1)
    )

    # Under the launcher, a rank's own exit status becomes the launcher's failure: the
    # events say what happened.
    if returncode == EXIT_DIVERGED or (returncode != 0 and observed.diverged):
        return TrainingFailed(reason="diverged", message=observed.diverged or "the loss diverged")
    if returncode == EXIT_CANCELLED or (stop is not None and stop.is_set() and returncode != 0):
        return TrainingCancelled()
    if returncode != 0:
        log_text = await asyncio.to_thread(tail, log_path)
        # A checkpoint or a log line that could not be written is no crash of the training.
        fault = await asyncio.to_thread(storage_faults.diagnose, work_dir, log_text)
        if fault is not None:
            return TrainingFailed(reason=fault[0], message=storage_faults.message(*fault))
        return TrainingFailed(
            reason="training_crashed",
            message=describe_crash(
                log_text, returncode=returncode, roots=(log_path.parent, _CHECKOUT)
            ),
        )
    try:
        return await asyncio.to_thread(
            collect,
            observed=observed,
            placed=placed,
            work_dir=work_dir,
            config_path=config_path,
            artifact_dir=artifact_dir,
            split_path=split_path,
            log_path=log_path,
            duration_s=duration,
        )
    except OSError as error:
        fault = storage_faults.fault_of(error, within=artifact_dir.parent.parent)
        if fault is None:
            raise
        return TrainingFailed(reason=fault[0], message=storage_faults.message(*fault))


def place_checkpoint(source: Path, work_dir: Path, *, epoch: int) -> None:
    """Puts an earlier attempt's checkpoint of `epoch` into this attempt's work dir before
    training, so that the best checkpoint is chosen among that epoch too."""
    work_dir.mkdir(parents=True, exist_ok=True)
    target = work_dir / f"epoch_{epoch}.pth"
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        # Another file system: training prunes and moves the work dir's files, so a copy.
        shutil.copyfile(source, target)
