"""A running run's stored checkpoints and its per-epoch series. Pure Python.

The checkpoints are artifact entries of kind RESUME_CHECKPOINT, each with its epoch:
only the newest epoch's and the best epoch's stay, as only their files stay on the
worker's disk (trainer_worker.checkpoint_hooks.PruneCheckpointsHook).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from shared import metrics
from shared.payloads import Artifact, EpochMetrics

# Kind of the artifact entries that hold the stored checkpoints of a running run.
RESUME_CHECKPOINT = "resume_checkpoint"


def is_checkpoint(artifact: Artifact) -> bool:
    return artifact.kind == RESUME_CHECKPOINT


def stored(artifacts: Iterable[Artifact]) -> list[Artifact]:
    return [a for a in artifacts if is_checkpoint(a)]


def newest(artifacts: Iterable[Artifact]) -> Artifact | None:
    return max(stored(artifacts), key=lambda a: a.epoch or 0, default=None)


def of_epoch(artifacts: Iterable[Artifact], epoch: int) -> Artifact | None:
    return next((a for a in stored(artifacts) if a.epoch == epoch), None)


def with_checkpoint(
    artifacts: Sequence[Artifact], checkpoint: Artifact, *, epoch: int
) -> list[Artifact]:
    """`artifacts` with `checkpoint` as the stored one of `epoch` (replacing an earlier one)."""
    entry = replace(checkpoint, kind=RESUME_CHECKPOINT, epoch=epoch)
    return [*(a for a in artifacts if not is_checkpoint(a) or a.epoch != epoch), entry]


def pruned(artifacts: Sequence[Artifact], *, best_epoch: int | None) -> list[Artifact]:
    """Only the newest and the best epoch's checkpoints stay recorded."""
    latest = newest(artifacts)
    keep = {best_epoch, latest.epoch if latest else None}
    return [a for a in artifacts if not is_checkpoint(a) or a.epoch in keep]


def best_epoch(series: Sequence[EpochMetrics], *, last_validated: int) -> int | None:
    """shared.metrics.best_epoch over the `val` entries of the series."""
    return metrics.best_epoch({e.epoch: e.val for e in series}, last_epoch=last_validated)


def with_epoch(
    series: Sequence[EpochMetrics],
    epoch: int,
    *,
    train: Mapping[str, float] | None = None,
    val: Mapping[str, float] | None = None,
) -> list[EpochMetrics]:
    """The series with `epoch`'s entry (added when missing) given `train` and/or `val`."""
    entry = next((e for e in series if e.epoch == epoch), EpochMetrics(epoch=epoch))
    if train is not None:
        entry = replace(entry, train=dict(train))
    if val is not None:
        entry = replace(entry, val=dict(val))
    return sorted([*(e for e in series if e.epoch != epoch), entry], key=lambda e: e.epoch)


def merged_series(
    live: Sequence[EpochMetrics], final: Sequence[EpochMetrics]
) -> list[EpochMetrics]:
    """The worker's series (epoch means) wins; the live one fills what it lacks: a resumed
    attempt does not know the validation of the epoch it resumed from, which the earlier
    attempt reported."""
    merged = {e.epoch: e for e in live}
    for entry in final:
        before = merged.get(entry.epoch, EpochMetrics(epoch=entry.epoch))
        merged[entry.epoch] = EpochMetrics(
            epoch=entry.epoch, train=entry.train or before.train, val=entry.val or before.val
        )
    return [merged[e] for e in sorted(merged)]
