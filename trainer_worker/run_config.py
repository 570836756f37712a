"""The config file of one attempt: generated from the plan, the prepared dataset, the
verified checkpoints and the devices, written into the attempt's folder, with what a
person should know about it published as notices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from shared.fields import from_attributes
from trainer_worker.architectures import UnknownArchitecture, mmdet_configs_root
from trainer_worker.config import DatasetFiles, GeneratedConfig, generate_config
from trainer_worker.dataset import PreparedDataset
from trainer_worker.inputs import Checkpoints
from trainer_worker.job import Attempt, JobFailed
from trainer_worker.placement import Placement
from trainer_worker.plan import ConfigError, TrainingPlan


async def write_config(
    attempt: Attempt,
    plan: TrainingPlan,
    prepared: PreparedDataset,
    checkpoints: Checkpoints,
    placement: Placement,
) -> Path:
    """Writes the run's config and publishes what a person should know about it."""
    generated = _generate(attempt, plan, prepared, checkpoints, placement)
    config_path = attempt.folder / "config.py"
    config_path.write_text(generated.text)
    if attempt.resume is not None:
        await attempt.notice(
            "resumed", f"training resumes after epoch {attempt.resume.epoch} of an earlier attempt"
        )
    for item in generated.notices:
        await attempt.notice(item.code, item.message)
    for code, message in placement.notices:
        await attempt.notice(code, message)
    return config_path


def _generate(
    attempt: Attempt,
    plan: TrainingPlan,
    prepared: PreparedDataset,
    checkpoints: Checkpoints,
    placement: Placement,
) -> GeneratedConfig:
    try:
        configs_root = mmdet_configs_root()
    except RuntimeError as error:
        raise JobFailed("worker_misconfigured", str(error)) from None
    loading = placement.loading
    try:
        return generate_config(
            plan=dataclasses.replace(
                plan, num_workers=loading.workers, pin_memory=loading.pin_memory
            ),
            dataset=from_attributes(DatasetFiles, prepared),
            work_dir=attempt.work_dir,
            configs_root=configs_root,
            base=checkpoints.base,
            resume_from=checkpoints.resume_from,
        )
    except (ConfigError, UnknownArchitecture) as error:
        raise JobFailed("invalid_spec", str(error)) from None
