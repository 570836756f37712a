"""The parts of a run's MMDetection config that depend on its plan, each a fragment of
the config's text (trainer_worker.config puts them together)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from shared.metrics import PRIMARY_METRIC
from trainer_worker.architectures import MMDetArchitecture
from trainer_worker.plan import ConfigError, TrainingPlan

if TYPE_CHECKING:
    from trainer_worker.config import DatasetFiles


def check_plan(plan: TrainingPlan, dataset: DatasetFiles) -> None:
    if not dataset.classes:
        raise ConfigError("the dataset has no classes")
    if plan.epochs < 1 or plan.batch_size < 1 or plan.image_size < 32:
        raise ConfigError(
            f"epochs ({plan.epochs}) and batch_size ({plan.batch_size}) must be positive "
            f"and image_size ({plan.image_size}) at least 32"
        )
    if not 0 < plan.learning_rate <= 1:
        raise ConfigError(f"learning_rate {plan.learning_rate} is outside (0, 1]")
    if not -1 <= plan.frozen_stages <= 4:
        raise ConfigError(f"frozen_stages {plan.frozen_stages} is outside -1..4")
    if plan.optimizer not in ("SGD", "ADAMW"):
        raise ConfigError(f"unknown optimizer {plan.optimizer!r}")
    if not 1 <= plan.val_interval <= plan.epochs:
        raise ConfigError(f"val_interval {plan.val_interval} is outside 1..{plan.epochs}")


def lr_milestones(epochs: int) -> list[int]:
    """The 1x schedule's steps (epochs 8 and 11 of 12) scaled to `epochs`; none for runs
    too short to have a distinct step."""
    if epochs < 4:
        return []
    steps = {round(epochs * 8 / 12), round(epochs * 11 / 12)}
    return sorted(m for m in steps if 0 < m < epochs)


def optimizer(plan: TrainingPlan) -> str:
    if plan.optimizer == "ADAMW":
        return f'dict(type="AdamW", lr={plan.learning_rate!r}, weight_decay=0.05)'
    return f'dict(type="SGD", lr={plan.learning_rate!r}, momentum=0.9, weight_decay=0.0001)'


def augmentation(plan: TrainingPlan) -> str:
    return '    dict(type="RandomFlip", prob=0.5),\n' if plan.augment else ""


def warmup(iters: int) -> str:
    if iters == 0:
        return ""
    return f'    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end={iters}),\n'


def custom_hooks(plan: TrainingPlan) -> str:
    # Replaces the base config's hooks: RTMDet's EMA would make the best epoch's checkpoint
    # and the weights validated differ, and its pipeline switch assumes 640-pixel images.
    if plan.early_stopping_patience == 0:
        return "custom_hooks = []\n"
    # A validation without detections has no mAP: the hook skips it, it is not a bad epoch.
    return (
        "custom_hooks = [\n"
        f'    dict(type="EarlyStoppingHook", monitor="{PRIMARY_METRIC}", rule="greater", '
        f"patience={plan.early_stopping_patience}),\n"
        "]\n"
    )


def test_split(test_path: Path | None, plan: TrainingPlan) -> str:
    if test_path is None:
        # The base config's test set is COCO's; the model's exported config points at val.
        return "test_dataloader = val_dataloader\ntest_evaluator = val_evaluator\n"
    # Read once: workers that outlive the pass would only hold memory.
    loader = dataloader("test", test_path, plan, batch_size=1, persistent=False)
    return loader + evaluator("test", test_path)


def dataloader(
    split: str,
    ann_file: Path,
    plan: TrainingPlan,
    *,
    batch_size: int,
    persistent: bool,
    shuffle_seed: int | None = None,
) -> str:
    """The `<split>_dataloader` of the COCO file `ann_file`, with the plan's loader processes
    and pinning: the train pipeline for "train" (shuffled in the order of `shuffle_seed`),
    the test pipeline for the others."""
    sampler = (
        ""
        if shuffle_seed is None
        else "    # The shuffling order follows the run's seed (mmengine's default is a random one).\n"
        f'    sampler=dict(type="DefaultSampler", shuffle=True, seed={shuffle_seed}),\n'
    )
    return f"""\
{split}_dataloader = dict(
    batch_size={batch_size},
    num_workers={plan.num_workers},
    persistent_workers={persistent},
    pin_memory={plan.pin_memory},
{sampler}    dataset=dict(
        data_root="",
        ann_file={str(ann_file)!r},
        data_prefix=dict(img=""),
        metainfo=metainfo,
        pipeline={"train" if split == "train" else "test"}_pipeline,
    ),
)
"""


def evaluator(split: str, ann_file: Path) -> str:
    """The `<split>_evaluator`: COCO box metrics of the COCO file `ann_file`, per class too."""
    return f"""\
{split}_evaluator = dict(
    type="CocoMetric",
    ann_file={str(ann_file)!r},
    metric="bbox",
    classwise=True,
    format_only=False,
    backend_args=None,
)
"""


def backbone(arch: MMDetArchitecture) -> str:
    return f"depth={arch.depth}, " if arch.neck_in_channels else ""


def neck(arch: MMDetArchitecture) -> str:
    if not arch.neck_in_channels:
        return ""
    return f"    neck=dict(in_channels={list(arch.neck_in_channels)!r}),\n"


def steps(milestones: Sequence[int], epochs: int) -> str:
    if not milestones:
        return ""
    return (
        f'    dict(type="MultiStepLR", by_epoch=True, begin=0, end={epochs}, '
        f"milestones={list(milestones)!r}, gamma=0.1),\n"
    )


def names(classes: Sequence[str]) -> str:
    return "[" + ", ".join(classes) + "]"
