"""The child-event relay: what the training child reports becomes the job's WorkerEvents."""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from shared.metrics import best_epoch
from shared.proto.raven.training.v1 import worker_pb2
from trainer_worker import events
from trainer_worker.dataset import PreparedDataset
from trainer_worker.job import WorkerEnvironment, attempt_key_prefix
from trainer_worker.protocol import (
    CheckpointWritten,
    ChildEvent,
    EpochsRestored,
    Evaluated,
    ProgressReported,
    TrainingStarted,
)
from trainer_worker.publisher import EventPublisher
from trainer_worker.upload import stored_checkpoint


@dataclass(frozen=True, slots=True, kw_only=True)
class ChildEventRelay:
    """Publishes each child event of one attempt as the WorkerEvent it means."""

    publisher: EventPublisher
    environment: WorkerEnvironment
    run_id: str
    attempt: int
    prepared: PreparedDataset
    # Epochs of an earlier attempt whose checkpoints this attempt's work dir holds.
    placed: Set[int]

    async def __call__(self, event: ChildEvent) -> None:
        if self.environment.metrics is not None:
            self.environment.metrics.child_event(self.run_id, event)
        if isinstance(event, TrainingStarted):
            await self.publisher.publish(
                running=worker_pb2.WorkerEvent.Running(device=event.device)
            )
        elif isinstance(event, ProgressReported):
            await self.publisher.publish(progress=events.progress(event))
        elif isinstance(event, Evaluated):
            await self._evaluated(event)
        elif isinstance(event, EpochsRestored):
            await self._restored(event)
        elif isinstance(event, CheckpointWritten):
            await self._checkpoint(event)

    async def _evaluated(self, event: Evaluated) -> None:
        prepared = self.prepared
        count = prepared.test_image_count if event.split == "test" else prepared.val_image_count
        # Stored before the epoch's checkpoint is reported: an attempt resuming from that
        # checkpoint does not validate the epoch again.
        await self.publisher.publish(
            critical=True, evaluation=events.evaluation(event, image_count=count)
        )

    async def _restored(self, event: EpochsRestored) -> None:
        restored = {int(e["epoch"]): e.get("val") or {} for e in event.epochs}
        best = best_epoch(restored, last_epoch=0)
        if best is None or best in self.placed:
            return
        await self.publisher.publish(
            notice=events.notice(
                "best_checkpoint_unavailable",
                f"epoch {best} of an earlier attempt has the best mAP so far, but its "
                "checkpoint is not available: the model's checkpoint is chosen among "
                f"epochs {', '.join(map(str, sorted(self.placed)))} and this attempt's",
            )
        )

    async def _checkpoint(self, event: CheckpointWritten) -> None:
        checkpoint = await stored_checkpoint(
            Path(event.path), attempt_key_prefix(self.run_id, self.attempt), self.environment
        )
        if checkpoint is None:
            await self.publisher.publish(
                notice=events.notice(
                    "checkpoint_not_stored",
                    f"the checkpoint of epoch {event.epoch} could not be stored: "
                    "a resumed attempt starts from an earlier one",
                )
            )
            return
        await self.publisher.publish(
            checkpoint_saved=worker_pb2.WorkerEvent.CheckpointSaved(
                epoch=event.epoch, iteration=event.iter, checkpoint=checkpoint
            )
        )
