"""Training configs for tests: the tiny model they train, the dataset files a worker
writes for a job, and the mmengine config a generated config's text loads as."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_worker.config import DatasetFiles

# The model the integration tests train for real, on CPU in seconds: a TrainingPlan's or
# a TrainingSpec's fields.
TINY_TRAINING: dict[str, Any] = {
    "architecture": "retinanet_r18_fpn",
    "batch_size": 4,
    "learning_rate": 0.01,
    "frozen_stages": -1,
    "image_size": 128,
}


def dataset_files(
    directory: Path, classes: tuple[str, ...], *, train_image_count: int, test: bool = False
) -> DatasetFiles:
    """train.json and val.json in `directory`, and test.json with a test split."""
    return DatasetFiles(
        train_path=directory / "train.json",
        val_path=directory / "val.json",
        classes=classes,
        train_image_count=train_image_count,
        test_path=directory / "test.json" if test else None,
    )


def load_config(path: Path, text: str) -> Any:
    """The mmengine Config of a generated config's `text`, written to `path`."""
    from mmengine.config import Config

    path.write_text(text)
    return Config.fromfile(str(path))
