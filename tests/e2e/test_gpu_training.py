"""Training on CUDA through the whole system (RetinaNet R18, 128 px, 16 images): a run on
one GPU, with its device facts recorded and mixed precision on by default, and a run over
two GPUs under torch's distributed launcher. Skipped where CUDA has fewer devices
(tests/conftest.py)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import nats
import pytest

from shared.proto.raven.training.v1 import trained_model_pb2, training_run_pb2
from shared.settings import Settings
from tests.support import eventually, running_worker
from trainer_worker.synthetic import make_dataset

TrainingRun = training_run_pb2.TrainingRun
Spec = training_run_pb2.TrainingSpec
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]


@pytest.fixture(scope="module")
async def worker(settings: Settings, nc: nats.NATS, subjects, tmp_path_factory):
    """`python -m trainer_worker` with the machine's GPUs: one job per GPU at once."""
    async with running_worker(
        settings,
        nc,
        subjects,
        tmp_path_factory.mktemp("gpu-worker"),
        "e2e-gpu-worker",
        RAVEN_WORKER_DEVICE="cuda",
    ) as process:
        yield process


@pytest.fixture(scope="module")
def dataset_uri(settings: Settings) -> str:
    make_dataset(Path(settings.artifact_root) / "datasets" / "gpu", images=16, size=128)
    return "datasets/gpu/annotations.json"


async def train_to_the_end(runs, models, dataset_uri: str, **spec: object):
    """Creates a GPU run, follows it to SUCCEEDED; its events and its trained model."""
    run = await runs.CreateTrainingRun(
        training_run_pb2.CreateTrainingRunRequest(
            training_run=TrainingRun(
                display_name="on cuda",
                spec=Spec(
                    dataset_uri=dataset_uri,
                    architecture="retinanet_r18_fpn",
                    epochs=2,
                    batch_size=4,
                    image_size=128,
                    seed=7,
                    device=Spec.GPU,
                    **spec,  # type: ignore[arg-type]
                ),
            ),
        )
    )
    stream = runs.WatchTrainingRun(training_run_pb2.WatchTrainingRunRequest(name=run.name))
    events = await asyncio.wait_for(_collect(stream), 300)
    states = [e.state_changed for e in events if e.WhichOneof("payload") == "state_changed"]
    assert states[-1].to_state == TrainingRun.SUCCEEDED, states[-1]

    async def registered() -> str | None:
        found = await runs.GetTrainingRun(training_run_pb2.GetTrainingRunRequest(name=run.name))
        return found.trained_model or None

    name = await eventually(registered, timeout=15)
    model = await models.GetTrainedModel(trained_model_pb2.GetTrainedModelRequest(name=name))
    return events, model


async def _collect(stream) -> list[training_run_pb2.TrainingRunEvent]:
    return [event async for event in stream]


def artifact_text(model: trained_model_pb2.TrainedModel, kind: str) -> str:
    uri = next(a.uri for a in model.artifacts if a.kind == kind)
    return Path(unquote(urlparse(uri).path)).read_text()


@pytest.mark.gpu
async def test_a_gpu_run_records_its_device_and_trains_with_mixed_precision(
    runs, models, worker, dataset_uri
):
    events, model = await train_to_the_end(runs, models, dataset_uri)

    # nvidia-smi's facts: the card's name and memory, and the one GPU the run was given.
    device = re.compile(r"^cuda:0 \(.+, \d+ GiB, 1 visible\)$")
    assert device.match(model.facts.device), model.facts.device
    running = next(
        e.state_changed
        for e in events
        if e.WhichOneof("payload") == "state_changed"
        and e.state_changed.to_state == TrainingRun.RUNNING
    )
    assert model.facts.device in running.message
    # Mixed precision is on by default on CUDA: the config the run ran says so.
    assert "AmpOptimWrapper" in artifact_text(model, "config")


@pytest.mark.gpu(2)
async def test_a_run_over_two_gpus_trains_under_the_distributed_launcher(
    runs, models, worker, dataset_uri
):
    events, model = await train_to_the_end(runs, models, dataset_uri, gpu_count=2)

    assert re.match(r"^cuda:0 \(.+, 2 visible\)$", model.facts.device), model.facts.device
    # Rank 0 alone reports: each epoch is evaluated once, progress only moves forward.
    evaluations = [e.evaluation.epoch for e in events if e.WhichOneof("payload") == "evaluation"]
    assert evaluations == [1, 2]
    progress = [e.progress.iteration for e in events if e.WhichOneof("payload") == "progress"]
    assert progress == sorted(set(progress))
    config = artifact_text(model, "config")
    assert "launcher = 'pytorch'" in config
    # The run's batch of 4 is its total: 2 images on each GPU.
    assert re.search(r"^train_dataloader = dict\(\n(    .*\n)*?    batch_size=2,$", config, re.M)
    assert "AmpOptimWrapper" in config
    log = artifact_text(model, "log")
    assert "Distributed training: True" in log
