"""What the CLI sends, built without a connection: resource names and requests."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from shared.proto.raven.training.v1 import training_run_pb2

TRAINING_RUNS = "trainingRuns/"
TRAINED_MODELS = "trainedModels/"


def run_name(value: str) -> str:
    """`trainingRuns/ID` from either that or a bare ID."""
    return value if value.startswith(TRAINING_RUNS) else TRAINING_RUNS + value


def model_name(value: str) -> str:
    """`trainedModels/ID` from either that or a bare ID."""
    return value if value.startswith(TRAINED_MODELS) else TRAINED_MODELS + value


def dataset_uri(value: str) -> str:
    """A local file becomes a file:// URI; URIs and artifact-root paths pass unchanged."""
    if "://" not in value and Path(value).is_file():
        return Path(value).resolve().as_uri()
    return value


def image_root_uri(value: str) -> str:
    """A local folder becomes a file:// URI; URIs and artifact-root paths pass unchanged."""
    if value and "://" not in value and Path(value).is_dir():
        return Path(value).resolve().as_uri()
    return value


# The spec fields `raven runs create` sets by option, beside dataset, image root and
# architecture; unset ones take the server's defaults.
SPEC_OPTIONS = (
    "epochs", "batch_size", "learning_rate", "frozen_stages", "image_size", "val_fraction",
    "test_fraction", "seed", "device", "gpu_count", "optimizer", "warmup_iterations",
    "augment", "val_interval", "early_stopping_patience", "mixed_precision", "deterministic",
)  # fmt: skip


def labels(pairs: list[str] | None) -> dict[str, str]:
    """KEY=VALUE options as a map; raises ValueError naming a pair without "="."""
    found: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"label {pair!r} is not KEY=VALUE")
        found[key] = value
    return found


def create_request(
    *,
    display_name: str,
    dataset: str,
    image_root: str | None = None,
    base_model: str | None = None,
    architecture: str | None = None,
    request_id: str | None = None,
    labels: dict[str, str] | None = None,
    **spec_fields: Any,
) -> training_run_pb2.CreateTrainingRunRequest:
    """Unset options (None) stay unset, so the server fills in (and records) its defaults.
    Enum fields take their value names ("CPU", "ADAMW")."""
    unknown = set(spec_fields) - set(SPEC_OPTIONS)
    if unknown:
        raise TypeError(f"not spec options: {sorted(unknown)}")
    spec = training_run_pb2.TrainingSpec(
        dataset_uri=dataset_uri(dataset),
        image_root=image_root_uri(image_root or ""),
        architecture=architecture or "",
        **{k: v for k, v in spec_fields.items() if v is not None},
    )
    run = training_run_pb2.TrainingRun(
        display_name=display_name,
        spec=spec,
        base_model=model_name(base_model) if base_model else "",
        labels=labels or {},
    )
    return training_run_pb2.CreateTrainingRunRequest(
        training_run=run, request_id=request_id or str(uuid.uuid4())
    )
