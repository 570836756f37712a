from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.catalog import ARCHITECTURES
from tests.configs import dataset_files, load_config
from trainer_worker.architectures import MMDET_ARCHITECTURES, mmdet_configs_root
from trainer_worker.config import (
    BaseCheckpoint,
    ConfigError,
    DatasetFiles,
    TrainingPlan,
    generate_config,
)

mmengine_config = pytest.importorskip("mmengine.config")
try:
    CONFIGS = mmdet_configs_root()
except RuntimeError as missing:
    pytest.skip(f"needs the mmdet wheel: {missing}", allow_module_level=True)

CLASSES = ("dump", "tire", "bottle")


def plan(**changes: Any) -> TrainingPlan:
    values: dict[str, Any] = {
        "architecture": "retinanet_r18_fpn",
        "epochs": 7,
        "batch_size": 3,
        "learning_rate": 0.004,
        "frozen_stages": 2,
        "image_size": 256,
        "seed": 2**40 + 5,
    }
    return TrainingPlan(**{**values, **changes})


def files(
    tmp_path: Path, classes: tuple[str, ...] = CLASSES, *, test: bool = False
) -> DatasetFiles:
    return dataset_files(tmp_path, classes, train_image_count=30, test=test)


def load(tmp_path: Path, text: str) -> Any:
    return load_config(tmp_path / "config.py", text)


def config(tmp_path: Path, training: TrainingPlan, dataset: DatasetFiles | None = None) -> Any:
    """The loaded config generated for `training` on `dataset` (files(tmp_path) by default)."""
    generated = generate_config(
        plan=training,
        dataset=dataset or files(tmp_path),
        work_dir=tmp_path / "work",
        configs_root=CONFIGS,
    )
    return load(tmp_path, generated.text)


def test_retinanet_config(tmp_path: Path) -> None:
    generated = generate_config(
        plan=plan(), dataset=files(tmp_path), work_dir=tmp_path / "work", configs_root=CONFIGS
    )
    cfg = load(tmp_path, generated.text)

    assert generated.notices == ()
    assert cfg.model.bbox_head.num_classes == 3
    assert cfg.model.backbone.depth == 18
    assert cfg.model.backbone.init_cfg is None
    assert cfg.model.backbone.frozen_stages == 2
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        assert tuple(loader.dataset.metainfo.classes) == CLASSES
        assert loader.num_workers == 0 and loader.persistent_workers is False
    assert cfg.train_dataloader.batch_size == 3
    assert cfg.train_dataloader.dataset.ann_file == str(tmp_path / "train.json")
    assert cfg.val_dataloader.dataset.ann_file == str(tmp_path / "val.json")
    assert cfg.val_evaluator.type == "CocoMetric"
    assert cfg.val_evaluator.ann_file == str(tmp_path / "val.json")
    assert cfg.train_cfg.max_epochs == 7 and cfg.train_cfg.val_interval == 1
    assert cfg.optim_wrapper.optimizer.lr == 0.004
    resize = [step for step in cfg.train_dataloader.dataset.pipeline if step.type == "Resize"]
    assert resize[0].scale == (256, 256)
    warmup, steps = cfg.param_scheduler
    # 30 images in batches of 3 for 7 epochs: 70 iterations, a tenth of them warm up.
    assert (warmup.type, warmup.end) == ("LinearLR", 7)
    assert steps.milestones == [5, 6]
    assert cfg.default_hooks.checkpoint.interval == 1
    assert cfg.randomness.seed == (2**40 + 5) % 2**31
    assert cfg.work_dir == str(tmp_path / "work")
    assert cfg.load_from is None
    # Nothing in the config may fetch weights.
    assert "Pretrained" not in cfg.pretty_text and "torchvision://" not in cfg.pretty_text


def test_a_test_split_has_its_own_loader_and_evaluator(tmp_path: Path) -> None:
    test_path = tmp_path / "test.json"
    cfg = config(tmp_path, plan(num_workers=2), files(tmp_path, test=True))

    assert cfg.raven.test_after_training is True
    assert cfg.test_dataloader.dataset.ann_file == str(test_path)
    assert tuple(cfg.test_dataloader.dataset.metainfo.classes) == CLASSES
    assert cfg.test_dataloader.batch_size == 1
    assert (cfg.test_dataloader.num_workers, cfg.test_dataloader.persistent_workers) == (2, False)
    assert cfg.test_evaluator.type == "CocoMetric" and cfg.test_evaluator.classwise is True
    assert cfg.test_evaluator.ann_file == str(test_path)
    assert cfg.val_evaluator.ann_file == str(tmp_path / "val.json")

    without = config(tmp_path, plan())
    assert without.raven.test_after_training is False
    # The exported config's test loop evaluates val, never the base config's COCO files.
    assert without.test_dataloader.dataset.ann_file == str(tmp_path / "val.json")
    assert without.test_evaluator.ann_file == str(tmp_path / "val.json")


def test_faster_rcnn_r18_is_derived_from_r50(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        plan(architecture="faster_rcnn_r18_fpn", epochs=2),
        dataset_files(tmp_path, CLASSES, train_image_count=4),
    )

    assert cfg.model.backbone.depth == 18
    assert cfg.model.neck.in_channels == [64, 128, 256, 512]
    assert cfg.model.roi_head.bbox_head.num_classes == 3
    assert cfg.model.backbone.init_cfg is None
    # Too short for the 1x schedule's steps; the warmup still ends (at iteration 1).
    (warmup,) = cfg.param_scheduler
    assert (warmup.type, warmup.end) == ("LinearLR", 2)


@pytest.mark.parametrize("key", sorted(MMDET_ARCHITECTURES))
def test_every_architecture_loads(tmp_path: Path, key: str) -> None:
    cfg = config(tmp_path, plan(architecture=key))
    assert cfg.model.backbone.get("depth", 0) == ARCHITECTURES[key].depth
    assert cfg.model.backbone.init_cfg is None
    assert "Pretrained" not in cfg.pretty_text


def test_catalog_and_mmdet_mapping_agree() -> None:
    assert set(MMDET_ARCHITECTURES) == set(ARCHITECTURES)


def test_fine_tune_with_the_same_classes_keeps_the_head(tmp_path: Path) -> None:
    checkpoint = tmp_path / "base.pth"
    generated = generate_config(
        plan=plan(),
        dataset=files(tmp_path),
        work_dir=tmp_path,
        configs_root=CONFIGS,
        base=BaseCheckpoint(path=checkpoint, architecture="retinanet_r18_fpn", classes=CLASSES),
    )
    cfg = load(tmp_path, generated.text)
    assert cfg.load_from == str(checkpoint)
    assert tuple(cfg.raven.reset_weights) == ()
    assert generated.notices == ()


def test_fine_tune_with_other_classes_resets_the_head(tmp_path: Path) -> None:
    generated = generate_config(
        plan=plan(architecture="faster_rcnn_r50_fpn"),
        dataset=files(tmp_path),
        work_dir=tmp_path,
        configs_root=CONFIGS,
        base=BaseCheckpoint(
            path=tmp_path / "base.pth", architecture="faster_rcnn_r50_fpn", classes=("dump",)
        ),
    )
    cfg = load(tmp_path, generated.text)
    assert cfg.load_from == str(tmp_path / "base.pth")
    assert tuple(cfg.raven.reset_weights) == (
        "roi_head.bbox_head.fc_cls.",
        "roi_head.bbox_head.fc_reg.",
    )
    (notice,) = generated.notices
    assert notice.code == "head_reinitialised"
    assert "[dump]" in notice.message and "[dump, tire, bottle]" in notice.message


def test_refuses_what_cannot_train(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="base model is a faster_rcnn_r50_fpn"):
        generate_config(
            plan=plan(),
            dataset=files(tmp_path),
            work_dir=tmp_path,
            configs_root=CONFIGS,
            base=BaseCheckpoint(
                path=tmp_path / "b.pth", architecture="faster_rcnn_r50_fpn", classes=CLASSES
            ),
        )
    with pytest.raises(ConfigError, match="frozen_stages"):
        generate_config(
            plan=plan(frozen_stages=5),
            dataset=files(tmp_path),
            work_dir=tmp_path,
            configs_root=CONFIGS,
        )
    with pytest.raises(ConfigError, match="no classes"):
        generate_config(
            plan=plan(), dataset=files(tmp_path, ()), work_dir=tmp_path, configs_root=CONFIGS
        )


@pytest.mark.parametrize(
    ("epochs", "milestones"),
    [(1, []), (3, []), (4, [3]), (7, [5, 6]), (12, [8, 11]), (24, [16, 22]), (100, [67, 92])],
)
def test_lr_milestones_scale_with_the_epoch_count(
    tmp_path: Path, epochs: int, milestones: list[int]
) -> None:
    cfg = config(tmp_path, plan(epochs=epochs))
    steps = [s for s in cfg.param_scheduler if s.type == "MultiStepLR"]
    assert [list(s.milestones) for s in steps] == ([milestones] if milestones else [])
    assert all(s.end == epochs for s in steps)


def test_hyperparameters_reach_the_config(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        plan(
            optimizer="ADAMW",
            warmup_iterations=0,
            augment=False,
            val_interval=3,
            early_stopping_patience=2,
            mixed_precision=False,
        ),
    )
    assert cfg.optim_wrapper.optimizer.type == "AdamW"
    # Nothing of the base config's SGD (momentum) reaches AdamW, which refuses it.
    assert "momentum" not in cfg.optim_wrapper.optimizer
    assert cfg.optim_wrapper.optimizer.lr == 0.004
    assert [s.type for s in cfg.param_scheduler] == ["MultiStepLR"], "no warm-up"
    assert "RandomFlip" not in [s.type for s in cfg.train_dataloader.dataset.pipeline]
    assert cfg.train_cfg.val_interval == 3
    (stopper,) = cfg.custom_hooks
    assert (stopper.type, stopper.monitor, stopper.rule, stopper.patience) == (
        "EarlyStoppingHook",
        "coco/bbox_mAP",
        "greater",
        2,
    )
    assert cfg.raven.mixed_precision is False


def test_defaults_flip_warm_up_and_leave_precision_to_the_device(tmp_path: Path) -> None:
    cfg = config(tmp_path, plan(warmup_iterations=40))
    assert cfg.optim_wrapper.optimizer.type == "SGD"
    assert "RandomFlip" in [s.type for s in cfg.train_dataloader.dataset.pipeline]
    assert cfg.param_scheduler[0].end == 40
    # The base config's hooks (RTMDet's EMA and pipeline switch) are not inherited.
    assert cfg.custom_hooks == []
    assert cfg.raven.mixed_precision is None
    with pytest.raises(ConfigError, match="val_interval"):
        generate_config(
            plan=plan(val_interval=8),
            dataset=files(tmp_path),
            work_dir=tmp_path / "work",
            configs_root=CONFIGS,
        )


def test_data_loading_reaches_every_dataloader(tmp_path: Path) -> None:
    cfg = config(tmp_path, plan(num_workers=4, pin_memory=True), files(tmp_path, test=True))
    for loader in (cfg.train_dataloader, cfg.val_dataloader):
        assert (loader.num_workers, loader.persistent_workers, loader.pin_memory) == (4, True, True)
    assert (cfg.test_dataloader.num_workers, cfg.test_dataloader.pin_memory) == (4, True)
    on_cpu = config(tmp_path, plan())
    assert on_cpu.train_dataloader.pin_memory is False
    assert on_cpu.train_dataloader.persistent_workers is False


@pytest.mark.parametrize("deterministic", [False, True])
def test_deterministic_training_is_on_request_with_a_seeded_sampler(
    tmp_path: Path, deterministic: bool
) -> None:
    cfg = config(tmp_path, plan(deterministic=deterministic))
    seed = (2**40 + 5) % 2**31
    assert (cfg.randomness.seed, cfg.randomness.deterministic) == (seed, deterministic)
    assert cfg.raven.deterministic is deterministic
    sampler = cfg.train_dataloader.sampler
    assert (sampler.type, sampler.shuffle, sampler.seed) == ("DefaultSampler", True, seed)


def test_the_specs_deterministic_flag_reaches_the_plan() -> None:
    from shared.proto.raven.training.v1 import training_run_pb2
    from trainer_worker.plan import plan_of

    spec = training_run_pb2.TrainingSpec(architecture="retinanet_r18_fpn", seed=9)
    assert plan_of(spec).deterministic is False
    spec.deterministic = True
    assert (plan_of(spec).deterministic, plan_of(spec).seed) == (True, 9)
