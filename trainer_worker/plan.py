"""A job's spec as the worker trains it: every field set, by the defaults the service
records on a run (shared.spec_defaults), so that a job whose spec left a field unset still
trains as the service would have recorded it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from shared import spec_defaults
from shared.proto.raven.training.v1 import training_run_pb2

Spec = training_run_pb2.TrainingSpec


class ConfigError(ValueError):
    """A spec that cannot become a config (the service should have refused it)."""


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
    # None: a tenth of the run, at most 500 iterations; 0: no warm-up.
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
    # How the dataset is split when it defines no splits of its own.
    val_fraction: float = 0.2
    test_fraction: float = 0.0


def plan_of(spec: Spec, *, fine_tune: bool = False) -> TrainingPlan:
    """The spec's values, with the defaults where a field is unset. `fine_tune`: the run
    starts from a base model's weights."""
    try:
        completed = spec_defaults.complete(_set_fields(spec), fine_tune=fine_tune)
    except spec_defaults.UnknownArchitecture as error:
        raise ConfigError(str(error)) from None
    # The worker's own fields (data loading) keep their defaults; so do the open ones
    # (warm-up, mixed precision) when the spec leaves them unset.
    return TrainingPlan(
        **{
            f.name: completed[f.name]
            for f in dataclasses.fields(TrainingPlan)
            if f.name in completed
        }
    )


def _set_fields(spec: Spec) -> dict[str, Any]:
    """The spec's fields that are set, enums by name."""
    fields: dict[str, Any] = {
        descriptor.name: value
        for descriptor, value in spec.ListFields()
        if descriptor.enum_type is None
    }
    if spec.optimizer:
        fields["optimizer"] = Spec.Optimizer.Name(spec.optimizer)
    fields["device"] = Spec.Device.Name(spec.device)
    return fields
