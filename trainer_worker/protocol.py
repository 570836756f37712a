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
from pathlib import Path
from typing import Any

EVENT_PATH_ENV = "RAVEN_EVENT_PATH"
# Exit status of a child that stopped on a cancel signal (SIGTERM/SIGUSR1).
EXIT_CANCELLED = 3
# Exit status of a child whose loss became NaN or infinite (after a LossDiverged event).
EXIT_DIVERGED = 4
_CHECKPOINT = re.compile(r"^epoch_(\d+)\.pth$")


def weights_file(epoch: int) -> str:
    """The file in the work dir where the child, after training, puts the weights (and
    meta) of `epoch`'s checkpoint without its optimizer state: what the model keeps."""
    return f"epoch_{epoch}.weights.pth"


def checkpoint_epochs(work_dir: Path) -> set[int]:
    """The epochs whose full checkpoints (mmengine's `epoch_{n}.pth`) are in `work_dir`."""
    matches = (_CHECKPOINT.match(path.name) for path in work_dir.glob("epoch_*.pth"))
    return {int(match.group(1)) for match in matches if match}


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingStarted:
    max_epochs: int
    max_iters: int
    device: str
    parameter_count: int
    kind: str = "started"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressReported:
    epoch: int  # 1-based, the epoch in progress
    max_epochs: int
    iter: int  # iterations done since the start of training
    max_iters: int
    loss: float | None
    losses: Mapping[str, float] = field(default_factory=dict)
    lr: float | None = None
    eta_s: float | None = None
    kind: str = "progress"


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochTrained:
    epoch: int
    # The epoch's `train` series entry (shared.metrics.train_metrics): the mean of each
    # loss over its iterations, and the learning rate of its last one.
    losses: Mapping[str, float] = field(default_factory=dict)
    kind: str = "epoch"


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluated:
    # For "val", the epoch just trained; for "test", the best epoch, whose checkpoint was
    # evaluated once after training.
    epoch: int
    # Empty when the model detected nothing yet: no mAP is a value, not an error.
    metrics: Mapping[str, float] = field(default_factory=dict)
    split: str = "val"  # "val" | "test"
    # Images evaluated; 0 when not counted.
    image_count: int = 0
    kind: str = "evaluation"


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckpointWritten:
    """The checkpoint of a finished epoch is on disk: what a later attempt can resume from."""

    epoch: int
    iter: int
    path: str
    kind: str = "checkpoint"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingStopped:
    """The child stopped on a cancel signal, at `iter`."""

    epoch: int
    iter: int
    kind: str = "stopped"


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochsRestored:
    """The per-epoch series an earlier attempt stored in the checkpoint resumed from, so
    that the run's series stays whole although this attempt trains only the rest."""

    # [{"epoch": n, "train": {...}, "val": {...}}, ...]
    epochs: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "restored"


@dataclass(frozen=True, slots=True, kw_only=True)
class LossDiverged:
    """A loss became NaN or infinite; the child stops with EXIT_DIVERGED."""

    message: str
    kind: str = "diverged"


ChildEvent = (
    TrainingStarted
    | ProgressReported
    | EpochTrained
    | Evaluated
    | CheckpointWritten
    | TrainingStopped
    | EpochsRestored
    | LossDiverged
)

_KINDS: dict[str, type[ChildEvent]] = {
    "started": TrainingStarted,
    "progress": ProgressReported,
    "epoch": EpochTrained,
    "evaluation": Evaluated,
    "checkpoint": CheckpointWritten,
    "stopped": TrainingStopped,
    "restored": EpochsRestored,
    "diverged": LossDiverged,
}


class ProtocolError(ValueError):
    pass


def encode(event: ChildEvent) -> bytes:
    return (json.dumps(asdict(event), allow_nan=False) + "\n").encode()


def decode(line: bytes) -> ChildEvent:
    try:
        data: dict[str, Any] = json.loads(line)
        return _KINDS[data["kind"]](**data)
    except (ValueError, KeyError, TypeError) as error:
        raise ProtocolError(f"bad event line {line[:200]!r}: {error}") from None
