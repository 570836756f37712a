"""What a training produced: the outcome of a child, and the model's files collected from
its work dir after a clean exit (the best epoch's checkpoint, the resolved config, the
metrics and the split)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.metrics import best_epoch
from shared.storage import sha256_file
from trainer_worker.devices import DataLoading
from trainer_worker.protocol import (
    ChildEvent,
    EpochsRestored,
    EpochTrained,
    Evaluated,
    LossDiverged,
    TrainingStarted,
    weights_file,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactFile:
    kind: str  # "config" | "checkpoint" | "metrics" | "split" | "log" | "report" | "plot"
    path: Path
    size_bytes: int
    sha256: str
    # Set where a kind has several files (the plots): what a download names.
    name: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class EpochRecord:
    epoch: int
    train: Mapping[str, float] = field(default_factory=dict)
    val: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingSucceeded:
    artifacts: tuple[ArtifactFile, ...]
    best_epoch: int
    # Empty when no epoch produced metrics.
    best_metrics: Mapping[str, float]
    epochs: tuple[EpochRecord, ...]
    epochs_trained: int
    duration_s: float
    parameter_count: int
    device: str
    # The test split's evaluation with the best epoch's checkpoint; None without a test split.
    test_evaluation: Evaluated | None = None
    # Images each validation evaluated (the worker knows its split); 0: unknown.
    val_image_count: int = 0
    # How the run's dataloaders loaded; None: unknown (a training outside a worker).
    data_loading: DataLoading | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingFailed:
    reason: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingCancelled:
    pass


TrainingOutcome = TrainingSucceeded | TrainingFailed | TrainingCancelled


@dataclass(slots=True)
class Observed:
    device: str = ""
    parameter_count: int = 0
    train: dict[int, Mapping[str, float]] = field(default_factory=dict)
    val: dict[int, Mapping[str, float]] = field(default_factory=dict)
    # Epochs an earlier attempt trained; this attempt's own records take precedence.
    restored_train: dict[int, Mapping[str, float]] = field(default_factory=dict)
    restored_val: dict[int, Mapping[str, float]] = field(default_factory=dict)
    # The test split's evaluation after training: never an epoch of the series.
    test: Evaluated | None = None
    diverged: str = ""

    def record(self, event: ChildEvent) -> None:
        if isinstance(event, TrainingStarted):
            self.device, self.parameter_count = event.device, event.parameter_count
        elif isinstance(event, EpochTrained):
            self.train[event.epoch] = event.losses
        elif isinstance(event, Evaluated) and event.split == "test":
            self.test = event
        elif isinstance(event, Evaluated):
            self.val[event.epoch] = event.metrics
        elif isinstance(event, EpochsRestored):
            for entry in event.epochs:
                epoch = int(entry["epoch"])
                if entry.get("train"):
                    self.restored_train[epoch] = entry["train"]
                if entry.get("val"):
                    self.restored_val[epoch] = entry["val"]
        elif isinstance(event, LossDiverged):
            self.diverged = event.message

    def series(self) -> tuple[dict[int, Mapping[str, float]], dict[int, Mapping[str, float]]]:
        """Train and val records of every epoch of the run, earlier attempts' included."""
        return {**self.restored_train, **self.train}, {**self.restored_val, **self.val}


def collect(
    *,
    observed: Observed,
    placed: set[int],
    work_dir: Path,
    config_path: Path,
    artifact_dir: Path,
    split_path: Path,
    log_path: Path,
    duration_s: float,
) -> TrainingOutcome:
    train, val = observed.series()
    last_epoch = max(train, default=0)
    # Chosen among this attempt's epochs and the earlier ones whose checkpoints were placed
    # in the work dir, as the child's PruneCheckpointsHook chooses it.
    restored = {e: m for e, m in observed.restored_val.items() if e in placed}
    best = best_epoch({**restored, **observed.val}, last_epoch=last_epoch)
    checkpoint = work_dir / f"epoch_{best}.pth"
    if best is None or not checkpoint.is_file():
        return TrainingFailed(
            reason="training_incomplete",
            message=f"training exited cleanly without a checkpoint for epoch {best} in {work_dir}",
        )
    epochs = tuple(
        EpochRecord(epoch=e, train=train.get(e, {}), val=val.get(e, {}))
        for e in sorted(set(train) | set(val))
    )
    artifact_dir.mkdir(parents=True, exist_ok=True)
    # mmengine dumps the config it ran, `_base_` resolved: it loads without our files.
    resolved = work_dir / config_path.name
    shutil.copyfile(resolved if resolved.is_file() else config_path, artifact_dir / "config.py")
    # The model's checkpoint holds its weights: the optimizer state only served resuming.
    weights = work_dir / weights_file(best)
    os.replace(weights if weights.is_file() else checkpoint, artifact_dir / "checkpoint.pth")
    for stale in work_dir.glob("epoch_*.pth"):
        stale.unlink(missing_ok=True)
    shutil.copyfile(split_path, artifact_dir / "split.json")
    shutil.copyfile(log_path, artifact_dir / "train.log")
    # Only an evaluation of the checkpoint the model keeps describes the model.
    tested = observed.test if observed.test and observed.test.epoch == best else None
    (artifact_dir / "metrics.json").write_text(
        json.dumps(
            {
                "best_epoch": best,
                "epochs": [
                    {"epoch": r.epoch, "train": dict(r.train), "val": dict(r.val)} for r in epochs
                ],
                **({"test": _test_entry(tested)} if tested else {}),
                "parameter_count": observed.parameter_count,
                "device": observed.device,
                "duration_s": round(duration_s, 3),
            },
            indent=2,
        )
    )
    artifacts = tuple(
        _artifact(kind, artifact_dir / name)
        for kind, name in (
            ("config", "config.py"),
            ("checkpoint", "checkpoint.pth"),
            ("metrics", "metrics.json"),
            ("split", "split.json"),
            ("log", "train.log"),
        )
    )
    return TrainingSucceeded(
        artifacts=artifacts,
        best_epoch=best,
        best_metrics=val.get(best, {}),
        epochs=epochs,
        epochs_trained=last_epoch,
        duration_s=duration_s,
        parameter_count=observed.parameter_count,
        device=observed.device,
        test_evaluation=tested,
    )


def _test_entry(tested: Evaluated) -> dict[str, object]:
    return {
        "epoch": tested.epoch,
        "image_count": tested.image_count,
        "metrics": dict(tested.metrics),
    }


def _artifact(kind: str, path: Path) -> ArtifactFile:
    return ArtifactFile(
        kind=kind, path=path, size_bytes=path.stat().st_size, sha256=sha256_file(path)
    )
