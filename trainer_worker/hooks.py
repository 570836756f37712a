"""mmengine hooks of the training child: progress reporting, cancellation, checkpoint
pruning, and the test split's evaluation with the best checkpoint after training.

Imported only inside the child process (it imports mmengine and torch).
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmengine.hooks import Hook

from shared.metrics import TOTAL_LOSS, best_epoch, is_loss, train_metrics
from trainer_worker.protocol import (
    CheckpointWritten,
    ChildEvent,
    EpochsRestored,
    EpochTrained,
    Evaluated,
    ProgressReported,
    TrainingStarted,
    checkpoint_epochs,
    encode,
)

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
            number = _number(value)
            if number is not None and not math.isfinite(number):
                raise TrainingDiverged(
                    f"{key} is {number} at epoch {runner.epoch + 1}, iteration {runner.iter + 1}: "
                    "lower the learning rate or check the dataset's boxes"
                )


class ProgressHook(Hook):  # type: ignore[misc]
    """Reports progress (throttled), per-epoch mean losses and each validation's metrics.

    It also keeps the run's per-epoch series inside every checkpoint, so that an attempt
    resuming from one reports the whole series and not only the epochs it trained.
    """

    priority = "LOW"

    def __init__(self, writer: EventWriter, *, min_interval_s: float = 0.5) -> None:
        self._writer = writer
        self._min_interval_s = min_interval_s
        self._started = 0.0
        self._last_sent = 0.0
        self._sums: dict[str, float] = {}
        self._count = 0
        self._last: ProgressReported | None = None
        self._train_history: dict[int, dict[str, float]] = {}
        self._val_history: dict[int, dict[str, float]] = {}

    def before_save_checkpoint(self, runner: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[HISTORY_KEY] = _series(self._train_history, self._val_history)

    def after_load_checkpoint(self, runner: Any, checkpoint: dict[str, Any]) -> None:
        # A base model's checkpoint (load_from without resume) belongs to another run.
        if not getattr(runner, "_resume", False):
            return
        restored = checkpoint.get(HISTORY_KEY) or []
        for entry in restored:
            epoch = int(entry["epoch"])
            if entry.get("train"):
                self._train_history[epoch] = _floats(entry["train"])
            if entry.get("val"):
                self._val_history[epoch] = _floats(entry["val"])
        if restored:
            self._writer.send(
                EpochsRestored(epochs=_series(self._train_history, self._val_history))
            )

    def before_train(self, runner: Any) -> None:
        self._started = time.monotonic()
        parameters = list(runner.model.parameters())
        device = _describe(parameters[0].device) if parameters else "cpu"
        self._writer.send(
            TrainingStarted(
                max_epochs=runner.max_epochs,
                max_iters=runner.max_iters,
                device=device,
                parameter_count=sum(p.numel() for p in parameters),
            )
        )

    def before_train_epoch(self, runner: Any) -> None:
        self._sums, self._count = {}, 0

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        values = _floats(outputs or {})
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        done = runner.iter + 1
        elapsed = time.monotonic() - self._started
        self._last = ProgressReported(
            epoch=runner.epoch + 1,
            max_epochs=runner.max_epochs,
            iter=done,
            max_iters=runner.max_iters,
            loss=values.get(TOTAL_LOSS),
            losses={k: v for k, v in values.items() if is_loss(k) and k != TOTAL_LOSS},
            lr=_learning_rate(runner),
            eta_s=elapsed / done * max(0, runner.max_iters - done),
        )
        now = time.monotonic()
        if now - self._last_sent >= self._min_interval_s:
            self._last_sent = now
            self._writer.send(self._last)

    def after_train_epoch(self, runner: Any) -> None:
        if self._last is not None:
            self._writer.send(self._last)
            self._last_sent = time.monotonic()
        if self._count:
            means = {k: v / self._count for k, v in self._sums.items()}
            # The live series' names (shared.metrics), with the learning rate of the
            # epoch's last iteration, as the last progress report had it.
            means = train_metrics(
                loss=means.get(TOTAL_LOSS),
                losses=means,
                lr=self._last.lr if self._last is not None else None,
            )
            self._train_history[runner.epoch + 1] = means
            self._writer.send(EpochTrained(epoch=runner.epoch + 1, losses=means))

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, Any] | None = None) -> None:
        # After the train loop counted the epoch: runner.epoch is the finished epoch's number.
        values = _floats(metrics or {})
        self._val_history[runner.epoch] = values
        self._writer.send(Evaluated(epoch=runner.epoch, metrics=values))


class CheckpointReportHook(Hook):  # type: ignore[misc]
    """Reports each epoch's checkpoint once mmengine's CheckpointHook has written it and
    the epoch's validation, if one follows, is over.

    A reported checkpoint is where a later attempt resumes, after its epoch: reported
    before its validation, a worker lost in between would leave the epoch never
    validated. An epoch without a validation is reported when the next one starts or
    training ends.
    """

    priority = "LOWEST"

    def __init__(self, writer: EventWriter) -> None:
        self._writer = writer
        self._pending: CheckpointWritten | None = None

    def after_train_epoch(self, runner: Any) -> None:
        self._flush()
        epoch = runner.epoch + 1
        path = Path(runner.work_dir) / f"epoch_{epoch}.pth"
        if path.is_file():
            self._pending = CheckpointWritten(epoch=epoch, iter=runner.iter, path=str(path))

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, Any] | None = None) -> None:
        # ProgressHook (a higher priority) sent the epoch's metrics already.
        self._flush()

    def before_train_epoch(self, runner: Any) -> None:
        self._flush()

    def after_train(self, runner: Any) -> None:
        self._flush()

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and Path(pending.path).is_file():
            self._writer.send(pending)


class PruneCheckpointsHook(Hook):  # type: ignore[misc]
    """Keeps only the best epoch's and the latest checkpoint (for resume) on disk.

    A resumed attempt starts with the validations of the earlier epochs whose checkpoints
    the worker put in its work dir (the best one's, the one resumed from): the best epoch
    may be one of them.
    """

    priority = "VERY_LOW"

    def __init__(self) -> None:
        self._evaluations: dict[int, dict[str, float]] = {}

    def after_load_checkpoint(self, runner: Any, checkpoint: dict[str, Any]) -> None:
        # A base model's checkpoint (load_from without resume) belongs to another run.
        if not getattr(runner, "_resume", False):
            return
        placed = checkpoint_epochs(Path(runner.work_dir))
        for entry in checkpoint.get(HISTORY_KEY) or []:
            epoch = int(entry["epoch"])
            if epoch in placed:
                self._evaluations[epoch] = _floats(entry.get("val") or {})

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, Any] | None = None) -> None:
        epoch = runner.epoch
        self._evaluations[epoch] = _floats(metrics or {})
        best = best_epoch(self._evaluations, last_epoch=epoch)
        work_dir = Path(runner.work_dir)
        for stale in checkpoint_epochs(work_dir) - {best, epoch}:
            (work_dir / f"epoch_{stale}.pth").unlink(missing_ok=True)

    def best(self, runner: Any) -> int | None:
        """The epoch whose checkpoint the run keeps: chosen among this attempt's validations
        and the placed earlier epochs', as the parent chooses it (trainer_worker.training)."""
        return best_epoch(self._evaluations, last_epoch=runner.epoch)


def evaluate_test_split(runner: Any, *, epoch: int, writer: EventWriter) -> bool:
    """Evaluates the test split once with the weights of `epoch`'s checkpoint and reports
    it as a "test" evaluation. False when that checkpoint is not on disk (the parent then
    fails the run as incomplete)."""
    from mmengine.model import is_model_wrapper
    from mmengine.runner import load_checkpoint

    checkpoint = Path(runner.work_dir) / f"epoch_{epoch}.pth"
    if not checkpoint.is_file():
        return False
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    # Weights only, and through no hook: ProgressHook must not take this load for a resume.
    # `runner.test()` loads nothing more: `train()` already ran its load_or_resume.
    load_checkpoint(model, str(checkpoint), map_location="cpu", logger=runner.logger)
    metrics = runner.test()
    writer.send(
        Evaluated(
            epoch=epoch,
            metrics=_floats(metrics or {}),
            split="test",
            image_count=len(runner.test_dataloader.dataset),
        )
    )
    return True


def _describe(device: Any) -> str:
    """ "cpu", or the CUDA device with its name and memory, as nvidia-smi would show them."""
    if device.type != "cuda":
        return str(device)
    import torch

    props = torch.cuda.get_device_properties(device)
    count = torch.cuda.device_count()
    return f"{device} ({props.name}, {props.total_memory / 2**30:.0f} GiB, {count} visible)"


def _series(
    train: Mapping[int, Mapping[str, float]], val: Mapping[int, Mapping[str, float]]
) -> list[dict[str, Any]]:
    return [
        {"epoch": e, "train": dict(train.get(e, {})), "val": dict(val.get(e, {}))}
        for e in sorted(set(train) | set(val))
    ]


def _floats(values: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers only: NaN and infinity cannot travel as JSON, and mean nothing."""
    out: dict[str, float] = {}
    for key, value in values.items():
        number = _number(value)
        if number is not None and math.isfinite(number):
            out[key] = number
    return out


def _number(value: Any) -> float | None:
    # The total loss still carries its graph: converting it directly makes torch warn.
    if hasattr(value, "detach"):
        value = value.detach()
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _learning_rate(runner: Any) -> float | None:
    try:
        rates = runner.optim_wrapper.get_lr()
    except Exception:
        return None
    for values in rates.values():
        if values:
            return float(values[0])
    return None
