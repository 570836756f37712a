"""Validation of a requested training spec, completed by the defaults of shared.spec_defaults.

Pure."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from shared import catalog, spec_defaults
from shared.datasets import DatasetUriError, parse_dataset_uri, parse_image_root
from shared.errors import Violations
from shared.limits import quote


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecRequest:
    """A spec as the caller sent it: None means "unset, use the default"."""

    dataset_uri: str
    image_root: str = ""
    architecture: str = ""
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    frozen_stages: int | None = None
    image_size: int | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    seed: int | None = None
    device: str = "AUTO"
    gpu_count: int | None = None
    optimizer: str = "OPTIMIZER_UNSPECIFIED"
    warmup_iterations: int | None = None
    augment: bool | None = None
    val_interval: int | None = None
    early_stopping_patience: int | None = None
    mixed_precision: bool | None = None
    deterministic: bool | None = None


def _within(
    violations: Violations, field: str, value: float | None, bounds: tuple[float, float]
) -> None:
    low, high = bounds
    if value is not None and not low <= value <= high:
        violations.add(field, f"must be between {low} and {high}, got {value}")


def _check_test_fraction(spec: SpecRequest, violations: Violations, field: str) -> None:
    value = spec.test_fraction
    if value is None or value == 0:
        return
    low, high = catalog.TEST_FRACTION
    if not low <= value <= high:
        violations.add(field, f"must be 0 (no test split) or between {low} and {high}, got {value}")
        return
    val = catalog.DEFAULT_VAL_FRACTION if spec.val_fraction is None else spec.val_fraction
    low, high = catalog.VAL_FRACTION
    # Decimal fractions that sum to the limit may exceed it by a rounding error.
    if low <= val <= high and val + value > catalog.MAX_HELD_OUT_FRACTION + 1e-9:
        violations.add(
            field,
            f"val_fraction + test_fraction must be at most {catalog.MAX_HELD_OUT_FRACTION} "
            f"(the rest trains), got {val} + {value}",
        )


def validate_spec(
    spec: SpecRequest,
    violations: Violations,
    *,
    base_architecture: str | None,
    prefix: str = "training_run.spec.",
) -> dict[str, Any] | None:
    """Adds every violated field to `violations`; returns the completed spec when there is none.

    `base_architecture` is the architecture of the base model when fine-tuning:
    the run keeps it, and naming another one is a violation.
    """
    f = prefix
    if not spec.dataset_uri:
        violations.add(f"{f}dataset_uri", "required: the COCO annotation file of the dataset")
    else:
        try:
            parse_dataset_uri(spec.dataset_uri)
        except DatasetUriError as error:
            violations.add(f"{f}dataset_uri", str(error))
    if spec.image_root:
        try:
            parse_image_root(spec.image_root)
        except DatasetUriError as error:
            violations.add(f"{f}image_root", str(error))

    architecture = spec.architecture or base_architecture or ""
    if base_architecture and spec.architecture and spec.architecture != base_architecture:
        violations.add(
            f"{f}architecture",
            f"the base model is a {base_architecture}; leave architecture empty or use that",
        )
    elif not architecture:
        violations.add(
            f"{f}architecture",
            "required without a base model; one of: " + ", ".join(catalog.ARCHITECTURES),
        )
    elif architecture not in catalog.ARCHITECTURES:
        violations.add(
            f"{f}architecture",
            f"unknown architecture {quote(architecture)}; one of: "
            + ", ".join(catalog.ARCHITECTURES),
        )

    _within(violations, f"{f}epochs", spec.epochs, catalog.EPOCHS)
    _within(violations, f"{f}batch_size", spec.batch_size, catalog.BATCH_SIZE)
    _within(violations, f"{f}frozen_stages", spec.frozen_stages, catalog.FROZEN_STAGES)
    _within(violations, f"{f}image_size", spec.image_size, catalog.IMAGE_SIZE)
    _within(violations, f"{f}val_fraction", spec.val_fraction, catalog.VAL_FRACTION)
    _check_test_fraction(spec, violations, f"{f}test_fraction")
    _within(violations, f"{f}gpu_count", spec.gpu_count, catalog.GPU_COUNT)
    _within(violations, f"{f}warmup_iterations", spec.warmup_iterations, catalog.WARMUP_ITERATIONS)
    _within(violations, f"{f}val_interval", spec.val_interval, catalog.VAL_INTERVAL)
    _within(
        violations,
        f"{f}early_stopping_patience",
        spec.early_stopping_patience,
        catalog.EARLY_STOPPING_PATIENCE,
    )
    epochs = spec.epochs or catalog.DEFAULT_EPOCHS
    if spec.val_interval is not None and spec.val_interval > epochs:
        violations.add(
            f"{f}val_interval", f"must be at most epochs ({epochs}), got {spec.val_interval}"
        )
    if spec.mixed_precision and spec.device == "CPU":
        violations.add(f"{f}mixed_precision", "only applies on GPU")
    if spec.learning_rate is not None and not (
        math.isfinite(spec.learning_rate) and 0 < spec.learning_rate <= catalog.MAX_LEARNING_RATE
    ):
        violations.add(
            f"{f}learning_rate",
            f"must be greater than 0 and at most {catalog.MAX_LEARNING_RATE}, got {spec.learning_rate}",
        )
    if spec.seed is not None and spec.seed < 0:
        violations.add(f"{f}seed", f"must be 0 or more, got {spec.seed}")
    if spec.gpu_count is not None and spec.device != "GPU":
        violations.add(f"{f}gpu_count", "only applies when device is GPU")

    if violations or architecture not in catalog.ARCHITECTURES:
        return None
    training = {
        f.name: getattr(spec, f.name)
        for f in dataclasses.fields(spec)
        if f.name not in ("dataset_uri", "image_root", "architecture")
    }
    return {
        "dataset_uri": spec.dataset_uri,
        "image_root": spec.image_root,
        # A fine-tune starts from learnt weights; a root run from random ones.
        **spec_defaults.complete(
            {**training, "architecture": architecture}, fine_tune=base_architecture is not None
        ),
    }
