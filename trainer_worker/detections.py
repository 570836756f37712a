"""Where the training child leaves the detections of its evaluations, in COCO results
format (mmdet's CocoMetric `outfile_prefix` dumps), for the run's report to picture
the kept model's predictions. Pure: paths only, imported by the child and the worker."""

from __future__ import annotations

from pathlib import Path

# CocoMetric writes `<outfile_prefix>.bbox.json`.
_SUFFIX = ".bbox.json"


def folder(work_dir: Path) -> Path:
    return work_dir / "detections"


def outfile_prefix(work_dir: Path, split: str) -> str:
    """What the `<split>_evaluator` dumps to on each evaluation (the latest one wins)."""
    return str(folder(work_dir) / split)


def dumped(work_dir: Path, split: str) -> Path:
    """The latest evaluation's dump of `split`."""
    return folder(work_dir) / f"{split}{_SUFFIX}"


def of_epoch(work_dir: Path, split: str, epoch: int) -> Path:
    """The dump of `split` evaluated with `epoch`'s weights, kept under that name."""
    return folder(work_dir) / f"{split}_epoch_{epoch}{_SUFFIX}"


def kept_epochs(work_dir: Path, split: str) -> set[int]:
    prefix = f"{split}_epoch_"
    epochs = set()
    for path in folder(work_dir).glob(f"{prefix}*{_SUFFIX}"):
        number = path.name.removeprefix(prefix).removesuffix(_SUFFIX)
        if number.isdigit():
            epochs.add(int(number))
    return epochs
