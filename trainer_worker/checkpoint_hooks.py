"""The training child's checkpoints: each reported once its epoch is validated, only the
best and the latest kept on disk (with their validation's detections, for the run's
report), and the test split evaluated with the best one.

Imported only inside the child process (it imports mmengine and torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmengine.hooks import Hook

from shared.metrics import best_epoch
from trainer_worker import detections
from trainer_worker.distributed import is_rank_zero
from trainer_worker.hooks import HISTORY_KEY, EventWriter, finite_floats
from trainer_worker.protocol import CheckpointWritten, Evaluated, checkpoint_epochs


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
    """Keeps only the best epoch's and the latest checkpoint (for resume) on disk, and the
    detections of those epochs' validations (CocoMetric dumps them; rank 0 only).

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
                self._evaluations[epoch] = finite_floats(entry.get("val") or {})

    def after_val_epoch(self, runner: Any, metrics: Mapping[str, Any] | None = None) -> None:
        epoch = runner.epoch
        self._evaluations[epoch] = finite_floats(metrics or {})
        best = best_epoch(self._evaluations, last_epoch=epoch)
        work_dir = Path(runner.work_dir)
        for stale in checkpoint_epochs(work_dir) - {best, epoch}:
            (work_dir / f"epoch_{stale}.pth").unlink(missing_ok=True)
        _keep_detections(work_dir, "val", epoch, keep={epoch, best if best is not None else epoch})

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
    _keep_detections(Path(runner.work_dir), "test", epoch, keep={epoch})
    writer.send(
        Evaluated(
            epoch=epoch,
            metrics=finite_floats(metrics or {}),
            split="test",
            image_count=len(runner.test_dataloader.dataset),
        )
    )
    return True


def _keep_detections(work_dir: Path, split: str, epoch: int, *, keep: set[int]) -> None:
    """Names the evaluation's dump of `split` after `epoch` and drops other epochs' but
    `keep`: a val dump is as large as the split times the detections per image. Rank 0
    alone dumps (CocoMetric computes there), and alone renames: the ranks share a work dir."""
    if not is_rank_zero():
        return
    dumped = detections.dumped(work_dir, split)
    if dumped.is_file():
        dumped.replace(detections.of_epoch(work_dir, split, epoch))
    for stale in detections.kept_epochs(work_dir, split) - keep:
        detections.of_epoch(work_dir, split, stale).unlink(missing_ok=True)
