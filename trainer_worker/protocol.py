"""What the training child process tells its parent: one JSON object per line.

The child (rank 0 of a distributed run) writes to the FIFO named by
`RAVEN_EVENT_PATH`; the parent decodes each line into one of these events.
Torch-free on purpose: the parent never imports the training stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

EVENT_PATH_ENV = "RAVEN_EVENT_PATH"
# Exit status of a child that stopped on a cancel signal (SIGTERM/SIGUSR1).
EXIT_CANCELLED = 3
# Exit status of a child whose loss became NaN or infinite (after a LossDiverged event).
EXIT_DIVERGED = 4
# Exit status of an inference child whose checkpoint does not fit its model (after a
# ModelRefused event).
EXIT_REFUSED = 5
_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pth$")


def weights_file(epoch: int) -> str:
    """The file in the work dir where the child, after training, puts the weights (and
    meta) of `epoch`'s checkpoint without its optimizer state: what the model keeps."""
    return f"epoch_{epoch}.weights.pth"


def checkpoint_epochs(work_dir: Path) -> set[int]:
    """The epochs whose full checkpoints (mmengine's `epoch_{n}.pth`) are in `work_dir`."""
    matches = (_CHECKPOINT.match(path.name) for path in work_dir.glob("epoch_*.pth"))
    return {int(match.group(1)) for match in matches if match}


class ChildEventKind(StrEnum):
    """The `kind` of an event line: which event it is."""

    STARTED = "started"
    PROGRESS = "progress"
    EPOCH = "epoch"
    EVALUATION = "evaluation"
    CHECKPOINT = "checkpoint"
    STOPPED = "stopped"
    RESTORED = "restored"
    DIVERGED = "diverged"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingStarted:
    kind: ClassVar[ChildEventKind] = ChildEventKind.STARTED
    max_epochs: int
    max_iters: int
    device: str
    parameter_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressReported:
    kind: ClassVar[ChildEventKind] = ChildEventKind.PROGRESS
    epoch: int  # 1-based, the epoch in progress
    max_epochs: int
    iter: int  # iterations done since the start of training
    max_iters: int
    loss: float | None
    losses: Mapping[str, float] = field(default_factory=dict)
    lr: float | None = None
    eta_s: float | None = None
    # mmengine's IterTimerHook times of the last iteration: `time` (the whole iteration)
    # and `data_time` (waiting for its batch); the rest is compute.
    iter_time_s: float | None = None
    data_time_s: float | None = None
    # Since the previous report: iterations, their summed `time` and `data_time`, and the
    # images they trained on (all ranks).
    window_iters: int = 0
    window_time_s: float = 0.0
    window_data_time_s: float = 0.0
    window_images: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochTrained:
    kind: ClassVar[ChildEventKind] = ChildEventKind.EPOCH
    epoch: int
    # The epoch's `train` series entry (shared.metrics.train_metrics): the mean of each
    # loss over its iterations, and the learning rate of its last one.
    losses: Mapping[str, float] = field(default_factory=dict)
    # Wall time from the epoch's start to the end of its last iteration.
    duration_s: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluated:
    kind: ClassVar[ChildEventKind] = ChildEventKind.EVALUATION
    # For "val", the epoch just trained; for "test", the best epoch, whose checkpoint was
    # evaluated once after training.
    epoch: int
    # Empty when the model detected nothing yet: no mAP is a value, not an error.
    metrics: Mapping[str, float] = field(default_factory=dict)
    split: str = "val"  # "val" | "test"
    # Images evaluated; 0 when not counted.
    image_count: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointWritten:
    """The checkpoint of a finished epoch is on disk: what a later attempt can resume from."""

    kind: ClassVar[ChildEventKind] = ChildEventKind.CHECKPOINT
    epoch: int
    iter: int
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingStopped:
    """The child stopped on a cancel signal, at `iter`."""

    kind: ClassVar[ChildEventKind] = ChildEventKind.STOPPED
    epoch: int
    iter: int


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochsRestored:
    """The per-epoch series an earlier attempt stored in the checkpoint resumed from, so
    that the run's series stays whole although this attempt trains only the rest."""

    kind: ClassVar[ChildEventKind] = ChildEventKind.RESTORED
    # [{"epoch": n, "train": {...}, "val": {...}}, ...]
    epochs: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class LossDiverged:
    """A loss became NaN or infinite; the child stops with EXIT_DIVERGED."""

    kind: ClassVar[ChildEventKind] = ChildEventKind.DIVERGED
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRefused:
    """The inference child cannot load the checkpoint into the model it built; it stops
    with EXIT_REFUSED."""

    kind: ClassVar[ChildEventKind] = ChildEventKind.REFUSED
    message: str


ChildEvent = (
    TrainingStarted
    | ProgressReported
    | EpochTrained
    | Evaluated
    | CheckpointWritten
    | TrainingStopped
    | EpochsRestored
    | LossDiverged
    | ModelRefused
)

_KINDS: dict[ChildEventKind, type[ChildEvent]] = {
    cls.kind: cls
    for cls in (
        TrainingStarted,
        ProgressReported,
        EpochTrained,
        Evaluated,
        CheckpointWritten,
        TrainingStopped,
        EpochsRestored,
        LossDiverged,
        ModelRefused,
    )
}


class ProtocolError(ValueError):
    pass


def encode(event: ChildEvent) -> bytes:
    data = {"kind": event.kind.value, **asdict(event)}
    return (json.dumps(data, allow_nan=False) + "\n").encode()


def decode(line: bytes) -> ChildEvent:
    try:
        data = json.loads(line)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        fields: dict[str, Any] = dict(data)
        return _KINDS[ChildEventKind(fields.pop("kind"))](**fields)
    except (ValueError, KeyError, TypeError) as error:
        raise ProtocolError(f"bad event line {line[:200]!r}: {error}") from None
