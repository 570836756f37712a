"""The catalog of supported architectures and the limits of a training spec.

Pure data: the services validate against it without importing the training
stack; the worker maps each key to its MMDetection base config.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Architecture:
    key: str
    family: str  # "retinanet" | "faster_rcnn"
    depth: int  # ResNet depth
    learning_rate: float  # SGD, for a batch of 16 in the upstream configs; scaled by batch size


ARCHITECTURES: dict[str, Architecture] = {
    a.key: a
    for a in (
        Architecture(key="retinanet_r18_fpn", family="retinanet", depth=18, learning_rate=0.01),
        Architecture(key="retinanet_r50_fpn", family="retinanet", depth=50, learning_rate=0.01),
        Architecture(key="retinanet_r101_fpn", family="retinanet", depth=101, learning_rate=0.01),
        Architecture(key="faster_rcnn_r18_fpn", family="faster_rcnn", depth=18, learning_rate=0.02),
        Architecture(key="faster_rcnn_r50_fpn", family="faster_rcnn", depth=50, learning_rate=0.02),
        Architecture(
            key="faster_rcnn_r101_fpn", family="faster_rcnn", depth=101, learning_rate=0.02
        ),
    )
}

# Defaults recorded on a run when the request leaves a field unset.
DEFAULT_EPOCHS = 12
DEFAULT_BATCH_SIZE = 2
DEFAULT_FROZEN_STAGES = 1
DEFAULT_IMAGE_SIZE = 512
DEFAULT_VAL_FRACTION = 0.2
# 0: no test split.
DEFAULT_TEST_FRACTION = 0.0
DEFAULT_OPTIMIZER = "SGD"
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
DISPLAY_NAME_MAX = 200
LABELS_MAX = 64


def default_learning_rate(architecture: Architecture, batch_size: int) -> float:
    """The linear scaling rule the upstream configs assume (their lr is for 16 images a step)."""
    return architecture.learning_rate * batch_size / 16
