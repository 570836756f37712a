"""Helpers of the end-to-end tests: a run of real training, from its dataset and its
request to its history and the model the registry made of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NATS

from shared.messaging import Subjects
from shared.proto.raven.training.v1 import training_run_pb2
from shared.settings import Settings
from tests.support import eventually, running_worker
from trainer_worker.synthetic import make_dataset

TrainingRun = training_run_pb2.TrainingRun
TrainingRunEvent = training_run_pb2.TrainingRunEvent


def local_dataset(settings: Settings, name: str, **options: Any) -> str:
    """A synthetic dataset (trainer_worker.synthetic.make_dataset with `options`) in the
    artifact root; its dataset_uri."""
    make_dataset(Path(settings.artifact_root) / "datasets" / name, **options)
    return f"datasets/{name}/annotations.json"


def run_request(
    name: str, dataset_uri: str, *, base_model: str = "", **spec: Any
) -> training_run_pb2.CreateTrainingRunRequest:
    """A run named `name` of `spec` on `dataset_uri`, in batches of 4 on the CPU unless
    `spec` says otherwise."""
    spec = {"batch_size": 4, "device": training_run_pb2.TrainingSpec.CPU, **spec}
    return training_run_pb2.CreateTrainingRunRequest(
        training_run=TrainingRun(
            display_name=name,
            base_model=base_model,
            spec=training_run_pb2.TrainingSpec(dataset_uri=dataset_uri, **spec),
        ),
    )


async def watch_to_the_end(runs: Any, name: str) -> list[TrainingRunEvent]:
    """The run's history, from a watch that ends with the run."""
    stream = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=name))
    return [event async for event in stream]


def payloads(events: list[TrainingRunEvent], kind: str) -> list[Any]:
    """The `kind` payloads of `events` ("state_changed", "progress", ...), in order."""
    return [getattr(e, kind) for e in events if e.WhichOneof("payload") == kind]


async def model_of(runs: Any, name: str) -> str:
    """The model the registry made of run `name`, which it registers shortly after the
    run succeeded."""

    async def registered() -> str | None:
        run = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=name))
        return run.trained_model or None

    return await eventually(registered, timeout=15)


def worker_fixture(worker_id: str, **overrides: str) -> Any:
    """The module-scoped fixture of a worker `worker_id`, its environment `overrides` added."""

    @pytest.fixture(scope="module")
    async def worker(
        settings: Settings, nc: NATS, subjects: Subjects, tmp_path_factory: Any
    ) -> AsyncIterator[asyncio.subprocess.Process]:
        """`python -m trainer_worker` as its own process, as it runs in production."""
        folder = tmp_path_factory.mktemp(worker_id)
        async with running_worker(
            settings, nc, subjects, folder, worker_id, **overrides
        ) as process:
            yield process

    return worker
