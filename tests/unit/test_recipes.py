"""Every architecture x optimizer x starting point: the generated config builds with
mmengine's own builders (model, optimizer wrapper, schedulers) and takes a training step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from shared import catalog
from shared.proto.raven.training.v1 import training_run_pb2
from tests.configs import dataset_files, load_config
from trainer_worker.architectures import mmdet_configs_root
from trainer_worker.config import BaseCheckpoint, generate_config
from trainer_worker.plan import plan_of

torch = pytest.importorskip("torch")
mmengine_config = pytest.importorskip("mmengine.config")
try:
    CONFIGS = mmdet_configs_root()
except RuntimeError as missing:
    pytest.skip(f"needs the mmdet wheel: {missing}", allow_module_level=True)

CLASSES = ("dump", "tire")
Optimizer = training_run_pb2.TrainingSpec.Optimizer


def _config(tmp_path: Path, key: str, optimizer: str, *, fine_tune: bool) -> tuple[Any, Any]:
    spec = training_run_pb2.TrainingSpec(
        architecture=key, epochs=12, image_size=64, optimizer=Optimizer.Value(optimizer)
    )
    plan = plan_of(spec, fine_tune=fine_tune)
    generated = generate_config(
        plan=plan,
        dataset=dataset_files(tmp_path, CLASSES, train_image_count=40),
        work_dir=tmp_path / "work",
        configs_root=CONFIGS,
        base=BaseCheckpoint(path=tmp_path / "base.pth", architecture=key, classes=CLASSES)
        if fine_tune
        else None,
    )
    return plan, load_config(tmp_path / f"{optimizer}-{fine_tune}.py", generated.text)


def _batch() -> dict[str, Any]:
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    sample = DetDataSample(
        metainfo={"img_shape": (64, 64), "ori_shape": (64, 64), "scale_factor": (1.0, 1.0)}
    )
    sample.gt_instances = InstanceData(
        bboxes=torch.tensor([[8.0, 8.0, 40.0, 36.0]]), labels=torch.tensor([1])
    )
    image = torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8)
    return {"inputs": [image], "data_samples": [sample]}


@pytest.mark.parametrize("key", sorted(catalog.ARCHITECTURES))
def test_every_recipe_builds_and_trains_a_step(tmp_path: Path, key: str) -> None:
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    register_all_modules(init_default_scope=True)
    torch.manual_seed(0)
    for fine_tune in (False, True):
        for optimizer in catalog.OPTIMIZERS:
            plan, cfg = _config(tmp_path, key, optimizer, fine_tune=fine_tune)
            model = MODELS.build(cfg.model)
            model.init_weights()
            model.train()
            frozen = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
            if fine_tune:
                assert frozen, f"{key}: a fine-tune keeps the first backbone stage as learnt"
            else:
                assert not frozen, f"{key}: from random weights every layer learns: {frozen[:3]}"

            wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
            expected = {"SGD": "SGD", "ADAMW": "AdamW"}[optimizer]
            assert type(wrapper.optimizer).__name__ == expected
            assert wrapper.optimizer.defaults["lr"] == pytest.approx(plan.learning_rate)
            schedulers = [
                PARAM_SCHEDULERS.build({**step, "optimizer": wrapper})
                for step in cfg.param_scheduler
            ]
            assert schedulers, "warm-up at least"

            losses = model.train_step(_batch(), wrapper)
            total = sum(v for k, v in losses.items() if "loss" in k)
            assert math.isfinite(float(total)), losses
