"""The training child's progress reporting: throttled progress, per-epoch mean losses,
each validation's metrics, and the run's per-epoch series kept inside its checkpoints.

Imported only inside the child process (it imports mmengine and torch).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any

from mmengine.hooks import Hook

from shared.metrics import TOTAL_LOSS, is_loss, train_metrics
from trainer_worker.hooks import HISTORY_KEY, EventWriter, finite_floats
from trainer_worker.protocol import (
    EpochsRestored,
    EpochTrained,
    Evaluated,
    ProgressReported,
    TrainingStarted,
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
        self._epoch_started = 0.0
        self._window = _Window()

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
                self._train_history[epoch] = finite_floats(entry["train"])
            if entry.get("val"):
                self._val_history[epoch] = finite_floats(entry["val"])
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
        self._epoch_started = time.monotonic()

    def after_train_iter(
        self, runner: Any, batch_idx: int, data_batch: Any = None, outputs: Any = None
    ) -> None:
        values = finite_floats(outputs or {})
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        self._count += 1
        done = runner.iter + 1
        elapsed = time.monotonic() - self._started
        iter_time, data_time = _timer(runner, "time"), _timer(runner, "data_time")
        self._window.add(iter_time, data_time, _images(data_batch))
        self._last = ProgressReported(
            epoch=runner.epoch + 1,
            max_epochs=runner.max_epochs,
            iter=done,
            max_iters=runner.max_iters,
            loss=values.get(TOTAL_LOSS),
            losses={k: v for k, v in values.items() if is_loss(k) and k != TOTAL_LOSS},
            lr=_learning_rate(runner),
            eta_s=elapsed / done * max(0, runner.max_iters - done),
            iter_time_s=iter_time,
            data_time_s=data_time,
        )
        now = time.monotonic()
        if now - self._last_sent >= self._min_interval_s:
            self._last_sent = now
            self._send_last()

    def _send_last(self) -> None:
        if self._last is None:
            return
        self._writer.send(self._window.onto(self._last))
        self._window = _Window()

    def after_train_epoch(self, runner: Any) -> None:
        duration = time.monotonic() - self._epoch_started if self._epoch_started else None
        if self._last is not None:
            self._send_last()
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
            self._writer.send(
                EpochTrained(epoch=runner.epoch + 1, losses=means, duration_s=duration)
            )

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, Any] | None = None) -> None:
        # After the train loop counted the epoch: runner.epoch is the finished epoch's number.
        values = finite_floats(metrics or {})
        self._val_history[runner.epoch] = values
        self._writer.send(Evaluated(epoch=runner.epoch, metrics=values))


@dataclass(slots=True)
class _Window:
    """The iterations since the last progress report: their count, times and images."""

    iters: int = 0
    time_s: float = 0.0
    data_time_s: float = 0.0
    images: int = 0

    def add(self, iter_time: float | None, data_time: float | None, images: int) -> None:
        self.iters += 1
        self.time_s += iter_time or 0.0
        self.data_time_s += data_time or 0.0
        self.images += images

    def onto(self, progress: ProgressReported) -> ProgressReported:
        return dataclasses.replace(
            progress,
            window_iters=self.iters,
            window_time_s=self.time_s,
            window_data_time_s=self.data_time_s,
            window_images=self.images,
        )


def _timer(runner: Any, name: str) -> float | None:
    """IterTimerHook's `train/time` or `train/data_time` of the last iteration."""
    try:
        value = float(runner.message_hub.get_scalar(f"train/{name}").current())
    except Exception:
        return None
    return value if math.isfinite(value) else None


def _images(data_batch: Any) -> int:
    """The images of this iteration's batch over every rank (rank 0's batch size times
    the world size: each rank trains a batch of the same size)."""
    inputs = data_batch.get("inputs") if isinstance(data_batch, Mapping) else None
    if not isinstance(inputs, Sized):
        return 0
    from mmengine.dist import get_world_size

    return len(inputs) * int(get_world_size())


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


def _learning_rate(runner: Any) -> float | None:
    try:
        rates = runner.optim_wrapper.get_lr()
    except Exception:
        return None
    for values in rates.values():
        if values:
            return float(values[0])
    return None
