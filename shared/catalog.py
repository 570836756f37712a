"""The catalog of supported architectures and the limits of a training spec.

Pure data: the services validate against it without importing the training
stack; the worker maps each key to its MMDetection base config.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared import limits


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """What the unset fields of a spec become for one architecture and starting point.

    docs/training.md says how each value was chosen, with the measurements.
    """

    optimizer: str  # "SGD" | "ADAMW"
    # Stages of the backbone kept frozen (-1: none).
    frozen_stages: int
    # A factor on the architecture's rate for the optimizer.
    learning_rate_factor: float = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    key: str
    family: str  # "retinanet" | "faster_rcnn" | "rtmdet"
    # ResNet depth; 0 for other backbones.
    depth: int
    # SGD, for a batch of 16 (the upstream configs' rate); scaled linearly by batch size.
    learning_rate: float
    # AdamW's rate, the same for every batch size (adaptive rates do not scale linearly).
    adamw_learning_rate: float
    # From random weights: every layer learns, and the upstream optimizer of the family.
    from_scratch: Recipe
    # From a base model's weights: the stem and first stage stay as learnt.
    fine_tune: Recipe

    def recipe(self, *, fine_tune: bool) -> Recipe:
        return self.fine_tune if fine_tune else self.from_scratch


_RESNET_SCRATCH = Recipe(optimizer="SGD", frozen_stages=-1, learning_rate_factor=2.0)
_RESNET_FINE_TUNE = Recipe(optimizer="SGD", frozen_stages=1)
_RTMDET_SCRATCH = Recipe(optimizer="ADAMW", frozen_stages=-1)
_RTMDET_FINE_TUNE = Recipe(optimizer="ADAMW", frozen_stages=1, learning_rate_factor=0.5)


def _resnet(key: str, family: str, depth: int, learning_rate: float) -> Architecture:
    return Architecture(
        key=key,
        family=family,
        depth=depth,
        learning_rate=learning_rate,
        adamw_learning_rate=0.0005,
        from_scratch=_RESNET_SCRATCH,
        fine_tune=_RESNET_FINE_TUNE,
    )


ARCHITECTURES: dict[str, Architecture] = {
    a.key: a
    for a in (
        _resnet("retinanet_r18_fpn", "retinanet", 18, 0.01),
        _resnet("retinanet_r50_fpn", "retinanet", 50, 0.01),
        _resnet("retinanet_r101_fpn", "retinanet", 101, 0.01),
        _resnet("faster_rcnn_r18_fpn", "faster_rcnn", 18, 0.02),
        _resnet("faster_rcnn_r50_fpn", "faster_rcnn", 50, 0.02),
        _resnet("faster_rcnn_r101_fpn", "faster_rcnn", 101, 0.02),
        # Built to train from scratch on small images (CSPNeXt backbone, dynamic label
        # assignment): learns more per CPU-second than the ResNet detectors.
        Architecture(
            key="rtmdet_tiny",
            family="rtmdet",
            depth=0,
            learning_rate=0.01,
            adamw_learning_rate=0.004,
            from_scratch=_RTMDET_SCRATCH,
            fine_tune=_RTMDET_FINE_TUNE,
        ),
    )
}

# Defaults recorded on a run when the request leaves a field unset.
DEFAULT_EPOCHS = 12
# Steps matter more than images per step on the small datasets a run often starts with, and
# 2 per step is what mmdet's own ResNet configs use per GPU. From random weights, rtmdet_tiny
# with batches of 8 or 4 often never found one of two classes (its quality-weighted losses
# give a class whose first boxes miss no signal); with batches of 2 it found both by epoch 4
# for every seed tried (docs/training.md). On a GPU, set a larger batch for throughput.
DEFAULT_BATCH_SIZE = 2
DEFAULT_IMAGE_SIZE = 512
DEFAULT_VAL_FRACTION = 0.2
# 0: no test split.
DEFAULT_TEST_FRACTION = 0.0
DEFAULT_VAL_INTERVAL = 1
# 0: training never stops early.
DEFAULT_EARLY_STOPPING_PATIENCE = 0
OPTIMIZERS = ("SGD", "ADAMW")

# Inclusive bounds.
EPOCHS = (1, 500)
BATCH_SIZE = (1, 64)
MAX_LEARNING_RATE = 1.0
FROZEN_STAGES = (-1, 4)
IMAGE_SIZE = (32, 4096)
VAL_FRACTION = (0.05, 0.5)
# A test fraction is 0 or within these bounds.
TEST_FRACTION = (0.05, 0.5)
# val_fraction + test_fraction: a fifth of the images at least stays for training.
MAX_HELD_OUT_FRACTION = 0.8
GPU_COUNT = (1, 8)
WARMUP_ITERATIONS = (0, 10_000)
VAL_INTERVAL = (1, 100)
EARLY_STOPPING_PATIENCE = (0, 100)
DISPLAY_NAME_MAX = limits.DISPLAY_NAME_MAX
LABELS_MAX = limits.LABELS_MAX


def default_learning_rate(
    architecture: Architecture, *, optimizer: str, batch_size: int, fine_tune: bool
) -> float:
    """SGD: the linear scaling rule the upstream configs assume (their rate is for 16 images
    a step); AdamW: the architecture's rate whatever the batch. Times the recipe's factor."""
    factor = architecture.recipe(fine_tune=fine_tune).learning_rate_factor
    if optimizer == "ADAMW":
        return architecture.adamw_learning_rate * factor
    return architecture.learning_rate * batch_size / 16 * factor
