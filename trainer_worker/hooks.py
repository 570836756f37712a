"""mmengine hooks of the training child that stop it: cancellation and divergence; and
the event writer every reporting hook sends through (trainer_worker.progress_hook,
trainer_worker.checkpoint_hooks).

Imported only inside the child process (it imports mmengine and torch).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from typing import Any

from mmengine.hooks import Hook

from trainer_worker.protocol import ChildEvent, encode

# Where the per-epoch series travels inside an mmengine checkpoint.
HISTORY_KEY = "raven_epochs"


class EventWriter:
    """Writes protocol lines to the parent's pipe; a no-op without one (a manual run)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def send(self, event: ChildEvent) -> None:
        if self._fd is None:
            return
        data = encode(event)
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]


class TrainingCancelled(Exception):
    """Raised from a hook to leave `Runner.train()` at the next iteration."""


class CancelHook(Hook):  # type: ignore[misc]
    """Stops training at the next iteration once `request()` was called (from a signal)."""

    priority = "HIGHEST"

    def __init__(self) -> None:
        self._requested = threading.Event()

    def request(self) -> None:
        self._requested.set()

    def _check(self) -> None:
        if self._requested.is_set():
            raise TrainingCancelled

    def before_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self._check()

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        self._check()

    def before_val_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self._check()

    def before_test_iter(self, runner: Any, batch_idx: int, data_batch: Any = None) -> None:
        self._check()


class TrainingDiverged(Exception):
    """Raised when a loss stops being a finite number: further training is noise."""


class DivergenceHook(Hook):  # type: ignore[misc]
    """Stops the run at the first iteration whose loss is NaN or infinite."""

    priority = "HIGH"

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        for key, value in (outputs or {}).items():
            if not key.startswith("loss"):
                continue
            number = as_number(value)
            if number is not None and not math.isfinite(number):
                raise TrainingDiverged(
                    f"{key} is {number} at epoch {runner.epoch + 1}, iteration {runner.iter + 1}: "
                    "lower the learning rate or check the dataset's boxes"
                )


def finite_floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only: NaN and infinity cannot travel as JSON, and mean nothing."""
    out: dict[str, float] = {}
    for key, value in values.items():
        number = as_number(value)
        if number is not None and math.isfinite(number):
            out[key] = number
    return out


def as_number(value: Any) -> float | None:
    # The total loss still carries its graph: converting it directly makes torch warn.
    if hasattr(value, "detach"):
        value = value.detach()
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None
