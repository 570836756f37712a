"""What the live display of a run shows besides its events: the progress fields (epoch,
iterations, ETA, loss and its parts, learning rate, images per second). Pure: functions
of Progress messages and the times they arrived."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.proto.raven.training.v1 import training_run_pb2

Progress = training_run_pb2.Progress
Spec = training_run_pb2.TrainingSpec

# Weight of the newest rate in the smoothed images per second.
SMOOTHING = 0.3
DASH = "—"


def images_per_iteration(spec: Spec) -> int:
    """Images one iteration takes: the batch, which a run over several GPUs splits among
    them (README, GPUs)."""
    return spec.batch_size or 1


@dataclass(slots=True)
class Throughput:
    """Images per second over the progress reports, smoothed; None until two reports of
    the same attempt arrived with iterations between them."""

    images_per_iteration: int
    _last: tuple[float, int] | None = None
    rate: float | None = None

    def update(self, *, at: float, iteration: int) -> float | None:
        if self._last is not None:
            then, before = self._last
            elapsed, done = at - then, iteration - before
            if elapsed > 0 and done > 0:
                now = done * self.images_per_iteration / elapsed
                self.rate = (
                    now if self.rate is None else SMOOTHING * now + (1 - SMOOTHING) * self.rate
                )
            elif done < 0:
                # A new attempt started over from its checkpoint: measure afresh.
                self.rate = None
        self._last = (at, iteration)
        return self.rate


def eta_text(progress: Progress) -> str:
    seconds = int(progress.eta.ToTimedelta().total_seconds())
    if seconds <= 0:
        return DASH
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def loss_parts(progress: Progress) -> str:
    """The loss terms without their "loss_" prefix: "cls 0.412 bbox 0.230"."""
    parts = sorted((k.removeprefix("loss_"), v) for k, v in progress.losses.items() if k != "loss")
    return " ".join(f"{k} {v:.3f}" for k, v in parts)


def progress_fields(progress: Progress, rate: float | None) -> dict[str, Any]:
    """The fields of the live line, each a short string (a dash when unknown)."""
    return {
        "epoch": f"{progress.epoch}/{progress.max_epochs}" if progress.max_epochs else DASH,
        "eta": eta_text(progress),
        "loss": f"{progress.loss:.4f}" if progress.loss else DASH,
        "parts": loss_parts(progress),
        "lr": f"{progress.learning_rate:.2e}" if progress.learning_rate else DASH,
        "speed": f"{rate:.1f} img/s" if rate is not None else DASH,
    }
