"""Runs an evaluation's inference in its child process (trainer_worker.evaluate_process) and
turns its end into an outcome: the predictions file, or why it failed, or that it was
cancelled. The worker process itself never imports torch."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from trainer_worker.child import EventCallback, run_child, tail
from trainer_worker.failures import describe_crash
from trainer_worker.outcomes import TrainingCancelled, TrainingFailed
from trainer_worker.protocol import (
    EXIT_CANCELLED,
    EXIT_REFUSED,
    ChildEvent,
    ModelRefused,
    TrainingStarted,
)

log = structlog.get_logger(__name__)

_CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True, slots=True, kw_only=True)
class InferenceDone:
    # [{"image_id", "labels", "bboxes", "scores"}] per image (trainer_worker.evaluate_process).
    predictions: list[dict[str, Any]]
    device: str
    duration_s: float


InferenceOutcome = InferenceDone | TrainingFailed | TrainingCancelled


def inference_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "trainer_worker.evaluate_process", str(config_path)]


async def run_inference(
    *,
    config_path: Path,
    predictions_path: Path,
    log_path: Path,
    on_event: EventCallback,
    stop: asyncio.Event | None = None,
    env: Mapping[str, str] | None = None,
) -> InferenceOutcome:
    """Runs the inference of the config at `config_path`, relaying its events to `on_event`.
    Setting `stop` asks the child to stop before its next batch."""
    started = time.monotonic()
    seen: dict[str, str] = {}

    async def record(event: ChildEvent) -> None:
        if isinstance(event, TrainingStarted):
            seen["device"] = event.device
        elif isinstance(event, ModelRefused):
            seen["refused"] = event.message
        await on_event(event)

    returncode = await run_child(
        inference_command(config_path),
        env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        log_path=log_path,
        on_event=record,
        stop=stop,
    )
    duration = time.monotonic() - started
    log.info("inference ended", returncode=returncode, seconds=round(duration, 1))
    if returncode == EXIT_REFUSED or (returncode != 0 and "refused" in seen):
        return TrainingFailed(
            reason="checkpoint_mismatch",
            message=seen.get("refused", "the checkpoint does not fit the model"),
        )
    if returncode == EXIT_CANCELLED or (stop is not None and stop.is_set() and returncode != 0):
        return TrainingCancelled()
    if returncode == 0 and not await asyncio.to_thread(predictions_path.is_file):
        return TrainingFailed(
            reason="evaluation_crashed",
            message="the inference process ended without writing its predictions; "
            "the whole log is the run's `log` artifact",
        )
    if returncode != 0:
        log_text = await asyncio.to_thread(tail, log_path)
        return TrainingFailed(
            reason="evaluation_crashed",
            message=describe_crash(
                log_text, returncode=returncode, roots=(log_path.parent, _CHECKOUT)
            ).replace("training process", "inference process"),
        )
    predictions = await asyncio.to_thread(_read, predictions_path)
    return InferenceDone(
        predictions=predictions, device=seen.get("device", ""), duration_s=duration
    )


def _read(path: Path) -> list[dict[str, Any]]:
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, list):
        raise ValueError(f"{path.name} holds no list of predictions")
    return loaded
