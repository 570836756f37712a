"""The MMDetection config of a run, generated from its spec and prepared dataset.

A pure function producing the text of a Python config file that `_base_`-inherits
the architecture's config from the mmdet wheel and overrides what the run decides.
Nothing in it downloads: backbones start from random weights (`init_cfg=None`) or
from a base model's checkpoint (`load_from`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.metrics import PRIMARY_METRIC
from trainer_worker.architectures import MMDetArchitecture, architecture

# Past this many warmup iterations the upstream 1x schedule stops warming up.
_MAX_WARMUP_ITERS = 500
# numpy seeds must fit in 32 bits; the spec's seed is an int64.
_SEED_MODULUS = 2**31


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingPlan:
    """The spec's training fields, defaults already filled in."""

    architecture: str
    epochs: int
    batch_size: int
    learning_rate: float
    frozen_stages: int
    image_size: int
    seed: int
    # Loader processes of each dataloader (per rank), and whether batches go to pinned
    # memory (CUDA only): the worker's data loading (trainer_worker.devices.data_loading).
    num_workers: int = 0
    pin_memory: bool = False
    optimizer: str = "SGD"  # "SGD" | "ADAMW"
    # None: a tenth of the run, at most _MAX_WARMUP_ITERS; 0: no warm-up.
    warmup_iterations: int | None = None
    augment: bool = True
    val_interval: int = 1
    # 0: never stop early.
    early_stopping_patience: int = 0
    # None: on when the child finds CUDA. Never on CPU, where mmengine's AMP gains nothing.
    mixed_precision: bool | None = None
    # Deterministic algorithms and seeded loaders: the same spec and seed train the same
    # weights on the same hardware and software, at some cost in speed.
    deterministic: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BaseCheckpoint:
    """The verified checkpoint of the model a run fine-tunes."""

    path: Path
    architecture: str
    classes: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetFiles:
    train_path: Path
    val_path: Path
    classes: tuple[str, ...]
    train_image_count: int
    # With a test split, the child evaluates it once with the best checkpoint after training.
    test_path: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice:
    code: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedConfig:
    text: str
    # Things a person should know, e.g. the head is re-initialised for new classes.
    notices: tuple[Notice, ...]


class ConfigError(ValueError):
    """A spec that cannot become a config (the service should have refused it)."""


def generate_config(
    *,
    plan: TrainingPlan,
    dataset: DatasetFiles,
    work_dir: Path,
    configs_root: Path,
    base: BaseCheckpoint | None = None,
    resume_from: Path | None = None,
) -> GeneratedConfig:
    """The config text for `plan` on `dataset`, writing under `work_dir`. `resume_from`, a
    verified checkpoint of an earlier attempt of the same run, continues its training
    (weights, optimizer, schedule and epoch) instead of starting over."""
    arch = architecture(plan.architecture)
    _check_plan(plan, dataset)
    notices: list[Notice] = []
    reset_prefixes: tuple[str, ...] = ()
    if base is not None:
        if base.architecture and base.architecture != arch.key:
            raise ConfigError(
                f"the base model is a {base.architecture}, the run asks for {arch.key}"
            )
        if tuple(base.classes) != tuple(dataset.classes):
            reset_prefixes = arch.class_dependent_weights
            notices.append(
                Notice(
                    code="head_reinitialised",
                    message=(
                        f"the base model knows {_names(base.classes)}, the dataset has "
                        f"{_names(dataset.classes)}: the classification head starts from "
                        "random weights, the rest from the base model"
                    ),
                )
            )

    if resume_from is not None:
        # The checkpoint already holds this run's head, for this run's classes.
        reset_prefixes, notices = (), []
    load_from = resume_from or (base.path if base else None)
    iters_per_epoch = max(1, math.ceil(dataset.train_image_count / plan.batch_size))
    total_iters = iters_per_epoch * plan.epochs
    # mmengine's LinearLR reaches the full rate at iteration end - 1: with end=1 it would
    # keep the start factor for the whole run.
    if plan.warmup_iterations is None:
        warmup_iters = min(_MAX_WARMUP_ITERS, max(2, total_iters // 10))
    else:
        warmup_iters = 0 if plan.warmup_iterations == 0 else max(2, plan.warmup_iterations)
    milestones = lr_milestones(plan.epochs)
    size = plan.image_size
    persistent = plan.num_workers > 0
    seed = plan.seed % _SEED_MODULUS
    classes = tuple(dataset.classes)
    base_config = configs_root / arch.base_config
    if not base_config.is_file():
        raise ConfigError(f"mmdet base config {base_config} is missing")

    text = f"""\
# Generated by the Raven trainer worker: {arch.key}, {len(classes)} classes.
_base_ = [{str(base_config)!r}]

classes = {classes!r}
metainfo = dict(classes=classes)

model = dict(
    backbone=dict(
        {_backbone(arch)}frozen_stages={plan.frozen_stages},
        init_cfg=None,
        # The upstream configs freeze BatchNorm statistics of a pretrained backbone; a
        # randomly initialised one has no statistics worth keeping.
        norm_eval={base is not None},
    ),
{_neck(arch)}    {arch.head_overrides(len(classes))},
    # Batches of images of different shapes are padded to a multiple of the largest stride.
    data_preprocessor=dict(pad_size_divisor=32),
)

train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=({size}, {size}), keep_ratio=True),
{_augmentation(plan)}    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=None),
    dict(type="Resize", scale=({size}, {size}), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(
        type="PackDetInputs",
        meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor"),
    ),
]

train_dataloader = dict(
    batch_size={plan.batch_size},
    num_workers={plan.num_workers},
    persistent_workers={persistent},
    pin_memory={plan.pin_memory},
    # The shuffling order follows the run's seed (mmengine's default is a random one).
    sampler=dict(type="DefaultSampler", shuffle=True, seed={seed}),
    dataset=dict(
        data_root="",
        ann_file={str(dataset.train_path)!r},
        data_prefix=dict(img=""),
        metainfo=metainfo,
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers={plan.num_workers},
    persistent_workers={persistent},
    pin_memory={plan.pin_memory},
    dataset=dict(
        data_root="",
        ann_file={str(dataset.val_path)!r},
        data_prefix=dict(img=""),
        metainfo=metainfo,
        pipeline=test_pipeline,
    ),
)
val_evaluator = dict(
    type="CocoMetric",
    ann_file={str(dataset.val_path)!r},
    metric="bbox",
    classwise=True,
    format_only=False,
    backend_args=None,
)
{_test_split(dataset.test_path, plan.num_workers, plan.pin_memory)}
train_cfg = dict(
    _delete_=True,
    type="EpochBasedTrainLoop",
    max_epochs={plan.epochs},
    val_interval={plan.val_interval},
)
optim_wrapper = dict(
    _delete_=True,
    # trainer_worker.train_process makes it an AmpOptimWrapper on CUDA (raven.mixed_precision).
    type="OptimWrapper",
    optimizer={_optimizer(plan)},
    # Normalisation layers and biases are not pulled towards zero.
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0, bypass_duplicate=True),
    # Random initialisation on small data diverges without it.
    clip_grad=dict(max_norm=35, norm_type=2),
)
param_scheduler = [
{_warmup(warmup_iters)}{_steps(milestones, plan.epochs)}]
auto_scale_lr = dict(enable=False, base_batch_size=16)

default_hooks = dict(
    checkpoint=dict(type="CheckpointHook", interval=1, max_keep_ckpts=-1),
    logger=dict(type="LoggerHook", interval={max(1, min(50, iters_per_epoch))}),
)
{_custom_hooks(plan)}
# mmengine seeds python, numpy and torch, and each loader process from the seed.
randomness = dict(seed={seed}, deterministic={plan.deterministic})
work_dir = {str(work_dir)!r}
load_from = {str(load_from) if load_from else None!r}
resume = {resume_from is not None}

# Read by trainer_worker.train_process, ignored by mmengine.
raven = dict(
    reset_weights={reset_prefixes!r},
    mixed_precision={plan.mixed_precision!r},
    test_after_training={dataset.test_path is not None},
    deterministic={plan.deterministic},
)
"""
    return GeneratedConfig(text=text, notices=tuple(notices))


def _check_plan(plan: TrainingPlan, dataset: DatasetFiles) -> None:
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


def _optimizer(plan: TrainingPlan) -> str:
    if plan.optimizer == "ADAMW":
        return f'dict(type="AdamW", lr={plan.learning_rate!r}, weight_decay=0.05)'
    return f'dict(type="SGD", lr={plan.learning_rate!r}, momentum=0.9, weight_decay=0.0001)'


def _augmentation(plan: TrainingPlan) -> str:
    return '    dict(type="RandomFlip", prob=0.5),\n' if plan.augment else ""


def _warmup(iters: int) -> str:
    if iters == 0:
        return ""
    return f'    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end={iters}),\n'


def _custom_hooks(plan: TrainingPlan) -> str:
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


def _test_split(test_path: Path | None, num_workers: int, pin_memory: bool) -> str:
    if test_path is None:
        # The base config's test set is COCO's; the model's exported config points at val.
        return "test_dataloader = val_dataloader\ntest_evaluator = val_evaluator\n"
    return f"""\
test_dataloader = dict(
    batch_size=1,
    num_workers={num_workers},
    # Read once: workers that outlive the pass would only hold memory.
    persistent_workers=False,
    pin_memory={pin_memory},
    dataset=dict(
        data_root="",
        ann_file={str(test_path)!r},
        data_prefix=dict(img=""),
        metainfo=metainfo,
        pipeline=test_pipeline,
    ),
)
test_evaluator = dict(
    type="CocoMetric",
    ann_file={str(test_path)!r},
    metric="bbox",
    classwise=True,
    format_only=False,
    backend_args=None,
)
"""


def _backbone(arch: MMDetArchitecture) -> str:
    return f"depth={arch.depth}, " if arch.neck_in_channels else ""


def _neck(arch: MMDetArchitecture) -> str:
    if not arch.neck_in_channels:
        return ""
    return f"    neck=dict(in_channels={list(arch.neck_in_channels)!r}),\n"


def _steps(milestones: Sequence[int], epochs: int) -> str:
    if not milestones:
        return ""
    return (
        f'    dict(type="MultiStepLR", by_epoch=True, begin=0, end={epochs}, '
        f"milestones={list(milestones)!r}, gamma=0.1),\n"
    )


def _names(classes: Sequence[str]) -> str:
    return "[" + ", ".join(classes) + "]"
