"""What the CLI sends, built without a connection: resource names and requests."""

from __future__ import annotations

import uuid
from pathlib import Path

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


def create_request(
    *,
    display_name: str,
    dataset: str,
    image_root: str | None = None,
    base_model: str | None = None,
    architecture: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    frozen_stages: int | None = None,
    image_size: int | None = None,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
    request_id: str | None = None,
) -> training_run_pb2.CreateTrainingRunRequest:
    """Unset options stay unset, so the server fills in (and records) its defaults."""
    spec = training_run_pb2.TrainingSpec(
        dataset_uri=dataset_uri(dataset),
        image_root=image_root_uri(image_root or ""),
        architecture=architecture or "",
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        frozen_stages=frozen_stages,
        image_size=image_size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    run = training_run_pb2.TrainingRun(
        display_name=display_name,
        spec=spec,
        base_model=model_name(base_model) if base_model else "",
    )
    return training_run_pb2.CreateTrainingRunRequest(
        training_run=run, request_id=request_id or str(uuid.uuid4())
    )
