"""The inference config of an evaluation job (trainer_worker.evaluation_config): every
architecture's head sized for the model's classes, the loader over the chosen images in
their order, nothing that downloads, and what the inference child reads besides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.configs import load_config
from trainer_worker.architectures import MMDET_ARCHITECTURES, mmdet_configs_root
from trainer_worker.evaluation_config import InferenceInputs, inference_config
from trainer_worker.plan import ConfigError

pytest.importorskip("mmengine.config")
try:
    CONFIGS = mmdet_configs_root()
except RuntimeError as missing:
    pytest.skip(f"needs the mmdet wheel: {missing}", allow_module_level=True)


def inputs(tmp_path: Path, **changes: Any) -> InferenceInputs:
    values: dict[str, Any] = {
        "architecture": "retinanet_r18_fpn",
        "model_classes": ("dump", "tire", "bottle"),
        "images_path": tmp_path / "images.json",
        "dataset_classes": ("tire", "dump"),
        "checkpoint": tmp_path / "model.pth",
        "predictions_path": tmp_path / "predictions.json",
        "image_size": 320,
        "batch_size": 3,
        "num_workers": 2,
        "pin_memory": True,
    }
    return InferenceInputs(**{**values, **changes})


def num_classes(model: Any) -> int:
    head = model.get("roi_head", {}).get("bbox_head") or model["bbox_head"]
    return int(head["num_classes"])


@pytest.mark.parametrize("architecture", sorted(MMDET_ARCHITECTURES))
def test_every_architecture_loads_sized_for_the_models_classes(
    tmp_path: Path, architecture: str
) -> None:
    given = inputs(tmp_path, architecture=architecture)
    cfg = load_config(tmp_path / "config.py", inference_config(given, configs_root=CONFIGS))

    assert num_classes(cfg.model) == 3
    assert cfg.model.backbone.init_cfg is None, "nothing is downloaded"
    loader = cfg.test_dataloader
    assert (loader.batch_size, loader.num_workers, loader.pin_memory) == (3, 2, True)
    assert loader.persistent_workers is False
    assert loader.sampler == {"type": "DefaultSampler", "shuffle": False}
    assert loader.dataset.ann_file == str(tmp_path / "images.json")
    assert loader.dataset.test_mode is True
    assert loader.dataset.metainfo == {"classes": ("tire", "dump")}
    resize = next(s for s in loader.dataset.pipeline if s["type"] == "Resize")
    assert resize["scale"] == (320, 320)
    assert not any(s["type"] == "LoadAnnotations" for s in loader.dataset.pipeline)
    assert cfg.raven == {
        "checkpoint": str(tmp_path / "model.pth"),
        "predictions": str(tmp_path / "predictions.json"),
        "model_classes": ("dump", "tire", "bottle"),
    }


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"model_classes": ()}, "no classes"),
        ({"batch_size": 0}, "batch_size (0)"),
        ({"image_size": 16}, "image_size (16)"),
    ],
)
def test_inputs_no_inference_can_run_on_are_refused(
    tmp_path: Path, changes: dict[str, Any], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        inference_config(inputs(tmp_path, **changes), configs_root=CONFIGS)
